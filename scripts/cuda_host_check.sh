#!/usr/bin/env bash
# The CUDA kernels on the CPU (issue 19): builds tests/cuda/host/kernel_check.cpp with
# every kernel of src/cuda/kernels compiled by the host C++ compiler under
# src/cuda/host/cuda_host.h (src/cuda/host/launch.cpp), and runs it three ways:
#
#   plain  -O2; the header's own checks must stop three broken kernels (a barrier in a
#          branch, a barrier after some threads returned, a shuffle with a partial mask)
#   asan   AddressSanitizer + UndefinedBehaviorSanitizer (leak reports off); they must
#          report an undersized __shared__ array (UBSan's object-size check sees it first)
#   tsan   ThreadSanitizer; it must report a missing __syncthreads
#
# Any failed check, sanitizer report or unstopped broken kernel fails the script.
# No Python, libtorch or GPU. Usage: scripts/cuda_host_check.sh [plain] [asan] [tsan]
# (all three by default). Builds go to target/cuda_host (OVSW_CUDA_HOST_OUT overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
OUT=${OVSW_CUDA_HOST_OUT:-target/cuda_host}
mkdir -p "$OUT"
# -ffp-contract=off: the kernels' roundings are those of separate IEEE operations.
COMMON=(-std=c++17 -ffp-contract=off -Wall -Wextra -Werror -Wno-unknown-pragmas -pthread -Isrc/cuda)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

flags_of() {
    case "$1" in
        plain) echo "-O2" ;;
        asan) echo "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" ;;
        tsan) echo "-O1 -g -fsanitize=thread" ;;
        *) echo "unknown part $1 (plain, asan, tsan)" >&2; exit 2 ;;
    esac
}

# A broken kernel must stop the program with `pattern` in its output.
expect_stopped() {
    local bin=$1 name=$2 pattern=$3 log="$OUT/selftest-$2.log"
    # (a subshell that waits, so that the shell's "Aborted" notice lands in the log)
    if ("$bin" --self-test-fail "$name"; exit $?) >"$log" 2>&1; then
        echo "FAIL self-test $name ran to the end: nothing stopped it"
        return 1
    fi
    if ! grep -q -E -- "$pattern" "$log"; then
        echo "FAIL self-test $name stopped without '$pattern':"
        tail -5 "$log"
        return 1
    fi
    echo "ok   self-test $name stopped: $(grep -m1 -E -- "$pattern" "$log" | cut -c1-110)"
}

run_part() {
    local part=$1 flags bin start
    flags=$(flags_of "$part")
    bin="$OUT/kernel_check_$part"
    echo "== $part: build ($CXX $flags)"
    start=$(now)
    # shellcheck disable=SC2086
    "$CXX" "${COMMON[@]}" $flags -c src/cuda/host/launch.cpp -o "$OUT/launch_$part.o" &
    # shellcheck disable=SC2086
    "$CXX" "${COMMON[@]}" $flags -c tests/cuda/host/kernel_check.cpp -o "$OUT/kernel_check_$part.o"
    wait $!
    # shellcheck disable=SC2086
    "$CXX" $flags -pthread "$OUT/kernel_check_$part.o" "$OUT/launch_$part.o" -o "$bin"
    echo "== $part: built in $(since "$start") s"
    start=$(now)
    local status=0
    "$bin" || status=$?
    case "$part" in
        plain)
            expect_stopped "$bin" divergent-barrier "reached different barriers" || status=1
            expect_stopped "$bin" early-exit-barrier "returned from the kernel" || status=1
            expect_stopped "$bin" partial-mask "mask other than the whole warp" || status=1
            ;;
        asan)
            expect_stopped "$bin" shared-overflow \
                "AddressSanitizer: global-buffer-overflow|insufficient space for an object" || status=1
            ;;
        tsan) expect_stopped "$bin" missing-barrier "ThreadSanitizer: data race" || status=1 ;;
    esac
    echo "== $part: ran in $(since "$start") s, status $status"
    return "$status"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(plain asan tsan)
failed=0
for p in "${parts[@]}"; do
    run_part "$p" || failed=1
done
exit "$failed"
