"""``python -m cxrmem.weights``: the older spelling of ``cxrmem weights`` (:mod:`cxrmem.models.weights`)."""

import sys

from .models.weights import main

if __name__ == "__main__":
    sys.exit(main())
