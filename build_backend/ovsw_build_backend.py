"""ovsw's PEP 517 build backend: maturin, bound to the torch installed where it builds.

ovsw's Rust core links the libtorch of the installed torch (2.11 to 2.15), so a build is
for one torch release. This backend wraps maturin's hooks and adds three things:

* It stops, with one line saying what to run, when no supported torch can be imported:
  pip's default isolated build (``pip install .``) cannot see the user's torch, and must
  neither build against nor install another one.
* The wheel and its metadata say which torch they were built for: version
  ``0.1.0+torch2.15`` (a local version, so the five builds don't collide), the
  requirement ``torch==2.15.*`` in place of the source's range, and
  ``ovsw/_build_info.py`` with the full torch version, which ``ovsw`` checks at import
  (:mod:`ovsw._torch_abi`).
* cargo runs with ``LIBTORCH_USE_PYTORCH=1`` and with this interpreter first on ``PATH``,
  so torch-sys and build.rs find this environment's torch even when it is not activated.

The supported range is the ``torch`` requirement of ``pyproject.toml``; torch-sys
(``third_party/torch-sys/build.rs``) states it for cargo builds, and
``tests/test_packaging.py`` keeps the two equal.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME = "ovsw"


def torch_range(pyproject: str | None = None) -> tuple[int, int]:
    """The supported torch minors (first, last), from ``torch>=2.A,<2.B`` in pyproject.toml."""
    with open(pyproject or os.path.join(_ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r'"torch>=2\.(\d+),<2\.(\d+)"', text)
    if m is None:
        raise RuntimeError('pyproject.toml has no dependency of the form "torch>=2.A,<2.B"')
    return int(m.group(1)), int(m.group(2)) - 1


def _stop(line: str) -> None:
    """Ends the build with one line (pip shows it as the hook's output; no traceback)."""
    print(f"ovsw: {line}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def installed_torch() -> str:
    """The installed torch's version, or stop the build with what to do."""
    first, last = torch_range()
    wanted = f"torch 2.{first} to 2.{last}"
    try:
        import torch
    except ImportError:
        _stop(
            f"ovsw builds against the torch already installed ({wanted}) and this build "
            "environment has none; install torch, then run "
            "`pip install --no-build-isolation .` (a plain `pip install .` builds in an "
            "isolated environment that cannot see it)"
        )
    version = torch.__version__
    if torch_minor(version, (first, last)) is None:
        _stop(
            f"ovsw builds against {wanted}; the installed torch is {version}: "
            f"pip install 'torch>=2.{first},<2.{last + 1}', then rebuild"
        )
    return version


def torch_minor(version: str, supported: tuple[int, int]) -> int | None:
    """2.X.Y[+local] -> X when X is in the supported range, else None."""
    m = re.match(r"2\.(\d+)\.", version)
    if m is None or not supported[0] <= int(m.group(1)) <= supported[1]:
        return None
    return int(m.group(1))


def local_version(version: str, torch_version: str) -> str:
    """``0.1.0`` built against ``2.15.0+cu132`` -> ``0.1.0+torch2.15``."""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return f"{version}+torch{major_minor}"


def _retag_metadata(text: str, new_version: str, torch_version: str) -> str:
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    out = []
    pinned = False
    for line in text.splitlines(keepends=True):
        if line.startswith("Version: "):
            line = f"Version: {new_version}\n"
        elif re.match(r"Requires-Dist: torch ?[<>=]", line):
            line = f"Requires-Dist: torch=={major_minor}.*\n"
            pinned = True
        out.append(line)
    if not pinned:
        raise RuntimeError("the wheel's METADATA has no torch requirement to pin")
    return "".join(out)


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\n"


def build_info_source(torch_version: str) -> str:
    return (
        "# Written by ovsw's build backend (build_backend/): the torch this build was\n"
        "# compiled against, checked at import by ovsw._torch_abi.\n"
        f'TORCH_VERSION = "{torch_version}"\n'
    )


def retag_wheel(wheel_directory: str, name: str, torch_version: str) -> str:
    """Rewrites the wheel ``name`` for ``torch_version``; returns the new file name."""
    old = os.path.join(wheel_directory, name)
    dist, version, rest = name.split("-", 2)
    new_version = local_version(version, torch_version)
    new_name = f"{dist}-{new_version}-{rest}"
    old_info, new_info = f"{dist}-{version}.dist-info/", f"{dist}-{new_version}.dist-info/"
    record = new_info + "RECORD"
    tmp = os.path.join(wheel_directory, new_name + ".part")
    lines = []
    with zipfile.ZipFile(old) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            path = info.filename
            if path.startswith(old_info):
                path = new_info + path[len(old_info) :]
            if path == record:
                continue
            data = src.read(info)
            if path == new_info + "METADATA":
                data = _retag_metadata(data.decode(), new_version, torch_version).encode()
            entry = zipfile.ZipInfo(path, info.date_time)
            entry.external_attr = info.external_attr
            entry.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(entry, data)
            lines.append(_record_line(path, data))
        path = f"{dist}/_build_info.py"
        data = build_info_source(torch_version).encode()
        entry = zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0))
        entry.external_attr = 0o644 << 16
        dst.writestr(entry, data, zipfile.ZIP_DEFLATED)
        lines.append(_record_line(path, data))
        lines.append(f"{record},,\n")
        dst.writestr(record, "".join(lines), zipfile.ZIP_DEFLATED)
    os.replace(tmp, os.path.join(wheel_directory, new_name))
    if new_name != name:
        os.remove(old)
    return new_name


def retag_dist_info(metadata_directory: str, name: str, torch_version: str) -> str:
    """Renames and rewrites the prepared ``.dist-info`` folder; returns its new name."""
    dist, rest = name.split("-", 1)
    version = rest[: -len(".dist-info")]
    new_version = local_version(version, torch_version)
    new_name = f"{dist}-{new_version}.dist-info"
    path = os.path.join(metadata_directory, name)
    meta = os.path.join(path, "METADATA")
    with open(meta, encoding="utf-8") as f:
        text = _retag_metadata(f.read(), new_version, torch_version)
    with open(meta, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path, os.path.join(metadata_directory, new_name))
    return new_name


def _maturin():
    try:
        import maturin
    except ImportError:
        _stop("building ovsw needs maturin: pip install 'maturin>=1.8,<2'")
    return maturin


def _cargo_environment() -> None:
    os.environ.setdefault("LIBTORCH_USE_PYTORCH", "1")
    here = os.path.dirname(sys.executable)
    os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


# --- PEP 517 / 660 hooks -------------------------------------------------------------


def get_requires_for_build_wheel(config_settings: Mapping[str, Any] | None = None):
    installed_torch()
    return _maturin().get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings: Mapping[str, Any] | None = None):
    installed_torch()
    return _maturin().get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: Mapping[str, Any] | None = None
) -> str:
    torch_version = installed_torch()
    _cargo_environment()
    name = _maturin().prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    return retag_dist_info(metadata_directory, name, torch_version)


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: Mapping[str, Any] | None = None
) -> str:
    torch_version = installed_torch()
    _cargo_environment()
    name = _maturin().prepare_metadata_for_build_editable(metadata_directory, config_settings)
    return retag_dist_info(metadata_directory, name, torch_version)


def build_wheel(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    torch_version = installed_torch()
    _cargo_environment()
    name = _maturin().build_wheel(wheel_directory, config_settings)
    return retag_wheel(wheel_directory, name, torch_version)


def build_editable(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    torch_version = installed_torch()
    _cargo_environment()
    name = _maturin().build_editable(wheel_directory, config_settings)
    return retag_wheel(wheel_directory, name, torch_version)


def get_requires_for_build_sdist(config_settings: Mapping[str, Any] | None = None):
    return _maturin().get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return _maturin().build_sdist(sdist_directory, config_settings)
