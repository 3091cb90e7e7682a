#!/usr/bin/env bash
# The main job: set up, then train a 1-bit cResNet-20 with OvSW on the bundled digits
# (the digits config shipped with the package; extra flags go to ovsw-train), then
# export the best checkpoint to a bit-packed deploy file and score the Rust engine
# against PyTorch on the validation set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ovsw-train --config configs/smallscale/w1a1-ovsw-resnet20-digits.yaml "$@"
RUN=$(.venv/bin/python -c 'import csv; print(list(csv.DictReader(open("runs/results.csv")))[-1]["run_dir"])')
.venv/bin/ovsw-export "$RUN"
