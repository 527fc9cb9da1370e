"""The shape of the code: the limits issue 12 set, kept by a test rather than by memory.

No module over 400 lines, no function over 60, and the scanner never imports the index (the index
builds on the scanner, not the other way round).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("scanner", "index", "superweight", "bench") for p in (ROOT / folder).rglob("*.py")
                 if "migrations" not in p.parts)


def test_the_sources_are_found():
    assert {p.relative_to(ROOT).as_posix() for p in SOURCES} >= {"scanner/scan.py", "index/crawl/driver.py",
                                                                 "superweight/cli.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines; split it"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == [], f"{path.name}: functions over 60 lines: {long}"


def test_the_scanner_never_imports_the_index():
    upward = []
    for path in (ROOT / "scanner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            upward += [f"{path.name}: {n}" for n in names if n.startswith(("superweight.index", "index"))]
    assert upward == []
