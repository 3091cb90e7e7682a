"""The README's paper-to-code map points at code that exists: every path in its Code
column is a file or folder of the repository, and every name written after a path is
defined there (a Rust fn/struct/enum/trait/const/static/macro, a Python def/class).
A reader reaches each formula in one hop only if the map is true to the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _map_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index("## Paper to code")
    end = text.index("\n## ", start + 1)
    rows = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[0] not in ("Paper / SPEC", "---"):
            rows.append((cells[0], cells[2]))
    return rows


def _references(code: str) -> list[tuple[str, str | None]]:
    """(path, name) pairs of a Code cell: each backticked path, then the backticked
    names after it (``Type::method`` counts as ``method``) until the next path."""
    refs: list[tuple[str, str | None]] = []
    path = None
    for token in re.findall(r"`([^`]+)`", code):
        if re.match(r"^(src|python|csrc|crates)/", token):
            path = token.rstrip("/")
            refs.append((path, None))
        elif path is not None and re.fullmatch(r"[A-Za-z_][\w:]*", token):
            refs.append((path, token.split("::")[-1]))
    return refs


# A definition, or a row of src/binarize/mod.rs's `named_choice!` tables (`ActW, option`).
_DEFINITION = (
    r"(?:\bfn|\bdef|\bclass|\bstruct|\benum|\btrait|\bconst|\bstatic|macro_rules!)\s+{name}\b"
    r"|^\s*{name}, option\b"
)


def _defined(path: Path, name: str) -> bool:
    files = [path] if path.is_file() else sorted(path.rglob("*.*"))
    pattern = re.compile(_DEFINITION.format(name=re.escape(name)), re.MULTILINE)
    return any(
        pattern.search(f.read_text(errors="replace"))
        for f in files
        if f.suffix in (".rs", ".py", ".cpp", ".cu")
    )


ROWS = _map_rows()


def test_the_map_has_the_formulas():
    formulas = " ".join(formula for formula, _ in ROWS)
    for section in ("SPEC 1.1", "SPEC 1.2", "SPEC 1.3", "SPEC 1.4", "SPEC 1.5", "SPEC 2", "SPEC 3"):
        assert section in formulas, section


@pytest.mark.parametrize("formula,code", ROWS, ids=[f for f, _ in ROWS])
def test_every_reference_exists(formula, code):
    refs = _references(code)
    assert refs, f"{formula}: no code reference"
    for path, name in refs:
        target = ROOT / path
        assert target.exists(), f"{formula}: {path} does not exist"
        if name is not None:
            assert _defined(target, name), f"{formula}: {name} is not defined in {path}"


def test_a_wrong_reference_is_caught():
    assert _defined(ROOT / "src/conv/mod.rs", "forward")
    assert not _defined(ROOT / "src/conv/mod.rs", "no_such_function")
    assert _references("`src/a.rs` `X::y`, `z`; `python/b.py` `w`") == [
        ("src/a.rs", None),
        ("src/a.rs", "y"),
        ("src/a.rs", "z"),
        ("python/b.py", None),
        ("python/b.py", "w"),
    ]
