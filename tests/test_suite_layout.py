"""The suite's own conventions: conftest's `SLOW` table names tests that exist, helpers come from
helpers.py, and nothing in tests/ or configs/ edits the import path."""

import ast
import os

from helpers import ROOT

TESTS = os.path.join(ROOT, "tests")


def _slow_table() -> dict:
    """conftest.py's `SLOW` dict, read from its source (tests do not import conftest)."""
    with open(os.path.join(TESTS, "conftest.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["SLOW"]:
            return ast.literal_eval(node.value)
    raise AssertionError("conftest.py defines no SLOW table")


def _test_functions(module: str) -> set[str]:
    with open(os.path.join(TESTS, module)) as f:
        tree = ast.parse(f.read(), module)
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_slow_entry_names_an_existing_module_and_test():
    """A renamed test would otherwise drop out of the `slow` set silently (and slow the inner loop)."""
    slow = _slow_table()
    assert slow
    stale = []
    for key in slow:
        module, _, test = key.partition("::")
        if not os.path.isfile(os.path.join(TESTS, module)):
            stale.append(key)
        elif test and test.split("[", 1)[0] not in _test_functions(module):
            stale.append(key)
    assert not stale, f"SLOW entries that name no test: {stale}"
    assert all(isinstance(reason, str) and reason.strip() for reason in slow.values())


def _python_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def test_no_module_edits_the_import_path_or_imports_from_conftest():
    offenders = []
    for path in _python_files(TESTS) + _python_files(os.path.join(ROOT, "configs")):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path}:{node.lineno}: sys.path")
            if isinstance(node, ast.ImportFrom) and node.module in ("conftest", "tests.conftest", "configs"):
                offenders.append(f"{path}:{node.lineno}: from {node.module} import")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "configs" for a in node.names):
                offenders.append(f"{path}:{node.lineno}: import configs")
    assert not offenders, offenders
