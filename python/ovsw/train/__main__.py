"""``python -m ovsw.train``: the same as ``ovsw-train``."""

import sys

from .cli import main

sys.exit(main())
