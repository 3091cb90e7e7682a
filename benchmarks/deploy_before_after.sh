#!/usr/bin/env bash
# Two trees of the project measured alternately on one machine: before, after, ROUNDS times.
#
#   bash benchmarks/deploy_before_after.sh BEFORE_TREE AFTER_TREE [ROUNDS] [OUT_DIR]
#
# Each tree needs its built extension in TREE/python/ovsw (cargo build --release --lib, then
# target/release/lib_core.so copied to python/ovsw/_core.abi3.so); both run on the python of
# this checkout's .venv. Per round and tree: `python -m ovsw.deploy bench --threads 1 2` (five
# alternated blocks per figure) and this tree's benchmarks/deploy_scaling.py --rounds 1.
# KERNEL=avx2 measures that kernel; SIM=1 also hides AVX-512 from ovsw
# (OVSW_DISABLE_CPU_FEATURES) and from torch (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA).
# matrixmultiply (the float GEMM) picks its kernel itself: for SIM=1 build both trees with
# its AVX-512 kernel left out, `matrixmultiply = { version = "0.3", default-features = false,
# features = ["std"] }` in crates/ovsw-engine/Cargo.toml (a measurement build, not committed).
set -euo pipefail
BEFORE=$1 AFTER=$2 ROUNDS=${3:-5} OUT=${4:-before_after}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
K=${KERNEL:-auto}
ENV=()
if [ "${SIM:-0}" = 1 ]; then
    ENV=(OVSW_DISABLE_CPU_FEATURES="avx512f avx512bw avx512_vpopcntdq" ATEN_CPU_CAPABILITY=avx2
        ONEDNN_MAX_CPU_ISA=AVX2)
fi
mkdir -p "$OUT"
lscpu | grep -E 'Model name|CPU family|Model:' > "$OUT/cpu.txt"
grep -o -m1 -w avx512_vpopcntdq /proc/cpuinfo >> "$OUT/cpu.txt" || echo "no avx512_vpopcntdq" >> "$OUT/cpu.txt"
for round in $(seq 1 "$ROUNDS"); do
    for side in before after; do
        if [ "$side" = before ]; then TREE=$BEFORE; else TREE=$AFTER; fi
        echo "== $side round $round $(date +%T)"
        env ${ENV[@]+"${ENV[@]}"} PYTHONPATH="$TREE/python" "$PY" -m ovsw.deploy bench --threads 1 2 \
            --repeats 5 --model-repeats 5 --batch-repeats 5 --kernel "$K" \
            > "$OUT/bench_${K}_${side}_$round.log" 2>&1
        env ${ENV[@]+"${ENV[@]}"} PYTHONPATH="$TREE/python" "$PY" "$HERE/benchmarks/deploy_scaling.py" \
            --rounds 1 >> "$OUT/scaling_${K}_${side}.log" 2>&1
    done
done
echo "== done $(date +%T); logs in $OUT"
