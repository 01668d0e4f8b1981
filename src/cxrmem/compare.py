"""``python -m cxrmem.compare``: the older spelling of ``cxrmem compare`` (:mod:`cxrmem.report.compare`)."""

import sys

from .report.compare import main

if __name__ == "__main__":
    sys.exit(main())
