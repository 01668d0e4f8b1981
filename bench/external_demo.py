"""Train on synthetic ChestX-ray14, test on four synthetic sites: the demo of external validation.

    python bench/external_demo.py [--run runs/demo_synthetic] [--sites data/synthetic_sites] [--record FILE]

Uses the finished demo run (``make demo``; trained first with the demo config when the run folder
holds none), writes one synthetic set per site in its publisher's format (CheXpert, MIMIC-CXR-JPG,
PadChest, VinDr-CXR; 400 patients each at the demo's 128 px, each with its own acquisition look),
then runs ``cxrmem evaluate --run RUN --dataset D --data_dir DIR`` on each. Prints one row per test
set: its images, the findings scored, the mean AUC with its patient-level 95% interval, the run's
own test split scored on the same findings (the fair reference), and the seconds each step took. ``--record FILE`` writes the rows as JSON (docs/figures/external_demo.json
is the record docs/datasets.md quotes).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = {"chexpert": 1, "mimic_cxr": 2, "padchest": 3, "vindr_cxr": 4}  # data set -> generator seed
N_PATIENTS, SIZE = 400, 128


def run(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxrmem", *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def row(name: str, metrics: dict, seconds: float, images: int) -> dict:
    return {"test_set": name, "images": images, "findings": list(metrics["per_class"]),
            "mean_auc": metrics["mean_auc"], "mean_auc_ci95": metrics["mean_auc_ci95"], "seconds": round(seconds, 1)}


def own_test_on(run_dir: Path, findings: list[str]) -> dict:
    """The run's own test split scored on ``findings`` only (the same bootstrap as its report): the fair
    reference of an external set that grades those findings."""
    from cxrmem.config import load_config
    from cxrmem.data.chestxray14 import patient_ids
    from cxrmem.evaluation.auc import make_resampler
    from cxrmem.report import evaluate_split
    from cxrmem.runs.folder import find_predictions, load_split

    cfg = load_config(run_dir / "config.yaml", output_dir=str(run_dir))
    test = load_split(find_predictions(run_dir), "test", "score the run's own test split")
    columns = [test.labels.index(f) for f in findings]
    result = evaluate_split(test.probs[:, columns], test.targets[:, columns], findings,
                            cfg.evaluation.bootstrap_resamples, cfg.data.seed,
                            resampler=make_resampler(cfg.evaluation.bootstrap_unit, patient_ids(test.names)))
    return {"mean_auc": result["mean_auc"], "mean_auc_ci95": result["mean_auc_ci95"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo_synthetic", help="the demo's run folder")
    parser.add_argument("--sites", default="data/synthetic_sites", help="where the synthetic sites are written")
    parser.add_argument("--record", help="write the rows as JSON to this file")
    args = parser.parse_args()
    run_dir, sites = ROOT / args.run, ROOT / args.sites
    trained = 0.0
    if not (run_dir / "metrics.json").is_file():
        trained = run(["train", "--config", "configs/experiments/demo_synthetic.yaml", "--output_dir", str(run_dir)])
    own = json.loads((run_dir / "metrics.json").read_text())["test"]
    rows = [row("synthetic ChestX-ray14 (own test split)", own, trained, own["n_images"])]
    for dataset, seed in SITES.items():
        generated = run(["synthetic", "--dataset", dataset, "--out", str(sites / dataset), "--n-patients",
                         str(N_PATIENTS), "--size", str(SIZE), "--seed", str(seed)])
        evaluated = run(["evaluate", "--run", str(run_dir), "--dataset", dataset, "--data_dir", str(sites / dataset)])
        metrics = json.loads((run_dir / "external" / dataset / "metrics.json").read_text())["test"]
        rows.append(row(f"synthetic {dataset}", metrics, evaluated, metrics["n_images"]) | {
            "generation_seconds": round(generated, 1), "own_test_same_findings": own_test_on(run_dir, list(metrics["per_class"]))})

    def auc_text(entry):
        low, high = entry["mean_auc_ci95"] or (None, None)
        return f"{entry['mean_auc']:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")

    print("| test set | images | findings | mean AUC [95% CI, patients] | own test split, same findings | "
          "generation + evaluation s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        own = r.get("own_test_same_findings")
        seconds = f"{r.get('generation_seconds', 0)} + {r['seconds']}" if own else \
            f"{r['seconds']} (training)" if r["seconds"] else "(trained before)"
        print(f"| {r['test_set']} | {r['images']} | {len(r['findings'])} | {auc_text(r)} | "
              f"{auc_text(own) if own else '(itself)'} | {seconds} |")
    if args.record:
        Path(args.record).write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                                 "run": args.run, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
