#!/usr/bin/env bash
# The publishable wheel (scripts/build_wheel.sh: built against .venv's torch through the build
# backend, manylinux-repaired, twine-checked) installed into a fresh virtual environment (pip
# pulls in the torch release it requires and numpy, nothing else), and
# tests/smoke/wheel_smoke.py run there from a folder outside the checkout, so the checkout's
# python/ folder cannot be imported by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || bash scripts/setup.sh
TORCH=$(.venv/bin/python -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')
bash scripts/build_wheel.sh "$TORCH"
WHEEL=$(ls dist/torch"$TORCH"/ovsw-*.whl)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$SCRATCH/venv"
# torch as the wheel requires it (torch==2.X.*; pip's cache serves it again)
"$SCRATCH/venv/bin/python" -m pip install -q "$WHEEL"
"$SCRATCH/venv/bin/python" -m pip list --format freeze | grep -iE '^(ovsw|torch|numpy)='
# the wheel's metadata made pip install the release it was built against
"$SCRATCH/venv/bin/python" -c "import sys, torch; r = '.'.join(torch.__version__.split('.')[:2]); sys.exit(None if r == '$TORCH' else 'pip installed torch ' + torch.__version__ + ' for a wheel built against $TORCH')"
cp tests/smoke/wheel_smoke.py "$SCRATCH/"
cd "$SCRATCH"
env -u PYTHONPATH "$SCRATCH/venv/bin/python" wheel_smoke.py
