#!/usr/bin/env bash
# ovsw built and tested against every supported torch release, each in its own environment:
#
#   bash scripts/torch_matrix.sh [2.11 2.12 2.13 2.14 2.15]     (default: all five)
#
# For each release: scripts/setup.sh into target/torch-envs/2.X (.venv where it already has
# that release), which builds the wheel against it and installs it; then the fixture
# replays, ops, optimizer, compile, export, deploy and packaging tests (MATRIX_TESTS
# overrides the list; extra pytest arguments in MATRIX_PYTEST, e.g. "-m 'not slow'"); then
# another release's wheel (built earlier in the run, else found in target/wheels) imported
# beside this torch must be refused with an ImportError naming both versions. Ends with a table: release, torch, set-up+build time, test counts,
# cross-release import. Exits non-zero when any release fails. Not part of CI (too long for
# 2 cores); CI builds and tests the newest (scripts/test.sh) and runs this script for the
# oldest, 2.11.
set -uo pipefail
cd "$(dirname "$0")/.."
RELEASES=("$@")
[ ${#RELEASES[@]} -gt 0 ] || RELEASES=(2.11 2.12 2.13 2.14 2.15)
TESTS=${MATRIX_TESTS:-tests/optim/test_fixture.py tests/layers/test_ops.py tests/optim/test_optim.py tests/layers/test_compile.py tests/layers/test_export.py tests/deploy/test_deploy.py tests/test_packaging.py}
LOG=target/torch-matrix
mkdir -p "$LOG"
release_of() { "$1/bin/python" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))' 2>/dev/null || true; }

ROWS=()
FAILED=0
DONE=()
for T in "${RELEASES[@]}"; do
    if [ -x .venv/bin/python ] && [ "$(release_of .venv)" = "$T" ]; then VENV=.venv; else VENV=target/torch-envs/$T; fi
    echo "== torch $T in $VENV"
    start=$SECONDS
    if ! OVSW_TORCH=$T OVSW_VENV=$VENV bash scripts/setup.sh >"$LOG/setup-$T.log" 2>&1; then
        tail -n 20 "$LOG/setup-$T.log"
        ROWS+=("$T | - | failed after $((SECONDS - start)) s (log: $LOG/setup-$T.log) | - | -")
        FAILED=1
        continue
    fi
    build=$((SECONDS - start))
    VENV=$(cd "$VENV" && pwd)
    full=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
    # shellcheck disable=SC2086
    eval "$VENV/bin/python -m pytest -q -p no:cacheprovider ${MATRIX_PYTEST:-} $TESTS" >"$LOG/tests-$T.log" 2>&1
    rc=$?
    summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOG/tests-$T.log" | tail -n 1 | tr -d '=' | xargs)
    [ $rc = 0 ] || FAILED=1
    # another release's wheel (one built earlier in this run, else any in target/wheels)
    other=""
    for R in "${DONE[@]}" 2.15 2.11 2.12 2.13 2.14; do
        if [ "$R" != "$T" ] && ls target/wheels/torch"$R"/ovsw-*.whl >/dev/null 2>&1; then other=$R; break; fi
    done
    DONE+=("$T")
    cross="-"
    if [ -n "$other" ]; then
        # the other release's wheel beside this torch: refused, naming both versions
        site=$(mktemp -d)
        "$VENV/bin/python" -m pip install -q --no-deps --target "$site" target/wheels/torch"$other"/ovsw-*.whl
        out=$(cd /tmp && PYTHONPATH="$site" "$VENV/bin/python" -c 'import ovsw' 2>&1 | tail -n 1)
        if [[ "$out" == "ImportError: this ovsw was built against torch $other"*"but torch $full is installed"* ]]; then
            cross="$other wheel refused (ImportError names $other and $full)"
        else
            cross="NOT refused: $out"
            FAILED=1
        fi
        # without the build record: the loader's own failure, if any, must name this torch
        rm -f "$site/ovsw/_build_info.py"
        out=$(cd /tmp && PYTHONPATH="$site" "$VENV/bin/python" -c 'import ovsw; print("loaded")' 2>&1 | tail -n 1)
        cross="$cross; without its record: ${out:0:110}"
        rm -rf "$site"
    fi
    ROWS+=("$T | $full | ${build} s | ${summary:-no summary (rc $rc)} | $cross")
done

echo
echo "release | torch | set-up + build | tests ($TESTS) | another release's wheel imported here"
echo "--- | --- | --- | --- | ---"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
