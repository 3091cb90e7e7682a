#!/usr/bin/env bash
# The publishable wheel (scripts/build_wheel.sh: built against .venv's torch through the build
# backend, manylinux-repaired, twine-checked) installed as a user installs it: into a fresh
# virtual environment that already holds torch, the release the wheel was built for, and
# nothing else. pip must leave that torch as it is (no download, no reinstall, no other
# release) and pull in only what else the wheel needs (numpy). Then tests/smoke/wheel_smoke.py
# runs there from a folder outside the checkout, so the checkout's python/ folder cannot be
# imported by accident.
#
# The fresh environment gets .venv's torch and the packages torch needs as hard links of
# .venv's installed files (a copy where the file system cannot link): PyPI's torch is a CUDA
# build of about 6 GB with its NVIDIA packages, which a second download would add to the disk
# again (CI's disk ran out doing so).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || bash scripts/setup.sh
TORCH=$(.venv/bin/python -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')
bash scripts/build_wheel.sh "$TORCH"
WHEEL=$(ls dist/torch"$TORCH"/ovsw-*.whl)
mkdir -p target
SCRATCH=$(mktemp -d "$ROOT/target/wheel-smoke.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
.venv/bin/python -m venv "$SCRATCH/venv"
SITE=$("$SCRATCH/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
.venv/bin/python - "$SITE" <<'PY'
"""Hard-link torch and what it requires (recursively, markers evaluated for this
interpreter, with the extras each requirement asks for: torch's cuda-toolkit[cudart,...])
from this environment into the site-packages given."""
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

dest = Path(sys.argv[1])
todo, seen, dists, linked, copied = [("torch", "")], set(), set(), 0, 0
while todo:
    name, extra = todo.pop()
    name = name.lower().replace("_", "-")
    if (name, extra) in seen:
        continue
    seen.add((name, extra))
    dist = metadata.distribution(name)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    if name in dists:
        continue
    dists.add(name)
    for f in dist.files or []:
        if ".." in f.parts:  # console scripts in bin/: not needed to import
            continue
        src, dst = Path(dist.locate_file(f)), dest / f
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            linked += 1
        except OSError:
            shutil.copy2(src, dst)
            copied += 1
print(f"fresh environment: {len(dists)} distributions (torch and what it needs), "
      f"{linked} files linked, {copied} copied")
PY
before=$("$SCRATCH/venv/bin/python" -c 'import torch, os; print(torch.__version__, os.stat(torch.__file__).st_ino)')
"$SCRATCH/venv/bin/python" -m pip install "$WHEEL" 2>&1 | tee "$SCRATCH/pip.log" | grep -E '^Successfully' || true
grep -q '^Successfully installed' "$SCRATCH/pip.log" || { cat "$SCRATCH/pip.log"; exit 1; }
# pip left the environment's torch as it was: same release, same files, nothing downloaded
after=$("$SCRATCH/venv/bin/python" -c 'import torch, os; print(torch.__version__, os.stat(torch.__file__).st_ino)')
if [ "$before" != "$after" ] || grep -qiE 'Uninstalling torch|Downloading torch-|Collecting torch' "$SCRATCH/pip.log"; then
    echo "error: installing $WHEEL touched the environment's torch ($before, then $after):" >&2
    cat "$SCRATCH/pip.log" >&2
    exit 1
fi
echo "torch ${before%% *} left as it was; pip added: $(sed -n 's/^Successfully installed //p' "$SCRATCH/pip.log")"
cp tests/smoke/wheel_smoke.py "$SCRATCH/"
cd "$SCRATCH"
env -u PYTHONPATH "$SCRATCH/venv/bin/python" wheel_smoke.py
