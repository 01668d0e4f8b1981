"""``python -m cxrmem.predict``: the older spelling of ``cxrmem predict`` (:mod:`cxrmem.inference.predict`)."""

import sys

from .inference.predict import main

if __name__ == "__main__":
    sys.exit(main())
