"""The library and the training application apart (issue 10): ``import ovsw`` (and the
deploy library) pull in none of the application or its extras, and every entry point of
the application is where the package metadata says."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_ONLY = ("ovsw.train", "sklearn", "torchvision", "yaml", "tensorboard", "matplotlib")


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {APP_ONLY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize(
    "statement",
    [
        "import ovsw",
        "import ovsw.deploy",
        "import ovsw.nn, ovsw.optim, ovsw.models",
        "import ovsw.analysis",
        "import ovsw.testing",
    ],
)
def test_the_library_imports_none_of_the_application(statement):
    assert _imported_after(statement) == []


# ovsw.testing loaded as a package of its own, every ovsw module but its own blocked
# (``sys.modules[name] = None`` makes importing ``name`` raise ImportError), then run: a
# float64 conv with its backward, a linear layer, AGS+SAD, a comparison. It prints the
# ovsw modules it loaded.
_TESTING_ALONE = """
import sys, types
from pathlib import Path

pkg = Path(sys.argv[1])
for name in ("ovsw._core", "ovsw.ops", "ovsw.nn", "ovsw.optim", "ovsw.cuda", "ovsw.convert"):
    sys.modules[name] = None
ovsw = types.ModuleType("ovsw")
ovsw.__path__ = [str(pkg)]  # ovsw/__init__.py (which loads the core) is not run
sys.modules["ovsw"] = ovsw
import torch
import ovsw.testing as ot

torch.manual_seed(0)
x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
conv = ot.OracleConv2d(3, 4, 3, padding=1, act_w="hardtanhv2", dtype=torch.float64)
conv(x).sum().backward()
assert x.grad is not None and conv.weight.grad is not None
lin = ot.to_oracle(ot.OracleLinear(5, 2, dtype=torch.float64))
lin(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
conv.setup_sad()
opt = ot.OracleOvSW(torch.optim.SGD(conv.parameters(), lr=0.1), conv, enable_ags=True,
                    enable_dampen=True, dampen_weight=1e-3)
opt.step()
assert opt.stats()[0]["ags_ratio"] > 0
assert ot.within(ot.rel_err(x.grad, x.grad.clone()), 0.0)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == "ovsw" and sys.modules[m])))
"""


def test_the_testing_reference_runs_without_the_core():
    """``ovsw.testing`` is independent of the core it checks: with ``ovsw._core``,
    ``ovsw.ops``, ``ovsw.nn`` (and the other modules that reach the core) unimportable
    and ``ovsw/__init__.py`` not run, it imports and computes, loading no ovsw module
    but its own."""
    proc = subprocess.run(
        [sys.executable, "-c", _TESTING_ALONE, str(ROOT / "python" / "ovsw")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split()
    assert "ovsw.testing" in loaded
    assert [m for m in loaded if m != "ovsw" and not m.startswith("ovsw.testing")] == []


def test_the_testing_reference_imports_only_torch_numpy_and_standard_modules():
    """The same, read from the source: every import in ``python/ovsw/testing/`` is of
    torch, numpy, a few standard modules or ``ovsw.testing`` itself (relative)."""
    allowed = {"torch", "numpy", "__future__", "copy", "math", "sys", "typing"}
    files = sorted((ROOT / "python" / "ovsw" / "testing").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "reference.py", "compare.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _module_names(node):
                if name.startswith("."):
                    assert not name.startswith(".."), f"{path.name}: {name}"
                    continue
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_the_check_sees_an_application_import():
    # the same probe reports the application when it is imported
    assert _imported_after("import ovsw.train.cli") == ["ovsw.train"]


def test_console_scripts_point_at_the_application():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))
    assert set(scripts) == {"ovsw-train", "ovsw-sweep", "ovsw-experiment", "ovsw-export"}
    for target in scripts.values():
        module, func = target.split(":")
        assert module.startswith("ovsw.train.")
        assert callable(getattr(importlib.import_module(module), func))


def _module_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [("." * node.level) + (node.module or "")]
    return []


def _application_imports(source: str, package: list[str]) -> list[str]:
    """The modules of ``ovsw.train`` that ``source`` (a module of ``package``) imports
    anywhere, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for name in _module_names(node):
            level = len(name) - len(name.lstrip("."))
            base = package[: len(package) - level + 1] if level else []
            module = ".".join([*base, name.lstrip(".")]).strip(".")
            names = [module]
            if isinstance(node, ast.ImportFrom):
                names += [f"{module}.{a.name}" for a in node.names]
            found += [n for n in names if n == "ovsw.train" or n.startswith("ovsw.train.")]
    return found


def test_the_import_check_sees_an_application_import():
    lib = ["ovsw", "deploy"]
    assert _application_imports("def f():\n    from ..train import runs\n", lib)
    assert _application_imports("from .. import train\n", lib) == ["ovsw.train"]
    assert _application_imports("import ovsw.train.cli\n", lib) == ["ovsw.train.cli"]
    assert _application_imports("from ..nn import OvSWConv2d\nfrom . import _ops\n", lib) == []


def test_no_library_module_imports_the_application():
    """No module of the library (``python/ovsw`` outside ``train/``) imports anything of
    ``ovsw.train``, at module level or inside a function: the run-folder export is the
    application's ``ovsw-export``, and ``python -m ovsw`` only names the commands."""
    found = []
    for path in sorted((ROOT / "python/ovsw").rglob("*.py")):
        rel = path.relative_to(ROOT / "python/ovsw")
        if rel.parts[0] == "train":
            continue
        package = ["ovsw", *rel.parts[:-1]]
        found += [f"{rel}: {m}" for m in _application_imports(path.read_text(), package)]
    assert found == []


def test_python_dash_m_ovsw_names_the_commands_and_runs_none():
    """``python -m ovsw`` belongs to the library: it lists the entry points on stderr,
    exits with 2 and imports nothing of the application."""
    code = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('ovsw', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        f"print(' '.join(m for m in {APP_ONLY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exit", "2"], proc.stdout
    assert "ovsw-train" in proc.stderr and "python -m ovsw.train" in proc.stderr


def test_importing_the_library_prints_nothing():
    """``import ovsw`` (and its subpackages) writes nothing to stdout or stderr on any
    supported torch: no deprecation warning from the torch APIs it registers with."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ovsw, ovsw.deploy, ovsw.analysis, ovsw.testing, ovsw.cuda"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
