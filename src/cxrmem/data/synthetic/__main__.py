"""``python -m cxrmem.data.synthetic`` (or ``cxrmem-synthetic``): write a synthetic data set, print one line."""

from __future__ import annotations

import argparse
import sys

from ...utils.commands import RERUN_TO_RESUME, add_shared_options, guarded
from .writing import format_summary, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem-synthetic",
        description="Write a synthetic data set in ChestX-ray14's exact on-disk layout.")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--n-patients", type=int, default=100,
                        help="number of patients (about 3.6 images each; default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return add_shared_options(parser, "workers", "debug")


@guarded(interrupted=RERUN_TO_RESUME)
def main(argv) -> int:
    """Generate the data set and print a one-line summary."""
    args = build_parser().parse_args(argv)
    print(format_summary(generate(args.out, args.n_patients, size=args.size, seed=args.seed, workers=args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
