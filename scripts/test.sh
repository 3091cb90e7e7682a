#!/usr/bin/env bash
# The test job: set up, lint, then run the whole test suite against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check python tests examples benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
