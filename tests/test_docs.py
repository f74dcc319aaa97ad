"""Citations of the design in the code point at sections and files that exist.

Docstrings cite ``docs/DESIGN.md §n`` and ``docs/notes/<note>.md`` (optionally with a quoted
section name). This test reads the sources as text (it imports no fedcl module), so it is fast
and runs even when a package does not import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DESIGN = DOCS / "DESIGN.md"


def _installed_roots() -> tuple[str, ...]:
    """setup.py's ROOTS (the folders installed as fedcl.*), read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no ROOTS list")


CODE_FOLDERS = (*_installed_roots(), "benchmarks")

#: ``docs/DESIGN.md`` then one or more sections: "§3", "§4-§5", "§3 step 4, §7", "§2 and §9".
DESIGN_CITATION = re.compile(
    r"docs/DESIGN\.md\s+(§\d+(?:(?:\s+step\s+\d+)?\s*(?:,|-|–|to|and)\s*§\d+)*)"
)
#: The forms used before the design moved into the repo; they must not come back.
BARE_CITATION = re.compile(r"(?<!docs/)DESIGN\.md\s*§|\bDESIGN\s+§|(?<![\w/])notes/[\w.-]+\.md")
#: A file under docs/, e.g. ``docs/notes/measurements.md``.
DOCS_FILE = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w\.md")
#: A note cited with a section name: ``docs/notes/measurements.md``, "Opacus 1.6".
NOTE_SECTION = re.compile(r"(docs/notes/[\w.-]+\.md)`*\s*,\s*\"([^\"]+)\"")


def sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "setup.py"]
    for folder in CODE_FOLDERS:
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return [f for f in files if f.is_file()]


def headings(path: Path) -> list[str]:
    return [line[3:].strip() for line in path.read_text().splitlines() if line.startswith("## ")]


def design_sections() -> set[int]:
    return {int(m.group(1)) for h in headings(DESIGN) if (m := re.match(r"(\d+)\.\s", h))}


def citations() -> list[tuple[str, str]]:
    """(``file:line``, the line) for every line of code or README that mentions docs/ or DESIGN."""
    found = []
    for path in sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "DESIGN" in line or "docs/" in line:
                found.append((f"{path.relative_to(ROOT)}:{n}", line))
    return found


def broken(lines: list[tuple[str, str]], sections: set[int]) -> list[str]:
    """Every citation among ``lines`` that points nowhere, as 'file:line: why'."""
    problems = []
    for where, line in lines:
        if BARE_CITATION.search(line):
            problems.append(
                f"{where}: cite the design as docs/DESIGN.md §n, notes as docs/notes/…: "
                + line.strip()
            )
        for m in DESIGN_CITATION.finditer(line):
            for n in re.findall(r"§(\d+)", m.group(1)):
                if int(n) not in sections:
                    problems.append(f"{where}: docs/DESIGN.md has no '## {n}.' section")
        for m in DOCS_FILE.finditer(line):
            if not (ROOT / m.group(0)).is_file():
                problems.append(f"{where}: {m.group(0)} does not exist")
        for m in NOTE_SECTION.finditer(line):
            note, name = ROOT / m.group(1), m.group(2)
            if note.is_file() and not any(h.startswith(name) for h in headings(note)):
                problems.append(f"{where}: {m.group(1)} has no '## {name}' section")
    return problems


def test_design_sections_are_numbered_in_order() -> None:
    numbers = [int(m.group(1)) for h in headings(DESIGN) if (m := re.match(r"(\d+)\.\s", h))]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 15


def test_code_cites_the_design() -> None:
    cited = [line for _, line in citations() if DESIGN_CITATION.search(line)]
    assert len(cited) >= 20, "the code's citations of docs/DESIGN.md were not found"


def test_every_citation_points_at_something_that_exists() -> None:
    assert broken(citations(), design_sections()) == []


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('"""Coordinator (docs/DESIGN.md §99)."""', "no '## 99.' section"),
        ('"""Wire (docs/DESIGN.md §4-§77)."""', "no '## 77.' section"),
        ('"""EWC (docs/DESIGN.md §3 step 4, §88)."""', "no '## 88.' section"),
        ('"""Old form (DESIGN.md §4)."""', "cite the design as"),
        ('"""Old form (DESIGN §4)."""', "cite the design as"),
        ("# breaks it (notes/measurements.md).", "cite the design as"),
        ("# see docs/notes/missing.md", "does not exist"),
        ('# (``docs/notes/measurements.md``, "No such section")', "has no '## No such section'"),
    ],
)
def test_a_broken_citation_is_caught(line: str, why: str) -> None:
    problems = broken([("x.py:1", line)], design_sections())
    assert len(problems) == 1 and why in problems[0], problems


def test_a_good_citation_passes() -> None:
    lines = [
        ("x.py:1", '"""Keys (docs/DESIGN.md §4-§5; docs/DESIGN.md §3 step 4, §7)."""'),
        ("x.py:2", '# (``docs/notes/measurements.md``, "Opacus 1.6")'),
        ("x.py:3", "# docs/notes/flower-1.41.md"),
    ]
    assert broken(lines, design_sections()) == []
