"""``python -m ovsw``: the same as ``ovsw-train`` (the training application,
:mod:`ovsw.train`)."""

import sys

from .train.cli import main

sys.exit(main())
