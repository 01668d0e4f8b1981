"""``python -m cxrmem <subcommand>``: the ``cxrmem`` command."""

import sys

from .cli import main

sys.exit(main())
