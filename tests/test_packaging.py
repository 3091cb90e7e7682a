"""Building and installing beside the user's torch (issue 20): the supported range, the
build backend's wheel metadata, the import-time check, and what pip does with the source.

The cross-release checks that need a second torch (a 2.11 build imported beside 2.15) run
in ``scripts/torch_matrix.sh``.
"""

import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))

import ovsw_build_backend as backend  # noqa: E402

RELEASE = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def test_the_supported_range_is_the_same_for_pip_and_for_cargo():
    first, last = backend.torch_range()
    build_rs = (ROOT / "third_party/torch-sys/build.rs").read_text()
    m = re.search(r"SUPPORTED_MINORS: std::ops::RangeInclusive<u32> = (\d+)\.\.=(\d+);", build_rs)
    assert m is not None, "third_party/torch-sys/build.rs states no SUPPORTED_MINORS"
    assert (int(m.group(1)), int(m.group(2))) == (first, last)
    assert (first, last) == (11, 15)
    # the installed torch is one of them (this suite runs against a supported build)
    assert backend.torch_minor(torch.__version__, (first, last)) is not None


@pytest.mark.parametrize(
    ("version", "minor"),
    [
        ("2.11.0", 11),
        ("2.15.0+cu132", 15),
        ("2.13.1+cpu", 13),
        ("2.10.0", None),
        ("2.16.0", None),
        ("3.0.0", None),
        ("2.x", None),
    ],
)
def test_torch_minor_accepts_only_the_range(version, minor):
    assert backend.torch_minor(version, (11, 15)) == minor


def test_an_unsupported_torch_stops_the_build_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.16.0")
    with pytest.raises(SystemExit) as stop:
        backend.installed_torch()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "torch 2.11 to 2.15" in err and "2.16.0" in err


def _fake_wheel(folder: Path) -> Path:
    """A wheel as maturin writes one: dist-info with METADATA, WHEEL and RECORD."""
    path = folder / "ovsw-0.1.0-cp39-abi3-linux_x86_64.whl"
    files = {
        "ovsw/__init__.py": b"import torch\n",
        "ovsw/_core.abi3.so": b"\x7fELF not really",
        "ovsw-0.1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.4\nName: ovsw\nVersion: 0.1.0\n"
            b"Requires-Dist: torch>=2.11,<2.16\nRequires-Dist: numpy\n"
            b"Requires-Dist: torchvision>=0.26,<0.30 ; extra == 'train'\n"
        ),
        "ovsw-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nTag: cp39-abi3-linux_x86_64\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            z.writestr(info, data)
        z.writestr("ovsw-0.1.0.dist-info/RECORD", "stale,,\n")
    return path


def test_a_wheel_is_renamed_and_pinned_to_its_torch(tmp_path):
    wheel = _fake_wheel(tmp_path)
    name = backend.retag_wheel(str(tmp_path), wheel.name, "2.15.0+cu132")
    assert name == "ovsw-0.1.0+torch2.15-cp39-abi3-linux_x86_64.whl"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with zipfile.ZipFile(tmp_path / name) as z:
        names = z.namelist()
        assert not any(n.startswith("ovsw-0.1.0.dist-info/") for n in names)
        meta = z.read("ovsw-0.1.0+torch2.15.dist-info/METADATA").decode()
        assert "Version: 0.1.0+torch2.15\n" in meta
        assert "Requires-Dist: torch==2.15.*\n" in meta
        assert "Requires-Dist: numpy\n" in meta and "torchvision>=0.26,<0.30" in meta
        assert ">=2.11" not in meta
        assert 'TORCH_VERSION = "2.15.0+cu132"' in z.read("ovsw/_build_info.py").decode()
        mode = z.getinfo("ovsw/_core.abi3.so").external_attr >> 16
        assert mode & 0o777 == 0o755
        # RECORD lists every other file with its sha256 and size, computed here anew
        record = z.read("ovsw-0.1.0+torch2.15.dist-info/RECORD").decode().splitlines()
        listed = {}
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            listed[path] = (digest, size)
        assert set(listed) == set(names)
        for path in names:
            if path.endswith("/RECORD"):
                assert listed[path] == ("", "")
                continue
            data = z.read(path)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert listed[path] == (f"sha256={want}", str(len(data))), path


def test_a_wheel_whose_metadata_has_no_torch_is_refused(tmp_path):
    wheel = _fake_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        parts = {i.filename: z.read(i) for i in z.infolist()}
    parts["ovsw-0.1.0.dist-info/METADATA"] = b"Name: ovsw\nVersion: 0.1.0\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for k, v in parts.items():
            z.writestr(k, v)
    with pytest.raises(RuntimeError, match="no torch requirement"):
        backend.retag_wheel(str(tmp_path), wheel.name, "2.12.1")


def test_the_installed_ovsw_names_the_torch_it_was_built_against():
    import ovsw._build_info as info

    assert info.TORCH_VERSION == torch.__version__
    dist = importlib.metadata.distribution("ovsw")
    assert dist.version == f"0.1.0+torch{RELEASE}"
    assert f"torch=={RELEASE}.*" in dist.requires


def _import_ovsw_with_build_info(torch_version: str) -> subprocess.CompletedProcess:
    code = (
        "import sys, types\n"
        "m = types.ModuleType('ovsw._build_info')\n"
        f"m.TORCH_VERSION = {torch_version!r}\n"
        "sys.modules['ovsw._build_info'] = m\n"
        "import ovsw\n"
        "print('imported', ovsw.__version__)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_another_torch_release_is_refused_at_import_naming_both():
    out = _import_ovsw_with_build_info("2.99.0+cu999")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: this ovsw was built against torch 2.99.0+cu999")
    assert f"but torch {torch.__version__} is installed" in last
    assert "pip install --no-build-isolation ovsw" in last and "torch==2.99.*" in last
    assert "imported" not in out.stdout


def test_another_build_of_the_same_release_imports():
    patch = torch.__version__.split("+")[0] + "+cu000"  # same 2.X, another local build
    out = _import_ovsw_with_build_info(patch)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imported")


def test_an_undefined_libtorch_symbol_becomes_the_same_import_error(monkeypatch):
    """The path for a build without ``_build_info`` (cargo, maturin develop): the loader's
    own error is replaced by one that names the installed torch and the way out."""
    from ovsw import _torch_abi

    real_import = __import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and fromlist and "_core" in fromlist:
            raise ImportError("/x/_core.abi3.so: undefined symbol: _ZN3c104impl3cow23materialize")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(_torch_abi, "built_for", lambda: None)
    monkeypatch.setattr("builtins.__import__", failing)
    with pytest.raises(ImportError, match=r"built against torch another release, but torch "):
        _torch_abi.load_core()


def _pip(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.mark.slow
def test_installing_from_source_keeps_the_installed_torch():
    out = _pip("install", "--dry-run", "--no-build-isolation", str(ROOT))
    assert out.returncode == 0, out.stdout + out.stderr
    would = [line for line in out.stdout.splitlines() if line.startswith("Would install")]
    assert would == [f"Would install ovsw-0.1.0+torch{RELEASE}"], out.stdout


@pytest.mark.slow
def test_a_plain_pip_install_stops_with_one_line_and_installs_no_torch():
    out = _pip("install", "--dry-run", str(ROOT))
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    ours = [line for line in text.splitlines() if "ovsw: " in line]
    assert len(ours) == 1, text
    assert "pip install --no-build-isolation ." in ours[0]
    assert "Traceback" not in text
    assert not re.search(r"(Collecting|Downloading|Would install) torch\b", text)
