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
    ],
)
def test_the_library_imports_none_of_the_application(statement):
    assert _imported_after(statement) == []


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
    application's ``ovsw-export``. ``ovsw/__main__.py`` (``python -m ovsw``, the
    application's launcher) is left to its own item of issue 21."""
    found = []
    for path in sorted((ROOT / "python/ovsw").rglob("*.py")):
        rel = path.relative_to(ROOT / "python/ovsw")
        if rel.parts[0] == "train" or rel == Path("__main__.py"):
            continue
        package = ["ovsw", *rel.parts[:-1]]
        found += [f"{rel}: {m}" for m in _application_imports(path.read_text(), package)]
    assert found == []
