#!/usr/bin/env bash
# The test job: format checks, set up, lint, then run the whole test suite against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
bash scripts/setup.sh
LINTED=(python tests examples benchmarks build_backend scripts)
.venv/bin/ruff check "${LINTED[@]}"
.venv/bin/ruff format --check "${LINTED[@]}"
# The deploy engine's unit tests (kernels against a bit-by-bit reference, the file's
# writer and reader): a crate without libtorch, so no LD_LIBRARY_PATH.
env -u LD_LIBRARY_PATH cargo test -p ovsw-engine --release --quiet
# The core's Rust unit tests; the test binary finds libtorch in the installed torch.
TORCH_LIB=$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
PYO3_PYTHON=.venv/bin/python LIBTORCH_USE_PYTORCH=1 LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}" \
    PATH="$PWD/.venv/bin:$PATH" cargo test --release --lib --quiet
# The whole suite (slow tests included; `-m "not slow"` leaves them out), then the 15
# slowest tests.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
