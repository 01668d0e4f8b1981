"""The ChestX-ray14 data layer on the synthetic set: splits, phases, CSV variants, bad data."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from cxrmem.experiment import train_main
from cxrmem.data.chestxray14 import encode_labels, load_frame, read_entries
from cxrmem.data.findings import FINDINGS
from cxrmem.data.images import find_damaged_images
from cxrmem.data.split import OfficialLists, SplitWarning, assign_splits, hold_out, patient_share, phase_frame
from cxrmem.data.synthetic import generate
from cxrmem.utils.errors import UserError

from helpers import EXPERIMENTS, check_data, run_cli


def patients(frame, split):
    return set(frame.loc[frame["split"] == split, "patient_id"])


def assert_disjoint_patients(frame):
    train, valid, test = (patients(frame, s) for s in ("train", "valid", "test"))
    assert train and valid and test
    assert not (train & valid) and not (train & test) and not (valid & test)


def test_official_split_keeps_patients_apart(tiny_data):
    frame, source, missing = load_frame(tiny_data, valid_pct=0.2, seed=1)
    assert source == "official" and missing == []
    assert_disjoint_patients(frame)
    test_names = set((tiny_data / "test_list.txt").read_text().split())
    assert set(frame.loc[frame["split"] == "test", "image_index"]) == test_names


def test_missing_list_derives_a_patient_split_with_a_warning(data_copy):
    (data_copy / "test_list.txt").unlink()
    with pytest.warns(SplitWarning, match="deriving a patient-level split"):
        frame, source, _ = load_frame(data_copy, valid_pct=0.2, seed=1)
    assert source == "derived"
    assert_disjoint_patients(frame)
    with pytest.warns(SplitWarning):
        again, _, _ = load_frame(data_copy, valid_pct=0.2, seed=1)
    assert again["split"].tolist() == frame["split"].tolist()  # seeded


def test_both_phases_validate_on_the_same_patients_and_phase1_has_no_normal_image(tiny_data):
    frame, _, _ = load_frame(tiny_data, valid_pct=0.2, seed=1)
    phase1, phase2 = phase_frame(frame, filter_normal=True), phase_frame(frame, filter_normal=False)
    assert (phase1[FINDINGS].sum(axis=1) > 0).all()
    assert (phase2[FINDINGS].sum(axis=1) == 0).any()
    valid1 = set(phase1.loc[phase1["is_valid"], "patient_id"])
    valid2 = set(phase2.loc[phase2["is_valid"], "patient_id"])
    assert valid1 <= valid2 and valid1
    # a phase-2 validation patient missing from phase 1 has only normal images
    normal_only = phase2[phase2["patient_id"].isin(valid2 - valid1)][FINDINGS].to_numpy().sum()
    assert normal_only == 0
    assert "test" not in set(phase1["split"]) | set(phase2["split"])


def test_the_2017_and_2020_csv_variants_read_identically(tiny_data, tmp_path):
    csv_2017 = tiny_data / "Data_Entry_2017.csv"
    lines = csv_2017.read_text().splitlines()
    assert lines[0].endswith(",")  # the 2017 file's trailing comma
    csv_2020 = tmp_path / "Data_Entry_2017_v2020.csv"
    csv_2020.write_text("\n".join(line[:-1] if line.endswith(",") else line for line in lines) + "\n")
    assert pd.read_csv(csv_2017).shape[1] == pd.read_csv(csv_2020).shape[1] + 1
    pd.testing.assert_frame_equal(read_entries(csv_2017), read_entries(csv_2020))


def test_the_2020_file_name_is_found(data_copy):
    (data_copy / "Data_Entry_2017.csv").rename(data_copy / "Data_Entry_2017_v2020.csv")
    frame, _, _ = load_frame(data_copy, valid_pct=0.2, seed=1)
    assert len(frame) > 0


def test_labels_split_on_the_bar_never_by_substring():
    labels = encode_labels(pd.Series(["Effusion|Mass", "No Finding", "Pleural_Thickening", "Infiltration"]), "t")
    assert labels.loc[0, ["Effusion", "Mass"]].tolist() == [1, 1]
    assert labels.loc[0].sum() == 2 and labels.loc[1].sum() == 0
    assert labels.loc[2].sum() == 1 and labels.loc[2, "Pleural_Thickening"] == 1
    assert list(labels.columns) == FINDINGS


def test_a_finding_outside_the_14_is_an_error():
    with pytest.raises(UserError, match="unknown finding label.*'Nodules'"):
        encode_labels(pd.Series(["Nodules|Mass"]), "t")


def test_a_label_typo_names_its_line_and_the_likely_finding():
    labels = pd.Series(["No Finding", "Mass", "Effusion|Pneumonai", "Nodule", "Cardiomegally"])
    with pytest.raises(UserError) as caught:
        encode_labels(labels, "t.csv")
    message = str(caught.value)
    assert "line 6 has the unknown finding label 'Cardiomegally'" in message  # row 4 + the header line
    assert "did you mean 'Cardiomegaly'?" in message
    assert "1 other unknown label(s): 'Pneumonai'" in message


def test_a_label_unlike_any_finding_gets_the_list_only():
    with pytest.raises(UserError) as caught:
        encode_labels(pd.Series(["Mass", "xyzzy"]), "t.csv")
    assert "line 3" in str(caught.value) and "did you mean" not in str(caught.value)


def test_missing_required_columns(data_copy):
    csv_path = data_copy / "Data_Entry_2017.csv"
    csv_path.write_text(csv_path.read_text().replace("Patient ID", "Patient"))
    with pytest.raises(UserError, match="missing required column.*Patient ID"):
        load_frame(data_copy, valid_pct=0.2, seed=1)


def test_missing_images_error_or_drop(data_copy):
    victims = sorted(data_copy.glob("images_*/images/*.png"))[:3]
    for path in victims:
        path.unlink()
    with pytest.raises(UserError, match="3 of .* images listed in the CSV are not on disk"):
        load_frame(data_copy, valid_pct=0.2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame, _, missing = load_frame(data_copy, valid_pct=0.2, seed=1, missing_images="drop")
    assert sorted(missing) == sorted(p.name for p in victims)
    assert not set(missing) & set(frame["image_index"])
    assert any("missing on disk" in str(w.message) for w in caught)


def test_damaged_files_are_found_without_decoding(data_copy):
    images = sorted(data_copy.glob("images_*/images/*.png"))
    images[0].write_bytes(b"")
    images[1].write_bytes(images[1].read_bytes()[:-20])
    images[2].write_bytes(b"not a png at all" * 10)
    found = dict(find_damaged_images(images[:5]))
    assert found == {str(images[0]): "empty file", str(images[1]): "truncated (no end marker)",
                     str(images[2]): "not a valid image header"}


def test_check_data_prints_and_writes_the_summary(tiny_data, tmp_path, capsys):
    out, summary = check_data(tiny_data, tmp_path / "run", capsys)
    assert set(summary) == {"train", "valid", "test", "phase1_train", "phase1_valid", "missing_images",
                            "split_source", "bboxes", "synthetic", "dataset", "findings"}
    assert summary["split_source"] == "official" and summary["missing_images"] == 0
    assert summary["synthetic"] is True and "data: SYNTHETIC" in out  # tiny_data was drawn by the generator
    frame, _, _ = load_frame(tiny_data, valid_pct=0.1, seed=42)
    for split in ("train", "valid", "test"):
        rows = frame[frame["split"] == split]
        assert summary[split]["n_images"] == len(rows)
        assert summary[split]["n_patients"] == rows["patient_id"].nunique()
        assert summary[split]["positives"] == {f: int(rows[f].sum()) for f in FINDINGS}
    assert summary["phase1_train"]["n_images"] < summary["train"]["n_images"]
    assert "Infiltration" in out and "phase1_train" in out


def test_data_dir_missing_is_one_line(tmp_path, capsys):
    status, _, err = run_cli(train_main, ["--config", EXPERIMENTS / "baseline_effv2s.yaml",
                                          "--data_dir", tmp_path / "absent", "--output_dir", tmp_path / "r",
                                          "--check-data"], capsys)
    assert status == 2 and err.startswith("error: data_dir") and err.count("\n") == 1


def test_synthetic_set_is_generated_on_first_use(tmp_path, capsys):
    data_dir = tmp_path / "generated"
    status, _, err = run_cli(train_main, [
        "--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_dir, "--output_dir", tmp_path / "r",
        "--set", "data.synthetic.n_patients=12", "--set", "data.synthetic.size=24", "--check-data"], capsys)
    assert status == 0, err
    assert (data_dir / "Data_Entry_2017.csv").is_file() and (data_dir / "test_list.txt").is_file()


def digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synthetic.json"}


@pytest.mark.parametrize("kind", ["generated here", "without a generator marker, as a download"])
def test_an_existing_data_set_is_used_as_it_is_whatever_data_synthetic_says(data_copy, tmp_path, capsys, kind):
    if kind != "generated here":
        (data_copy / "synthetic.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in data_copy.rglob("*")}
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="data.synthetic is not used"):
        status, _, err = run_cli(train_main, [  # the demo config asks for 1,200 synthetic patients at 128 px
            "--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_copy, "--output_dir", run_dir,
            "--check-data"], capsys)
    assert status == 0, err
    assert {p: p.stat().st_mtime_ns for p in data_copy.rglob("*")} == before  # nothing written, nothing added
    summary = json.loads((run_dir / "data_summary.json").read_text())
    frame, _, _ = load_frame(data_copy, valid_pct=0.1, seed=42)
    assert sum(summary[split]["n_images"] for split in ("train", "valid", "test")) == len(frame)
    assert summary["split_source"] == "official"


@pytest.mark.parametrize("state", ["empty", "killed"])
def test_synthetic_set_is_generated_into_an_empty_folder_and_a_killed_generation_completed(tmp_path, capsys, state):
    reference = tmp_path / "reference"
    generate(reference, n_patients=12, size=24, seed=0, workers=1)  # the demo's data.synthetic.seed
    data_dir = tmp_path / "generated"
    data_dir.mkdir()
    if state == "killed":
        generate(data_dir, n_patients=12, size=24, seed=0, workers=1)
        marker = json.loads((data_dir / "synthetic.json").read_text())
        (data_dir / "synthetic.json").write_text(json.dumps({**marker, "complete": False}))
        sorted(data_dir.glob("images_*/images/*.png"))[-1].unlink()
        (data_dir / "Data_Entry_2017.csv").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the set it makes is the one asked for: no warning
        status, _, err = run_cli(train_main, [
            "--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_dir, "--output_dir", tmp_path / "r",
            "--set", "data.synthetic.n_patients=12", "--set", "data.synthetic.size=24", "--check-data"], capsys)
    assert status == 0, err
    assert digests(data_dir) == digests(reference)
    assert json.loads((data_dir / "synthetic.json").read_text())["complete"] is True


def test_hold_out_fills_the_budget_with_whole_patients():
    rng = np.random.default_rng(0)
    for trial in range(300):
        weights = rng.integers(1, 10, size=int(rng.integers(2, 25)))
        budget = rng.uniform(0.0, 1.1) * weights.sum()
        held = hold_out(weights, budget, np.random.default_rng(trial))
        assert held.any() and not held.all()
        np.testing.assert_array_equal(held, hold_out(weights, budget, np.random.default_rng(trial)))  # seeded
        if weights.min() > budget:  # nobody fits: the lightest patient alone
            assert held.sum() == 1 and weights[held][0] == weights.min()
        elif weights.sum() <= budget:  # everybody fits: all but the heaviest
            assert (~held).sum() == 1 and weights[~held][0] == weights.max()
        else:  # within the budget, and every patient left out would overflow it
            assert weights[held].sum() <= budget
            assert (weights[held].sum() + weights[~held] > budget).all()


def test_hold_out_with_unit_weights_draws_b_patients_uniformly():
    n, b, draws = 5, 2, 4000
    counts = np.zeros(n)
    for seed in range(draws):
        held = hold_out(np.ones(n, dtype=np.int64), b, np.random.default_rng(seed))
        assert held.sum() == b
        counts += held
    expected, sd = b / n, np.sqrt(b / n * (1 - b / n) / draws)
    assert np.abs(counts / draws - expected).max() < 4 * sd


def test_patient_share_is_the_fraction_in_expectation_and_uniform_over_patients():
    ids = [str(i) for i in range(1, 20001)]
    for fraction, seed in ((0.1, 1), (0.2, 7), (0.5, 3)):
        held = patient_share(ids, fraction, seed)
        sd = np.sqrt(fraction * (1 - fraction) * len(ids))
        assert abs(len(held) - fraction * len(ids)) < 4 * sd
        # no bias by position: the first and second halves of the ids each get their share
        first = sum(int(p) <= 10000 for p in held)
        assert abs(first - fraction * 10000) < 4 * np.sqrt(fraction * (1 - fraction) * 10000)
    assert patient_share(ids, 0.1, 1) != patient_share(ids, 0.1, 2)  # the seed draws anew
    assert patient_share(ids[::-1], 0.1, 1) == patient_share(ids, 0.1, 1)  # order does not matter


def test_patient_share_is_never_empty_or_everything():
    for seed in range(200):
        two = patient_share(["a", "b"], 0.1, seed)
        assert len(two) == 1
        assert len(patient_share(["a", "b", "c"], 0.99, seed)) in (1, 2)
    assert patient_share(["a"], 0.5, 0) <= {"a"} and patient_share([], 0.5, 0) == set()


@pytest.mark.parametrize("official", [True, False])
def test_adding_or_removing_patients_moves_no_other_patient(tiny_data, official):
    frame, _, _ = load_frame(tiny_data, valid_pct=0.2, seed=1)
    frame = frame.drop(columns="split")
    lists = None
    if official:
        names = set(frame["image_index"])
        test = set((tiny_data / "test_list.txt").read_text().split())
        lists = OfficialLists(train_val=frozenset(names - test), test=frozenset(test))

    def sides(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SplitWarning)
            out, _ = assign_splits(f, lists, valid_pct=0.2, seed=1)
        return dict(zip(out["image_index"], out["split"]))

    before = sides(frame)
    newcomer = frame[frame["patient_id"] == frame["patient_id"].iloc[0]].assign(
        patient_id="999999", image_index=lambda f: "new_" + f["image_index"])
    if lists is not None:
        lists = OfficialLists(train_val=lists.train_val | frozenset(newcomer["image_index"]), test=lists.test)
    after = sides(pd.concat([frame, newcomer], ignore_index=True))
    assert {k: after[k] for k in before} == before
    gone = frame["patient_id"].drop_duplicates().iloc[3]
    fewer = sides(frame[frame["patient_id"] != gone])
    assert fewer == {k: v for k, v in before.items() if k in fewer}


def test_a_real_data_set_is_not_called_synthetic_and_generation_announces_itself(data_copy, tmp_path, capsys):
    (data_copy / "synthetic.json").unlink()  # the same files, without the generator's marker
    out, summary = check_data(data_copy, tmp_path / "run", capsys)
    assert summary["synthetic"] is False and "SYNTHETIC" not in out

    from cxrmem.data.prepare import ensure_synthetic
    from types import SimpleNamespace

    target = tmp_path / "mistyped"
    ensure_synthetic(SimpleNamespace(data_dir=target, dataset="chestxray14",
                                     synthetic=SimpleNamespace(n_patients=3, size=32, seed=0)))
    out = capsys.readouterr().out
    assert out.startswith(f"generating a synthetic ChestX-ray14 in {target}") and out.count("\n") == 1
    assert (target / "synthetic.json").is_file()
