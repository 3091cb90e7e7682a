"""The documentation is true to the tree.

- The paper-to-code map (``docs/paper-to-code.md``) points at code that exists: every path
  in its Code column is a file or folder of the repository, and every name written after a
  path is defined there (a Rust fn/struct/enum/trait/const/static/macro, a Python
  def/class). A reader reaches each formula in one hop only if the map is true to the tree.
- The README links every page of ``docs/``; every relative link of the README and the
  pages reaches a file, and its ``#anchor`` a heading of that file.
- Every repository path the README and the pages name in backticks (``src/...``,
  ``tests/test_x.py::test_name``, ...) exists, with the name defined where one is given.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAP = ROOT / "docs" / "paper-to-code.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# Where repository paths start (a token like `configs/...` is a package-relative name).
TOP = r"(?:src|python|csrc|crates|tests|scripts|benchmarks|docs|examples|build_backend|third_party)"


def _map_rows() -> list[tuple[str, str]]:
    rows = []
    for line in MAP.read_text().splitlines():
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


# A definition, or a row of src/binarize/elementwise.rs's `named_choice!` tables (`ActW, option`).
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


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_link_reaches_a_file_and_heading(page):
    for link in _links(page):
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        assert dest.exists(), f"{page.name}: {link} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_the_readme_links_every_page():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    assert set(PAGES) <= linked, sorted(p.name for p in set(PAGES) - linked)


def _named_paths(page: Path) -> list[tuple[str, str | None]]:
    refs = []
    for token in re.findall(r"`([^`\s]+)`", page.read_text()):
        m = re.fullmatch(TOP + r"/[\w./-]*?(?:::(\w+))?", token)
        if m:
            path, _, name = token.partition("::")
            refs.append((path.rstrip("/"), name or None))
    return refs


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_named_path_exists(page):
    refs = _named_paths(page)
    for path, name in refs:
        target = ROOT / path
        assert target.exists(), f"{page.name}: {path} does not exist"
        if name is not None:
            assert _defined(target, name), f"{page.name}: {name} is not defined in {path}"


def test_a_wrong_link_or_path_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n[x](missing.md) [y](#a-title) `tests/test_nothing_here.py`\n")
    assert _links(page) == ["missing.md", "#a-title"]
    assert _anchors(page) == {"a-title"}
    assert not (tmp_path / "missing.md").exists()
    assert _named_paths(page) == [("tests/test_nothing_here.py", None)]
    assert not (ROOT / "tests/test_nothing_here.py").exists()
