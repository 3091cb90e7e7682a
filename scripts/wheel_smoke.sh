#!/usr/bin/env bash
# Build the abi3 wheel (maturin build --release) with the environment of scripts/setup.sh,
# install it into a fresh virtual environment (pip pulls in torch and numpy, nothing
# else), and run tests/smoke/wheel_smoke.py there from a folder outside the checkout, so
# the checkout's python/ folder cannot be imported by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/maturin ] || bash scripts/setup.sh
rm -rf target/wheels
LIBTORCH_USE_PYTORCH=1 PYO3_PYTHON="$ROOT/.venv/bin/python" PATH="$ROOT/.venv/bin:$PATH" \
    .venv/bin/maturin build --release --quiet --interpreter "$ROOT/.venv/bin/python"
WHEEL=$(ls target/wheels/ovsw-*-abi3-*.whl)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$SCRATCH/venv"
# torch as setup.sh installs it (same index and version; pip's cache serves it again)
"$SCRATCH/venv/bin/python" -m pip install -q "$WHEEL"
"$SCRATCH/venv/bin/python" -m pip list --format freeze | grep -iE '^(ovsw|torch|numpy)='
cp tests/smoke/wheel_smoke.py "$SCRATCH/"
cd "$SCRATCH"
env -u PYTHONPATH "$SCRATCH/venv/bin/python" wheel_smoke.py
