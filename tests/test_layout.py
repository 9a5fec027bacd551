"""The test suite's own plumbing: shared pieces come from conftest.py fixtures or helper modules,
never by importing a test module (which pytest would then collect under two names, and whose
fixtures would silently be shadowed), and every fixture name means one thing."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _modules() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in sorted(TESTS.glob("*.py"))}


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture" or (
        isinstance(target, ast.Name) and target.id == "fixture")


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_imports_a_test_module_or_conftest():
    offenders = {
        name: sorted(m for m in _imported_modules(tree)
                     if m.startswith(("tests.test_", "tests.conftest")) or m in ("conftest", "tests.conftest"))
        for name, tree in _modules().items()
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_each_fixture_name_is_defined_once():
    defined = defaultdict(list)
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_is_fixture, node.decorator_list)):
                defined[node.name].append(name)
    assert "golden_weights" in defined and "rtsp_server" in defined  # the scan sees conftest and plugins
    assert {fixture: files for fixture, files in defined.items() if len(files) > 1} == {}
