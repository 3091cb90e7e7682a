#!/usr/bin/env bash
# The main job: set up, then train a 1-bit cResNet-20 with OvSW on the bundled digits
# (the digits config shipped with the package; extra flags go to ovsw-train).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ovsw-train --config configs/smallscale/w1a1-ovsw-resnet20-digits.yaml "$@"
