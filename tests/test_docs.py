"""Figures the docs quote come from the code as it is: they match the records the benches wrote."""

from __future__ import annotations

import hashlib
import json

from conftest import EXPERIMENTS, ROOT

DOCS = ROOT / "docs"


def test_the_demo_figures_in_performance_md_are_those_of_its_recorded_run():
    record = json.loads((DOCS / "figures" / "demo.json").read_text())
    config = (EXPERIMENTS / "demo_synthetic.yaml").read_bytes()
    assert record["config_sha256"] == hashlib.sha256(config).hexdigest(), \
        "the demo config changed: rerun python bench/demo_bench.py --record docs/figures/demo.json"
    assert record["command"].startswith("python bench/demo_bench.py")
    text = (DOCS / "performance.md").read_text()
    demo = text[text.index("## The demo"):text.index("## Ablations")]
    test = record["test"]
    assert f"mean AUC **{test['mean_auc']:.4f}**" in demo
    for finding, auc in test["per_class"].items():
        assert f"{finding} {auc:.4f}" in demo, finding
    assert f"Hernia has {test['n_positive']['Hernia']} test positives" in demo
    assert f"**{record['training_and_report_s']:.1f}**" in demo
    for stage, seconds in record["stages"].items():
        assert f"| {stage} | {seconds:.1f} |" in demo, stage


def test_ablations_md_shows_the_demo_sweep_file_as_it_is():
    text = (ROOT / "docs" / "ablations.md").read_text()
    opening = "`demo_ablation.yaml`, as it is:\n\n```yaml\n"
    assert opening in text
    shown = text.split(opening, 1)[1].split("```\n", 1)[0]
    assert shown == (ROOT / "configs" / "sweeps" / "demo_ablation.yaml").read_text()
