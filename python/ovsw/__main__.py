"""``python -m ovsw``: the same as ``ovsw-train``."""

import sys

from .cli import main

sys.exit(main())
