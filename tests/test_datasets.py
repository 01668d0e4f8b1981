"""Data sets beyond ChestX-ray14: each read as shipped (synthetic sets in each publisher's format), one label
space, the uncertainty policies, the view filter, masking, and external validation of a trained run.

Counts are checked against an independent pandas count of the label file the generator wrote.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrmem.cli import main as cxrmem_main
from cxrmem.config import DATASET_NAMES, UNCERTAIN_POLICIES as SCHEMA_POLICIES
from cxrmem.data.findings import FINDINGS, dataset_findings, label_map, label_space
from cxrmem.data.loaders import build_dataloaders
from cxrmem.data.registry import DATASETS, get_dataset
from cxrmem.data.release import SMOOTH_RANGE, UNCERTAIN_POLICIES
from cxrmem.data.split import phase_frame
from cxrmem.data.synthetic.sites import generate_site
from cxrmem.experiment import train_main
from cxrmem.runs.folder import load_predictions
from cxrmem.train.losses import build_loss

from helpers import run_cli, tiny_config

SITES = ("chexpert", "mimic_cxr", "padchest", "vindr_cxr")
VALUES = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """One small synthetic set per format (30 patients, 32 px), and nih_google on tiny_data's images."""
    root = tmp_path_factory.mktemp("sites")
    for dataset in SITES:
        generate_site(dataset, root / dataset, n_patients=30, size=32, seed=5)
    generate_site("nih_google", root / "nih_google", n_patients=60, size=32, seed=3)  # tiny_data's plan
    return root


def data_cfg(**changes):
    base = dict(valid_pct=0.25, seed=0, missing_images="error", views="all", uncertain="ignore",
                mimic_labeler="chexpert", radiologists="any")
    return SimpleNamespace(**{**base, **changes})


def load(sites, dataset, findings=None, **changes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_dataset(dataset).load(sites / dataset, data_cfg(**changes), findings or dataset_findings(dataset))


def count(values: pd.Series) -> dict:
    return {"positive": int((values == 1).sum()), "negative": int((values == 0).sum()),
            "uncertain": int((values == -1).sum()), "missing": int(values.isna().sum())}


def four_value_frame(path, labels) -> pd.DataFrame:
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    return raw[list(labels)].replace("", np.nan).astype(float)


def file_counts(sites: Path, dataset: str) -> dict:
    """{part: {label: counts}} straight from the files: part 'train_val' and 'test', or 'all' without a split."""
    folder = sites / dataset
    if dataset == "chexpert":
        labels = list(label_map("chexpert"))
        return {part: {l: count(four_value_frame(folder / name, labels)[l]) for l in labels}
                for part, name in (("train_val", "train.csv"), ("test", "valid.csv"))}
    if dataset == "mimic_cxr":
        labels = list(label_map("mimic_cxr"))
        studies = pd.read_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
        meta = pd.read_csv(folder / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
        split = pd.read_csv(folder / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
        rows = meta.merge(split[["dicom_id", "split"]], on="dicom_id").merge(studies, on=["subject_id", "study_id"])
        values = rows[labels].replace("", np.nan).astype(float)
        test = rows["split"].eq("test").to_numpy()
        return {"train_val": {l: count(values.loc[~test, l]) for l in labels},
                "test": {l: count(values.loc[test, l]) for l in labels}}
    if dataset == "padchest":
        raw = pd.read_csv(next(folder.glob("PADCHEST_*.csv")), dtype=str)
        lists = raw["Labels"].map(ast.literal_eval)
        return {"all": {l: count(lists.map(lambda found, l=l: float(l in found))) for l in label_map("padchest")}}
    if dataset == "vindr_cxr":
        out = {}
        for part, name in (("train_val", "image_labels_train.csv"), ("test", "image_labels_test.csv")):
            raw = pd.read_csv(folder / "annotations" / name)
            per_image = raw.drop(columns=[c for c in ("rad_id",) if c in raw]).groupby("image_id").max()
            out[part] = {l: count(per_image[l].astype(float)) for l in label_map("vindr_cxr")}
        return out
    if dataset == "nih_google":
        raw = pd.read_csv(folder / "google2019_nih-chest-xray-labels.csv", dtype=str, keep_default_na=False)
        values = raw[list(label_map("nih_google"))].replace({"YES": 1.0, "NO": 0.0, "": np.nan}).astype(float)
        test = raw["Set Id"].eq("test").to_numpy()
        return {"train_val": {l: count(values.loc[~test, l]) for l in values},
                "test": {l: count(values.loc[test, l]) for l in values}}
    raise ValueError(dataset)


def summary_counts(summary: dict, parts) -> dict:
    total = {}
    for split in parts:
        for label, counts in summary[split]["labels"].items():
            slot = total.setdefault(label, dict.fromkeys(counts, 0))
            for key, n in counts.items():
                slot[key] += n
    return total


def test_the_registry_holds_the_schema_names_and_every_label_is_mapped_to_the_label_space():
    assert tuple(DATASETS) == DATASET_NAMES
    assert tuple(UNCERTAIN_POLICIES) == SCHEMA_POLICIES
    space = set(label_space())
    for name in DATASET_NAMES:
        assert all(f is None or f in space for f in label_map(name).values())
    assert dataset_findings("chestxray14") == FINDINGS
    # never silently merged: VinDr's and Google's "nodule or mass" is its own finding
    assert label_map("vindr_cxr")["Nodule/Mass"] == label_map("nih_google")["Nodule or mass"] == "Nodule or Mass"


@pytest.mark.parametrize("dataset", [*SITES, "nih_google"])
def test_check_data_counts_the_label_file_as_pandas_does(dataset, sites, tmp_path, capsys):
    config = tiny_config(tmp_path / "site.yaml", data={"dataset": dataset, "views": "all"})
    status, out, err = run_cli(train_main, ["--config", config, "--data_dir", sites / dataset, "--output_dir",
                                            tmp_path / "run", "--check-data"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["dataset"] == dataset and summary["findings"] == dataset_findings(dataset)
    expected = file_counts(sites, dataset)
    if "all" in expected:
        assert summary["split_source"] == "derived"
        assert summary_counts(summary, ("train", "valid", "test")) == expected["all"]
    else:
        assert summary["split_source"] == "official"
        assert summary_counts(summary, ("train", "valid")) == expected["train_val"]
        assert summary_counts(summary, ("test",)) == expected["test"]
    assert "positives per finding" in out


def test_nih_google_counts_yes_and_no_per_set(sites):
    loaded = load(sites, "nih_google")
    raw = pd.read_csv(sites / "nih_google" / "google2019_nih-chest-xray-labels.csv", dtype=str)
    for label in label_map("nih_google"):
        test_rows = raw["Set Id"] == "test"
        assert loaded.labels["test"][label]["positive"] == int((raw.loc[test_rows, label] == "YES").sum())
        assert loaded.labels["test"][label]["negative"] == int((raw.loc[test_rows, label] == "NO").sum())
    assert set(loaded.frame.loc[loaded.frame["split"] == "test", "image_index"]) == \
        set(raw.loc[raw["Set Id"] == "test", "Image Index"])


def test_uncertainty_policies_change_exactly_the_uncertain_training_labels(sites):
    findings = dataset_findings("chexpert")
    frames = {p: load(sites, "chexpert", uncertain=p).frame for p in ("ignore", "zeros", "ones", "smooth")}
    # the same rows in the same order under every policy
    for frame in frames.values():
        assert frame["image_index"].tolist() == frames["ignore"]["image_index"].tolist()
    raw = load(sites, "chexpert", uncertain="ignore")
    # which cells are uncertain, from the file: a finding is uncertain when one of its labels is -1 and none is 1
    files = pd.concat([pd.read_csv(sites / "chexpert" / n, dtype=str, keep_default_na=False)
                       for n in ("train.csv", "valid.csv")]).set_index("Path")
    meaning = label_map("chexpert")
    cells = {}
    for finding in findings:
        values = files[[label for label, f in meaning.items() if f == finding]].replace("", np.nan).astype(float)
        cells[finding] = (values == -1).any(axis=1) & ~(values == 1).any(axis=1)
    uncertain = pd.DataFrame(cells).loc[raw.frame["image_index"]].to_numpy()
    training = raw.frame["split"].eq("train").to_numpy()[:, None]
    assert (uncertain & training).sum() > 5 and (uncertain & ~training).sum() > 0
    for policy, frame in frames.items():  # outside training (valid here; CheXpert's test has none) always missing
        assert np.isnan(frame[findings].to_numpy()[uncertain & ~training]).all()
    uncertain = uncertain & training
    ignore, zeros, ones, smooth = (frames[p][findings].to_numpy() for p in ("ignore", "zeros", "ones", "smooth"))
    certain = ~uncertain
    for other in (zeros, ones, smooth):
        np.testing.assert_array_equal(other[certain], ignore[certain])
    assert np.isnan(ignore[uncertain]).all()
    assert (zeros[uncertain] == 0).all() and (ones[uncertain] == 1).all()
    lo, hi = SMOOTH_RANGE
    assert ((smooth[uncertain] >= lo) & (smooth[uncertain] <= hi)).all() and np.unique(smooth[uncertain]).size > 1


def test_uncertain_labels_outside_training_are_missing(sites):
    """MIMIC's test studies carry uncertain labels: under every policy they are missing there."""
    for policy in ("zeros", "ones"):
        loaded = load(sites, "mimic_cxr", uncertain=policy)
        evaluated = loaded.frame[loaded.frame["split"] != "train"]
        uncertain_in_file = sum(c["uncertain"] for split in ("valid", "test") for c in loaded.labels[split].values())
        assert uncertain_in_file > 0
        values = evaluated[dataset_findings("mimic_cxr")].to_numpy()
        assert np.isnan(values).sum() >= 1 and set(np.unique(values[~np.isnan(values)])) <= {0.0, 1.0}


@pytest.mark.parametrize("dataset, views, column, kept", [
    ("chexpert", "frontal", "Frontal/Lateral", lambda raw: raw["Frontal/Lateral"] == "Frontal"),
    ("chexpert", "LATERAL", "Frontal/Lateral", lambda raw: raw["Frontal/Lateral"] == "Lateral"),
    ("padchest", "PA", "Projection", lambda raw: raw["Projection"] == "PA"),
    ("padchest", "all", "Projection", lambda raw: raw["Projection"].notna()),
])
def test_the_view_filter_keeps_exactly_the_chosen_views(sites, dataset, views, column, kept):
    files = {"chexpert": ["train.csv", "valid.csv"], "padchest": [p.name for p in (sites / "padchest").glob("PADCHEST_*")]}
    raw = pd.concat([pd.read_csv(sites / dataset / n, dtype=str, keep_default_na=False) for n in files[dataset]])
    key = "Path" if dataset == "chexpert" else "ImageID"
    expected = set(raw.loc[kept(raw).to_numpy(), key])
    frame = load(sites, dataset, views=views).frame
    assert set(frame["image_index"]) == expected and len(frame) == len(expected)


def test_a_finding_the_data_set_lacks_gets_no_gradient(sites):
    """A model of ChestX-ray14's 14 findings trained on CheXpert: Infiltration, Nodule, ... are missing
    for every image, so their logits get exactly zero gradient; the shared ones do get one."""
    loaded = load(sites, "chexpert", findings=FINDINGS, views="frontal")
    rows = phase_frame(loaded.frame, filter_normal=False, findings=FINDINGS)
    cfg = SimpleNamespace(image_size=32, num_workers=0, augment=False)
    dls = build_dataloaders(rows, cfg, 16, torch.device("cpu"), ((0.5,) * 3, (0.25,) * 3), FINDINGS)
    _, targets = dls.one_batch()
    lacking = [FINDINGS.index(f) for f in FINDINGS if f not in dataset_findings("chexpert")]
    assert lacking and torch.isnan(targets[:, lacking]).all()
    logits = torch.zeros(targets.shape, requires_grad=True)
    build_loss("bce")(logits, targets).backward()
    assert (logits.grad[:, lacking] == 0).all()
    graded = [FINDINGS.index(f) for f in dataset_findings("chexpert") if f in FINDINGS]
    known = ~torch.isnan(targets[:, graded])
    assert (logits.grad[:, graded][known] != 0).all()


def test_bad_label_values_are_one_line_errors(sites, tmp_path, capsys):
    import shutil
    folder = tmp_path / "chexpert"
    shutil.copytree(sites / "chexpert", folder)
    text = (folder / "valid.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[6] = "maybe"
    (folder / "valid.csv").write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    config = tiny_config(tmp_path / "c.yaml", data={"dataset": "chexpert"})
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", folder, "--output_dir", tmp_path / "r",
                                          "--check-data"], capsys)
    assert status == 2 and err.count("\n") == 1 and "line 2" in err and "'maybe'" in err


# --------------------------------------------------------------------------- external validation


@pytest.mark.slow
def test_external_evaluation_scores_the_shared_findings_as_sklearn_does(finished_run, sites, tmp_path, capsys):
    import shutil
    _, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for dataset in SITES:
        status, out, err = run_cli(cxrmem_main, ["evaluate", "--run", run_dir, "--dataset", dataset,
                                                 "--data_dir", sites / dataset], capsys)
        assert status == 0, err
        folder = run_dir / "external" / dataset
        info = json.loads((folder / "external.json").read_text())
        shared = [f for f in FINDINGS if f in dataset_findings(dataset)]
        assert info["findings"] == shared and info["trained_on"] == "chestxray14"
        metrics = json.loads((folder / "metrics.json").read_text())["test"]
        assert set(metrics["per_class"]) == set(shared)
        payload = load_predictions(next(folder.glob("*_predictions.pt")))
        probs, targets = np.asarray(payload["probs"]), np.asarray(payload["targets"])
        assert list(payload["labels"]) == shared
        if dataset == "chexpert":  # the patient bootstrap of compare and sweep resamples these
            assert all(p.startswith("patient") for p in payload["patient_id"]) and len(set(payload["patient_id"])) > 5
        for c, finding in enumerate(shared):
            rows = np.isfinite(targets[:, c])
            y = targets[rows, c]
            if 0 < y.sum() < y.size:
                assert metrics["per_class"][finding] == pytest.approx(roc_auc_score(y, probs[rows, c]), abs=1e-12)
            else:
                assert metrics["per_class"][finding] is None
        assert (folder / "report.md").is_file() and (folder / "roc_test.png").is_file()
    # the run's own results are untouched
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((finished / "metrics.json").read_text())


@pytest.mark.slow
def test_nih_google_is_external_only_where_disjoint_from_training(finished_run, sites, tmp_path, capsys):
    import shutil
    _, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    status, _, err = run_cli(cxrmem_main, ["evaluate", "--run", run_dir, "--dataset", "nih_google", "--data_dir",
                                           sites / "nih_google", "--split", "train"], capsys)
    assert status == 2 and "no external test" in err and err.count("\n") == 1
    assert not (run_dir / "external").exists()
    status, out, err = run_cli(cxrmem_main, ["evaluate", "--run", run_dir, "--dataset", "nih_google", "--data_dir",
                                             sites / "nih_google"], capsys)
    assert status == 0, err
    info = json.loads((run_dir / "external" / "nih_google" / "external.json").read_text())
    assert info["image_overlap"]["disjoint_from_training"] and info["findings"] == ["Pneumothorax"]


@pytest.mark.slow
def test_evaluation_external_runs_at_the_end_of_training(tiny_data, sites, tmp_path, capsys):
    config = tiny_config(tmp_path / "c.yaml", phase2=None,
                         evaluation={"bootstrap_resamples": 5,
                                     "external": [{"dataset": "padchest", "data_dir": str(sites / "padchest")}]})
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir",
                                          tmp_path / "run"], capsys)
    assert status == 0, err
    assert (tmp_path / "run" / "external" / "padchest" / "metrics.json").is_file()
    missing = tiny_config(tmp_path / "m.yaml", evaluation={"external": [{"dataset": "vindr_cxr",
                                                                         "data_dir": str(tmp_path / "nowhere")}]})
    status, _, err = run_cli(train_main, ["--config", missing, "--data_dir", tiny_data, "--output_dir",
                                          tmp_path / "run2"], capsys)
    assert status == 2 and "evaluation.external" in err and not (tmp_path / "run2" / "models").exists()


# --------------------------------------------------------------------------- a union of data sets


@pytest.mark.slow
def test_a_union_of_two_data_sets_trains_both_phases_and_reports_each(sites, tmp_path, capsys):
    members = [{"dataset": "chexpert", "data_dir": str(sites / "chexpert")},
               {"dataset": "padchest", "data_dir": str(sites / "padchest")}]
    config = tiny_config(tmp_path / "union.yaml", data={"datasets": members, "valid_pct": 0.25},
                         evaluation={"bootstrap_resamples": 5})
    status, out, err = run_cli(train_main, ["--config", config, "--output_dir", tmp_path / "check", "--check-data"],
                               capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "check" / "data_summary.json").read_text())
    union = [f for f in label_space() if f in set(dataset_findings("chexpert")) | set(dataset_findings("padchest"))]
    assert summary["findings"] == union and set(summary["datasets"]) == {"chexpert", "padchest"}
    for name in ("chexpert", "padchest"):
        alone = load(sites, name, findings=union, views="frontal", valid_pct=0.25)
        member = summary["datasets"][name]
        assert member["test"]["n_images"] == int((alone.frame["split"] == "test").sum())
        assert member["test"]["labels"] == alone.labels["test"]
    assert summary["test"]["n_images"] == sum(summary["datasets"][n]["test"]["n_images"] for n in ("chexpert", "padchest"))

    run_dir = tmp_path / "run"
    status, out, err = run_cli(train_main, ["--config", config, "--output_dir", run_dir], capsys)
    assert status == 0, err
    assert (run_dir / "history_phase1.csv").is_file() and (run_dir / "history_phase2.csv").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]["by_dataset"]) == {"chexpert", "padchest"}
    # a finding only PadChest grades (Nodule) has no figure on CheXpert's images, and one there on PadChest's
    payload = load_predictions(next(run_dir.glob("*_predictions.pt")))
    labels = list(payload["labels"])
    targets = np.asarray(payload["targets"])
    chexpert_rows = np.array([str(n).startswith("CheXpert") for n in payload["image_index"]])
    assert all(str(p).startswith(("chexpert:", "padchest:")) for p in payload["patient_id"])
    assert np.isnan(targets[chexpert_rows, labels.index("Nodule")]).all()
    assert metrics["test"]["by_dataset"]["chexpert"]["per_class"]["Nodule"] is None
    assert metrics["test"]["by_dataset"]["chexpert"]["n_labelled"]["Nodule"] == 0
    assert "padchest: mean AUC" in out


def test_the_label_mapping_table_of_the_docs_is_label_map_csv():
    from cxrmem.data.findings import load_label_map
    text = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    table = text.split("## The label mapping table", 1)[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and not line.startswith("| data set")]
    documented = [(r[0].strip("| "), r[1], r[2]) for r in rows]
    assert documented == [(m.dataset, m.label, m.finding or "(none)") for m in load_label_map()]


def test_vindr_kaggle_layout_any_and_majority_of_the_radiologists(sites, tmp_path):
    """Kaggle's train.csv: one row per box or per "No finding" reading. Three images read by three
    radiologists each; a finding is positive when any (or more than half) of them mark it."""
    import shutil
    folder = tmp_path / "vinbigdata"
    (folder / "train").mkdir(parents=True)
    dicoms = sorted((sites / "vindr_cxr" / "train").glob("*.dicom"))[:3]
    ids = [p.stem for p in dicoms]
    for p in dicoms:
        shutil.copy(p, folder / "train" / p.name)
    rows = [  # image, class, rad
        (ids[0], "Cardiomegaly", "R1"), (ids[0], "Cardiomegaly", "R2"), (ids[0], "No finding", "R3"),
        (ids[1], "Nodule/Mass", "R1"), (ids[1], "Nodule/Mass", "R1"), (ids[1], "No finding", "R2"),
        (ids[1], "No finding", "R3"), (ids[2], "No finding", "R4"), (ids[2], "No finding", "R5"),
        (ids[2], "Pleural effusion", "R6"),
    ]
    lines = ["image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"]
    for image, name, rad in rows:
        box = ",,," if name == "No finding" else "2,3,10,12"
        lines.append(f"{image},{name},0,{rad},{box}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    findings = dataset_findings("vindr_cxr")
    for rule, expected in (("any", {ids[0]: {"Cardiomegaly"}, ids[1]: {"Nodule or Mass"}, ids[2]: {"Effusion"}}),
                           ("majority", {ids[0]: {"Cardiomegaly"}, ids[1]: set(), ids[2]: set()})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = get_dataset("vindr_cxr").load(folder, data_cfg(radiologists=rule, valid_pct=0.0), findings)
        assert loaded.split_source == "derived"
        frame = loaded.frame.set_index("image_index")
        for image, positive in expected.items():
            assert {f for f in findings if frame.loc[image, f] == 1} == positive, (rule, image)
        # labels only PhysioNet's release has (Edema, Emphysema, ...) are missing, the Kaggle classes negative
        assert frame[["Edema", "Emphysema"]].isna().all().all()
        assert (frame.loc[ids[2], ["Cardiomegaly", "Atelectasis"]] == 0).all()
    assert len(loaded.boxes) == 5 and set(loaded.boxes["finding"]) == {"Cardiomegaly", "Nodule or Mass", "Effusion"}


def test_vindr_boxes_come_in_the_common_1024_px_frame(sites):
    """The reader rescales each box by its image's stored size (the DICOM header), read here with pydicom."""
    import pydicom
    loaded = load(sites, "vindr_cxr")
    raw = pd.read_csv(sites / "vindr_cxr" / "annotations" / "annotations_train.csv")
    raw = pd.concat([raw, pd.read_csv(sites / "vindr_cxr" / "annotations" / "annotations_test.csv")])
    assert len(loaded.boxes) == len(raw) > 0
    first = raw.iloc[0]
    folder = "train" if (sites / "vindr_cxr" / "train" / f"{first['image_id']}.dicom").is_file() else "test"
    header = pydicom.dcmread(sites / "vindr_cxr" / folder / f"{first['image_id']}.dicom", stop_before_pixels=True)
    box = loaded.boxes.iloc[0]
    assert box["x"] == pytest.approx(first["x_min"] * 1024 / header.Columns)
    assert box["h"] == pytest.approx((first["y_max"] - first["y_min"]) * 1024 / header.Rows)
    assert set(loaded.boxes["finding"]) <= set(dataset_findings("vindr_cxr"))


def test_mimic_reads_the_negbio_labels_when_asked(sites, tmp_path):
    import shutil
    folder = tmp_path / "mimic"
    shutil.copytree(sites / "mimic_cxr", folder)
    chexpert_file = folder / "mimic-cxr-2.0.0-chexpert.csv.gz"
    negbio = pd.read_csv(chexpert_file, dtype=str, keep_default_na=False)
    negbio["Edema"] = "1.0"  # the other labeller's file: a different reading of every study
    negbio.to_csv(folder / "mimic-cxr-2.0.0-negbio.csv.gz", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = data_cfg(mimic_labeler="negbio")
        frame = get_dataset("mimic_cxr").load(folder, cfg, dataset_findings("mimic_cxr")).frame
        default = get_dataset("mimic_cxr").load(folder, data_cfg(), dataset_findings("mimic_cxr")).frame
    assert (frame["Edema"] == 1).all() and not (default["Edema"] == 1).all()


def test_data_synthetic_generates_the_chosen_format_on_first_use(tmp_path, capsys):
    config = tiny_config(tmp_path / "c.yaml", data={"dataset": "padchest", "synthetic": {"n_patients": 10, "size": 32}})
    status, out, err = run_cli(train_main, ["--config", config, "--data_dir", tmp_path / "pc", "--output_dir",
                                            tmp_path / "run", "--check-data"], capsys)
    assert status == 0, err
    assert "generating a synthetic padchest" in out and "SYNTHETIC" in out
    assert list((tmp_path / "pc").glob("PADCHEST_*.csv"))
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["dataset"] == "padchest" and summary["synthetic"] is True


@pytest.mark.parametrize("dataset, named", [("chexpert", "train.csv"), ("mimic_cxr", "mimic-cxr-2.0.0-chexpert.csv"),
                                            ("padchest", "PADCHEST_"), ("vindr_cxr", "image_labels_train.csv"),
                                            ("nih_google", "google2019_nih-chest-xray-labels.csv")])
def test_a_folder_without_the_label_file_is_a_one_line_error(dataset, named, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    config = tiny_config(tmp_path / "c.yaml", data={"dataset": dataset})
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tmp_path / "empty", "--output_dir",
                                          tmp_path / "run", "--check-data"], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err


def test_a_model_finding_no_training_image_grades_is_warned_about(tiny_data, tmp_path, capsys):
    config = tiny_config(tmp_path / "c.yaml", model={"findings": ["Effusion", "Fracture"]})
    with pytest.warns(UserWarning, match="Fracture is labelled on no training image"):
        status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir",
                                              tmp_path / "run", "--check-data"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["findings"] == ["Effusion", "Fracture"] and summary["test"]["positives"]["Fracture"] == 0
