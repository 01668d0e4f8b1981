"""Pretrained weights ahead of time, for compute nodes without internet.

``model.pretrained: true`` downloads a backbone's ImageNet weights on first use
into the torch cache (torchvision; ``TORCH_HOME`` moves it) or the Hugging Face
cache (timm; ``HF_HOME`` moves it), exactly as training will later read them.
Where the compute nodes have no internet, fetch them first on a machine that
has it and share or copy the printed folders::

    cxrmem-weights download efficientnet_v2_s resnet50 timm/convnext_tiny
    cxrmem-weights list                      # cached or not, file, URL and folder

``cxrmem weights`` and ``python -m cxrmem.weights`` are the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..utils.commands import add_shared_options, guarded
from .backbones import BACKBONES, TIMM_PREFIX, build_backbone, pretrained_file

__all__ = ["download", "main"]


def download(names: Sequence[str]) -> list[tuple[str, Path, bool]]:
    """Fetch each backbone's pretrained file into its cache the way training does (and load it once).

    Returns ``(name, cached file, downloaded now)``. Every name is checked before anything is fetched.
    """
    files = {name: pretrained_file(name) for name in names}
    fetched = []
    for name, file in files.items():
        was_cached = file is not None and file.cached() is not None
        build_backbone(name, pretrained=True)  # the one download path; also proves the file loads
        fetched.append((name, file.cached(), not was_cached))
    return fetched


def _download(args) -> int:
    for name, path, downloaded in download(args.backbones):
        print(f"{name}: {path} ({'downloaded' if downloaded else 'already cached'})")
    return 0


def _list(args) -> int:
    names = args.backbones or list(BACKBONES)
    width = max(len(name) for name in names)
    for name in names:
        file = pretrained_file(name)
        if file is None:
            print(f"{name:<{width}}  no pretrained weights")
        elif file.cached() is not None:
            print(f"{name:<{width}}  cached      {file.cached()}")
        else:
            print(f"{name:<{width}}  not cached  {file.url} -> {file.folder}")
    if not args.backbones:
        print(f"(and any timm model as {TIMM_PREFIX}<name>: cxrmem-weights list {TIMM_PREFIX}convnext_tiny)")
    return 0


#: sub-command -> what it does
COMMANDS = {"download": _download, "list": _list}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem-weights",
        description="Fetch pretrained backbone weights into the torch / Hugging Face caches ahead of training.",
    )
    common = add_shared_options(argparse.ArgumentParser(add_help=False), "debug")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", parents=[common],
                                help="download the weights of these backbones and print where they went")
    fetch.add_argument("backbones", nargs="+", metavar="BACKBONE",
                       help=f"{', '.join(BACKBONES)} or {TIMM_PREFIX}<timm model>")
    show = commands.add_parser("list", parents=[common], help="show, per backbone, whether its weights are cached, or URL and folder")
    show.add_argument("backbones", nargs="*", metavar="BACKBONE", help="default: every torchvision backbone")
    return parser


@guarded
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
