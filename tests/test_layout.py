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
    assert set(scripts) == {"ovsw-train", "ovsw-sweep", "ovsw-experiment"}
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


def test_deploy_reaches_the_application_through_public_names_only():
    """deploy/_run.py imports the application inside functions only and uses no name of
    it that starts with an underscore."""
    tree = ast.parse((ROOT / "python/ovsw/deploy/_run.py").read_text())
    top = [n for node in tree.body for n in _module_names(node)]
    assert not [m for m in top if "train" in m], top
    app_modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("train"):
            app_modules.update(a.asname or a.name for a in node.names)
    assert app_modules, "export_run no longer uses ovsw.train?"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in app_modules
        ):
            assert not node.attr.startswith("_"), f"{node.value.id}.{node.attr}"


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
