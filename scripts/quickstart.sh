#!/usr/bin/env bash
# The main job: set up, then train a 1-bit cResNet-20 with OvSW on the bundled digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
