"""``ovsw/_core.pyi`` is true to the compiled module: mypy's stubtest compares every
name, class and signature in the stub with what ``ovsw._core`` exposes at run time, and
a check of our own that attributes are exactly as writable as the stub declares them
(stubtest cannot tell a pyo3 getter from a writable field).

stubtest type-checks the stub's package too; to check the stub alone (not the rest of
ovsw's sources) it runs against a copy of the stub in a stub-only ``ovsw`` package,
while the runtime side imports the very ``ovsw`` these tests import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ovsw
from ovsw import _core, deploy, models

STUB = Path(ovsw.__file__).with_name("_core.pyi")


def _stubtest(stub_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["MYPYPATH"] = str(stub_dir)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(ovsw.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ovsw._core"],
        cwd=stub_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _stub_package(root: Path, text: str) -> Path:
    pkg = root / "ovsw"
    pkg.mkdir()
    (pkg / "__init__.pyi").write_text("")
    (pkg / "_core.pyi").write_text(text)
    return root


@pytest.mark.slow
def test_stub_matches_the_compiled_module(tmp_path):
    result = _stubtest(_stub_package(tmp_path, STUB.read_text()))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_stubtest_catches_a_stale_stub(tmp_path):
    """The check can fail: a renamed parameter and a missing function are reported."""
    text = STUB.read_text()
    stale = text.replace(
        "def binarize_weight(weight: Tensor, spec: ConvSpec)",
        "def binarize_weight(w: Tensor, spec: ConvSpec)",
    ).replace("def act_a_names() -> list[str]:", "def act_a_namez() -> list[str]:")
    assert stale != text
    result = _stubtest(_stub_package(tmp_path, stale))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "binarize_weight" in out and "act_a_names" in out, out


def _declared_attributes(stub_text: str) -> dict[str, dict[str, bool]]:
    """``{class: {attribute: writable}}``: a plain annotated name is writable, a
    ``@property`` without a setter is not."""
    out: dict[str, dict[str, bool]] = {}
    for node in ast.parse(stub_text).body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs = out.setdefault(node.name, {})
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                attrs[item.target.id] = True
            elif isinstance(item, ast.FunctionDef):
                names = [ast.unparse(d) for d in item.decorator_list]
                if "property" in names:
                    attrs.setdefault(item.name, False)
                elif any(n.endswith(".setter") for n in names):
                    attrs[item.name] = True
    return out


def _instances(tmp_path) -> dict[str, object]:
    path = deploy.export(models.create("cResNet20_1w1a").eval(), tmp_path / "m.ovsw")
    return {
        "ConvSpec": _core.ConvSpec(),
        "OvSWConfig": _core.OvSWConfig(),
        "DeployEngine": _core.DeployEngine(path.read_bytes(), 1),
    }


def _writability_mismatches(stub_text: str, instances: dict[str, object]) -> list[str]:
    wrong = []
    for cls, attrs in _declared_attributes(stub_text).items():
        if cls not in instances:
            continue
        obj = instances[cls]
        for name, writable in attrs.items():
            try:
                setattr(obj, name, getattr(obj, name))
                runtime_writable = True
            except AttributeError:
                runtime_writable = False
            if runtime_writable != writable:
                wrong.append(f"{cls}.{name}: stub writable={writable}, runtime {runtime_writable}")
    return wrong


def test_attributes_are_as_writable_as_the_stub_says(tmp_path):
    instances = _instances(tmp_path)
    declared = _declared_attributes(STUB.read_text())
    assert set(instances) <= set(declared)
    assert declared["OvSWConfig"] and declared["DeployEngine"]["threads"]
    assert _writability_mismatches(STUB.read_text(), instances) == []


def test_a_field_declared_writable_is_caught(tmp_path):
    """Issue 9's finding: OvSWConfig's fields were declared writable."""
    stale = STUB.read_text().replace(
        "    @property\n    def delta(self) -> float: ...", "    delta: float"
    )
    wrong = _writability_mismatches(stale, _instances(tmp_path))
    assert wrong == ["OvSWConfig.delta: stub writable=True, runtime False"]
