"""The layers of src/cxrmem, and the names a user types: one ``cxrmem`` command, every older spelling kept."""

from __future__ import annotations

import ast
import importlib.metadata
import runpy
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from cxrmem import cli

from helpers import ROOT

SRC = ROOT / "src" / "cxrmem"


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    contract = next(c for c in config if c["type"] == "layers")
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def test_the_layers_contract_names_every_package_and_module():
    named = {name for layer in layers() for name in layer}
    children = {f"cxrmem.{p.stem}" for p in SRC.glob("*.py") if p.stem != "__init__"}
    children |= {f"cxrmem.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert children - named == set(), "add these to [tool.importlinter] layers in pyproject.toml"
    assert named - children == set()


def test_imports_flow_downward_only():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def imported_modules(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: always one of ours
        return [f"cxrmem.(relative from {module})"]
    return [node.module or ""]


def test_no_function_level_import_of_a_cxrmem_module():
    """A lazy import is for an optional extra only; never to step around a cycle."""
    found = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                for name in imported_modules(node, path.name):
                    if name.startswith("cxrmem"):
                        found.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    assert found == []


def test_cxrmem_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "check-data", "cache", "synthetic", "compare", "sweep", "predict", "export",
                 "weights"):
        assert f"  {name} " in out


def test_an_unknown_subcommand_is_one_line_with_a_suggestion(capsys):
    assert cli.main(["sweeep"]) == 2
    assert capsys.readouterr().err == "error: no subcommand 'sweeep'; did you mean sweep?\n"


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_answers_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def console_scripts():
    return sorted((ep for ep in importlib.metadata.entry_points(group="console_scripts")
                   if ep.value.startswith("cxrmem.")), key=lambda ep: ep.name)


def test_every_script_name_is_installed_and_runs():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {ep.name: ep.value for ep in console_scripts()}
    assert installed == declared  # after a change of pyproject.toml: pip install -e .
    for ep in console_scripts():
        assert exit_status(ep.load(), ["--help"]) == 0, ep.name


def exit_status(main, argv) -> int:
    """What ``main(argv)`` exits with, whether it returns the status or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("form", ["cxrmem", "cxrmem.compare", "cxrmem.predict", "cxrmem.export", "cxrmem.weights",
                                  "cxrmem.sweep", "cxrmem.data.cache", "cxrmem.data.synthetic", "train.py",
                                  "train_fastai.py"])
def test_every_python_dash_m_form_and_script_file_runs(form, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [form, "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as stop:
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": already imported by the tests
        if form.endswith(".py"):
            runpy.run_path(str(ROOT / form), run_name="__main__")
        else:
            runpy.run_module(form, run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out
