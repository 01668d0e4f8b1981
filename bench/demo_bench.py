"""Where the demo's time goes: ``train.py`` on the demo config, timed stage by stage.

    python bench/demo_bench.py [--config configs/experiments/demo_synthetic.yaml] [--work DIR] [--set K=V ...]

Runs the demo as ``make demo`` does, in a fresh run folder under ``--work`` (default:
<tmp>/cxrmem_demo_bench), reading its output line by line as it arrives, and splits the wall time at
the lines each stage prints: start-up (imports, config), synthetic generation (first run only: the
data set is kept under ``--work`` for later runs), the LR finder, each training stage, prediction,
the AUCs with their bootstrap intervals (and report files), the pointing game, the plots. Prints
one row per stage with its seconds and share, the epoch times, the test mean AUC, and the total of
"training and report" (everything after generation). ``--set`` passes overrides to train.py.
``--record FILE`` also writes the stages, epoch times and the run's test metrics (mean and per-finding
AUC, positives per finding) as JSON: docs/figures/demo.json is the record docs/performance.md quotes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (stage name, the prefix of the line that starts it); the stage ends where the next one starts
MARKS = [
    ("synthetic generation", "generating a synthetic ChestX-ray14"),
    ("LR finder", "phase 1: LR finder (fastai"),
    ("phase 1, frozen", "phase 1: frozen stage"),
    ("phase 1, unfrozen", "phase 1: unfrozen stage"),
    ("phase 2", "phase 2: one_cycle stage"),
    ("prediction", "evaluating: predicting"),
    ("AUCs, bootstrap, report files", "evaluating: AUCs"),
    ("pointing game", "pointing game"),
    ("plots", None),  # from the last printed report line to "run folder:"
]


def run_demo(config: Path, run_dir: Path, data_dir: Path, overrides: list[str]) -> list[tuple[float, str]]:
    """The demo's stdout as (seconds since start, line), read as it is printed."""
    argv = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--output_dir", str(run_dir),
            "--data_dir", str(data_dir), "--overwrite"]
    for item in overrides:
        argv += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
    if proc.wait() != 0:
        sys.exit("the demo failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return lines


def stages(lines: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(stage, seconds) in the order they ran; start-up is everything before the first mark."""
    starts = []
    for name, prefix in MARKS:
        if prefix is None:
            continue
        hit = next((t for t, line in lines if line.startswith(prefix)), None)
        if hit is not None:
            starts.append((name, hit))
    end = next(t for t, line in lines if line.startswith("run folder:"))
    pointing = next((t for t, line in lines if line.startswith("pointing game")), None)
    last_report = max(t for t, line in lines if line.startswith(("Mean AUC", "Pointing game", "data: SYNTHETIC")))
    plots_start = max(last_report, pointing or 0.0)
    starts.append(("plots", plots_start))
    starts.sort(key=lambda item: item[1])
    rows = [("start-up (imports, config)", starts[0][1])]
    for (name, begin), (_, finish) in zip(starts, starts[1:] + [("end", end)]):
        rows.append((name, finish - begin))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "experiments" / "demo_synthetic.yaml")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrmem_demo_bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--record", type=Path, help="write the figures as JSON to this file")
    args = parser.parse_args()

    run_dir, data_dir = args.work / "run", args.work / "synthetic_demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f} before the run")
    lines = run_demo(args.config, run_dir, data_dir, args.overrides)

    rows = stages(lines)
    total = sum(seconds for _, seconds in rows)
    generation = sum(seconds for name, seconds in rows if name == "synthetic generation")
    print(f"\n{'stage':<32}{'seconds':>9}{'share':>8}")
    for name, seconds in rows:
        print(f"{name:<32}{seconds:>9.1f}{100 * seconds / total:>7.1f}%")
    print(f"{'total':<32}{total:>9.1f}")
    epochs = [line for _, line in lines if re.match(r"\s+[12]\s+(frozen|unfrozen|one_cycle)\s+\d+\s", line)]
    times = [line.split()[-2] if line.split()[-1] == "*" else line.split()[-1] for line in epochs]
    print(f"\nepochs: {len(epochs)}, times {' '.join(times)}")
    test_auc = [line for _, line in lines if line.startswith("Mean AUC Score")]
    if test_auc:
        print(f"test {test_auc[-1]}")
    print(f"training and report (all but generation): {total - generation:.1f} s")
    if args.record:
        test = json.loads((run_dir / "metrics.json").read_text())["test"]
        record = {"command": "python bench/demo_bench.py " + " ".join(sys.argv[1:]),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                  "config_sha256": hashlib.sha256(args.config.read_bytes()).hexdigest(),
                  "stages": dict(rows), "epoch_times": times, "training_and_report_s": round(total - generation, 1),
                  "test": {key: test[key] for key in ("mean_auc", "per_class", "n_positive")}}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
