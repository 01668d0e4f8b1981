"""``python -m cxrmem.export``: the older spelling of ``cxrmem export`` (:mod:`cxrmem.inference.export`)."""

import sys

from .inference.export import main

if __name__ == "__main__":
    sys.exit(main())
