#!/usr/bin/env bash
# The publishable wheel of ovsw for one torch release, and the sdist:
#
#   bash scripts/build_wheel.sh [2.X]        (default 2.15; 2.11 for the GPU machine)
#
# 1. an environment with torch 2.X (.venv when it has that release, else
#    target/torch-envs/2.X, made by scripts/setup.sh), where the wheel is built against it
#    (version 0.1.0+torch2.X, requiring torch==2.X.*);
# 2. auditwheel repair: the manylinux tag this build machine's glibc allows, with torch's own
#    libraries left out (they come from the torch wheel, as for every torch extension);
#    `auditwheel show` prints the policy it confirms;
# 3. the sdist (maturin sdist), and `twine check` on both.
# Results go to dist/torch2.X/ (wheel) and dist/ (sdist). OVSW_CHECK_SDIST=1 also builds a
# wheel from the sdist, in the same environment, to show that the sdist builds.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:-2.15}
SECONDS=0

release_of() { "$1/bin/python" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))' 2>/dev/null || true; }
if [ -x .venv/bin/python ] && [ "$(release_of .venv)" = "$TORCH" ]; then
    VENV=.venv
else
    VENV=target/torch-envs/$TORCH
fi
OVSW_TORCH=$TORCH OVSW_VENV=$VENV bash scripts/setup.sh
"$VENV/bin/python" -m pip install -q "auditwheel>=6" "twine>=5"

RAW=$(ls target/wheels/torch"$TORCH"/ovsw-*.whl)
OUT=dist/torch$TORCH
rm -rf "$OUT"
mkdir -p "$OUT"
# torch's libraries (and CUDA's, which ovsw loads itself at run time) are not ours to ship.
EXCLUDES=()
for lib in libtorch.so libtorch_cpu.so libtorch_python.so libtorch_cuda.so libc10.so libc10_cuda.so; do
    EXCLUDES+=(--exclude "$lib")
done
"$VENV/bin/auditwheel" repair "${EXCLUDES[@]}" -w "$OUT" "$RAW"
WHEEL=$(ls "$OUT"/ovsw-*.whl)
"$VENV/bin/auditwheel" show "$WHEEL"

"$VENV/bin/maturin" sdist --out dist
SDIST=$(ls -t dist/ovsw-*.tar.gz | head -n 1)
"$VENV/bin/twine" check --strict "$WHEEL" "$SDIST"

if [ "${OVSW_CHECK_SDIST:-0}" = 1 ]; then
    SCRATCH=$(mktemp -d)
    trap 'rm -rf "$SCRATCH"' EXIT
    # shellcheck disable=SC1091
    (. "$VENV/bin/activate" && CARGO_TARGET_DIR="$PWD/$VENV/target-sdist" \
        python -m pip wheel -q --no-build-isolation --no-deps -w "$SCRATCH" "$SDIST")
    echo "the sdist builds: $(cd "$SCRATCH" && ls ovsw-*.whl)"
fi
echo "wheel: $WHEEL"
echo "sdist: $SDIST"
echo "built in ${SECONDS}s"
