"""Figures the docs quote come from the code as it is: they match the records the benches wrote."""

from __future__ import annotations

import hashlib
import json

from helpers import EXPERIMENTS, ROOT

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


def documented_commands(markdown: str) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined."""
    commands, block = [], None
    for line in markdown.splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() == "```bash" else None
            continue
        if block is None:
            continue
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1] + " " + line.strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.split(" #")[0].strip())
    return commands


def test_every_command_of_getting_started_parses_with_its_entry_point():
    """Each documented command line is accepted by the argument parser of the program it names."""
    import shlex

    from cxrmem.report import compare
    from cxrmem.inference import export, predict
    from cxrmem import sweep
    from cxrmem.experiment import legacy_parser, train_parser

    parsers = {"train.py": train_parser, "train_fastai.py": legacy_parser, "cxrmem-predict": predict.parser,
               "cxrmem-export": export.parser, "cxrmem-compare": compare.build_parser, "cxrmem-sweep": sweep.parser}
    commands = documented_commands((ROOT / "docs" / "getting-started.md").read_text())
    checked = set()
    for command in commands:
        words = shlex.split(command)
        if words[0] == "python":
            words = words[1:]
        if words[0] not in parsers:
            assert words[0] in {"make", "."}, command
            continue
        parsers[words[0]]().parse_args(words[1:])  # SystemExit (a failed test) on an unknown option
        checked.add(words[0])
    assert checked == set(parsers) - {"train_fastai.py"}
