#!/usr/bin/env bash
# The whole GPU check of issue 11 in one run, on a machine with torch 2.11 + CUDA and a
# GPU but no Rust: installs a prebuilt abi3 wheel of ovsw into ./.site and runs
#   1. python -m ovsw.cuda check      (compile every kernel, with ptxas's registers,
#                                      shared memory and spills; run each against libtorch,
#                                      the AGS+SAD figures against float64)
#   2. pytest -m cuda tests           (every cuda-marked test: OvSWConv2d and OvSW on the
#                                      fused route against the CPU oracle and their
#                                      libtorch route, the passes one by one, 20 AMP steps,
#                                      no sync in OvSW.step, the ops, compile and analysis
#                                      twins on CUDA, a CLI epoch on CUDA)
#   3. benchmarks/bench_train_step.py --device cuda
#   4. one CLI epoch on the digits config, then a resume to a second epoch
# and prints a summary. About 5 minutes on an H100 or H200 after the install.
#
# Build the wheel where Rust is (the folder is kept out of git by .git/info/exclude):
#   OVSW_TORCH=2.11 OVSW_VENV=target/torch-envs/2.11 bash scripts/setup.sh
#   mkdir -p wheelhouse && cp target/wheels/torch2.11/*.whl wheelhouse/
# (the machine has torch 2.11.0+cu130: the wheel must be the build for 2.11, which ovsw checks
# at import, naming both versions when they differ; this is the build backend's wheel, tagged
# linux_x86_64, which pip installs whatever the machine's glibc, where the manylinux wheel of
# scripts/build_wheel.sh 2.11 needs glibc 2.35).
# Then:  bash scripts/gpu_check.sh [WHEEL_OR_FOLDER]     (default: wheelhouse/)
# PYTHON picks the interpreter (default: python3); GPU_CHECK_STEPS=1,3 runs some steps;
# GPU_CHECK_LOG names the folder for the step logs (default: a fresh temporary one);
# pytest counts as failed when any test skipped. Collecting every test file needs
# pytest, numpy, pyyaml, tqdm, scikit-learn, tensorboard and torchvision besides torch
# (the device image has them all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=${1:-wheelhouse}
STEPS=${GPU_CHECK_STEPS:-1,2,3,4}

if [ -d "$SRC" ]; then
    WHEEL=$(ls -t "$SRC"/ovsw-*.whl 2>/dev/null | head -n 1)
else
    WHEEL=$SRC
fi
if [ -z "${WHEEL:-}" ] || [ ! -f "$WHEEL" ]; then
    echo "error: no ovsw wheel at '$SRC' (build one where Rust is: OVSW_TORCH=2.11 OVSW_VENV=target/torch-envs/2.11 bash scripts/setup.sh, then copy target/wheels/torch2.11/*.whl to wheelhouse/)" >&2
    exit 2
fi

start=$(date +%s)
rm -rf .site
if ! "$PY" -m pip install -q --no-deps --target .site "$WHEEL"; then
    echo "error: pip could not install $WHEEL into .site" >&2
    exit 2
fi
export PYTHONPATH="$PWD/.site"
"$PY" - <<'EOF' || exit 2
import os, sys, torch, ovsw
print(f"ovsw {ovsw.__version__} from {ovsw.__file__}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("error: no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs the CPU-side steps anyway)")
EOF

LOG=${GPU_CHECK_LOG:-$(mktemp -d)}
mkdir -p "$LOG"
declare -a NAMES RESULTS
run() { # run NUMBER NAME COMMAND...
    local num=$1 name=$2
    shift 2
    case ",$STEPS," in *",$num,"*) ;; *) return 0 ;; esac
    echo
    echo "=== $num. $name: $*"
    local t0 rc
    t0=$(date +%s)
    "$@" 2>&1 | tee "$LOG/$num.log"
    rc=${PIPESTATUS[0]}
    # A skipped test is not a pass.
    if [ "$rc" -eq 0 ] && [ "$num" = 2 ] && tail -n 1 "$LOG/$num.log" | grep -q skipped; then
        rc=99
    fi
    NAMES+=("$num. $name")
    RESULTS+=("$([ "$rc" -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $(($(date +%s) - t0)) s")
}

run 1 "kernel check" "$PY" -m ovsw.cuda check
# Every cuda-marked test, selected by the marker over the whole tests/ folder (no file
# list to drift; tests/cuda/test_cuda_check.py holds this line to what `-m cuda` collects).
CUDA_TESTS=(-m cuda tests)
run 2 "pytest -m cuda" "$PY" -m pytest -q -p no:cacheprovider -rs "${CUDA_TESTS[@]}"
run 3 "benchmark" "$PY" benchmarks/bench_train_step.py --device cuda --steps 5 --warmup 2
CFG=configs/smallscale/w1a1-ovsw-resnet20-digits.yaml
RUNS=$(mktemp -d)/runs
cli_epochs() {
    "$PY" -m ovsw.train --config "$CFG" --epochs 1 --log-dir "$RUNS" &&
        "$PY" -m ovsw.train --config "$CFG" --epochs 2 --log-dir "$RUNS" \
            --resume "$RUNS/w1a1-ovsw-resnet20-digits/default"
}
run 4 "CLI epoch + resume" cli_epochs

echo
echo "=== summary ($(($(date +%s) - start)) s in all; logs in $LOG)"
"$PY" -c 'import torch; print("  " + torch.cuda.get_device_name())' 2>/dev/null
failed=0
for i in "${!NAMES[@]}"; do
    printf '  %-24s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
    case "${RESULTS[$i]}" in FAIL*) failed=1 ;; esac
done
if [ -f "$LOG/2.log" ]; then
    echo "  pytest: $(tail -n 1 "$LOG/2.log")"
fi
if [ -f "$LOG/1.log" ]; then
    grep -E "^(sm_[0-9]+:|sm_[0-9]+ ptxas:|running on|all kernels ok|[0-9]+ failures|no CUDA device)|FAIL" "$LOG/1.log" | sed 's/^/  check: /'
fi
if [ -f "$LOG/3.log" ]; then
    grep -E "^(ResNet18|cResNet20)|^  (ovsw|libtorch|oracle) +step|^ovsw ran on|did not take" \
        "$LOG/3.log" | sed 's/^/  /'
fi
exit $failed
