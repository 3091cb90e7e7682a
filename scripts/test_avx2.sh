#!/usr/bin/env bash
# The run an AVX2-only CPU (such as an AMD Zen 3) does, on any x86-64 CPU: the AVX-512
# flags hidden from ovsw's kernel choice, libtorch's ATen kernels capped at AVX2, and
# oneDNN and MKL (which do not read ATen's variable) capped too. The Rust unit tests are
# rebuilt with the flags hidden (build.rs reads them to ignore the kernels the CPU cannot
# run), then the deploy, CPU-flag, fixture and export tests run under the same variables.
# Tests that set these variables themselves add to them, never replace them.
# Needs the environment scripts/setup.sh makes; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OVSW_DISABLE_CPU_FEATURES="avx512f avx512bw avx512_vpopcntdq ${OVSW_DISABLE_CPU_FEATURES:-}"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
echo "AVX2 run: OVSW_DISABLE_CPU_FEATURES='$OVSW_DISABLE_CPU_FEATURES' ATEN_CPU_CAPABILITY=avx2" \
    "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
.venv/bin/python - <<'PY'
import torch
import ovsw.deploy as d

assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"), "ATen not capped"
assert not {"avx512f", "avx512bw", "avx512_vpopcntdq"} & set(d.cpu_flags()), d.cpu_flags()
print("ATen capability", torch.backends.cpu.get_cpu_capability(), "| ovsw kernels", d.kernels())
PY
TORCH_LIB=$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
PYO3_PYTHON=.venv/bin/python LIBTORCH_USE_PYTORCH=1 LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}" \
    PATH="$PWD/.venv/bin:$PATH" cargo test --release --lib --quiet deploy
.venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/deploy/test_deploy.py tests/optim/test_fixture.py tests/layers/test_export.py \
    tests/deploy/test_export_identity.py tests/deploy/test_lowering.py "$@"
