"""``python -m cxrmem.data.synthetic`` (or ``cxrmem-synthetic``): write a synthetic data set, print one line."""

from __future__ import annotations

import argparse
import sys

from ...utils.commands import RERUN_TO_RESUME, add_shared_options, guarded
from .sites import WRITERS, generate_site
from .writing import format_summary, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem-synthetic",
        description="Write a synthetic data set in the exact on-disk layout of ChestX-ray14 (the default) or of "
                    "another data set (--dataset).")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--n-patients", type=int, default=100,
                        help="number of patients (about 3.6 images each; default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dataset", default="chestxray14", choices=("chestxray14", *WRITERS),
                        help="the format to write (default chestxray14; the others draw each site's own look)")
    return add_shared_options(parser, "workers", "debug")


@guarded(interrupted=RERUN_TO_RESUME)
def main(argv) -> int:
    """Generate the data set and print a one-line summary."""
    args = build_parser().parse_args(argv)
    if args.dataset != "chestxray14":
        result = generate_site(args.dataset, args.out, args.n_patients, size=args.size, seed=args.seed)
        print(f"{'kept' if result['skipped'] else 'wrote'} a synthetic {args.dataset}: {result['n_images']} images in "
              f"{result['out_dir']}")
        return 0
    print(format_summary(generate(args.out, args.n_patients, size=args.size, seed=args.seed, workers=args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
