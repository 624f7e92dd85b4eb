"""The package's import graph: no cycles (function-level imports included), and the HTTP service's
imports stay clear of training code and of the report's plotting."""

import ast
import os
import subprocess
import sys

from helpers import ROOT, subprocess_env

PACKAGE = "diff_fastener_jax"


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for folder, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _nodes(tree, lazy: bool):
    """Every node of `tree`; with `lazy=False` not those inside functions (run only when called)."""
    if lazy:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [
            c
            for c in ast.iter_child_nodes(node)
            if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        ]


def _imports(name: str, path: str, modules: dict[str, str], lazy: bool = True) -> set[str]:
    """The package modules that `name` imports: anywhere in its source, or with `lazy=False` only where
    importing it runs (not inside functions). `from a import b` counts as an import of a.b where that
    is a module, else of a."""
    is_package = path.endswith("__init__.py")
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in _nodes(tree, lazy):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == PACKAGE:
                found.add(target)
    found.discard(name)
    return found


def _graph(lazy: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, lazy) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every package module that importing `start` runs: its imports, transitively, and the
    `__init__` of every package on the way."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        parts = node.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += graph.get(node, ())
    return seen


def _imports_matplotlib(path: str) -> bool:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    return any(name.split(".")[0] == "matplotlib" for name in names)


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert "diff_fastener_jax.models.layers" in graph and graph["diff_fastener_jax.models.layers"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_cycle():
    """A lazy cycle: a package's lazy attribute imports a module that imports the package back."""
    graph = {"pkg": {"pkg.detector"}, "pkg.detector": {"pkg.threshold"}, "pkg.threshold": {"pkg"}}
    assert _find_cycle(graph) == ["pkg", "pkg.detector", "pkg.threshold", "pkg"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_service_imports_no_training_and_no_report_code():
    """What `import diff_fastener_jax.deploy.service` runs. (Serving a training run folder instead of an
    export loads its checkpoint through training/, inside the function that does it.)"""
    graph = _graph(lazy=False)
    reached = _closure(graph, "diff_fastener_jax.deploy.service")
    assert "diff_fastener_jax.deploy.heatmap" in reached
    bad = sorted(
        m for m in reached if m.startswith("diff_fastener_jax.training") or m == "diff_fastener_jax.evaluation.report"
    )
    assert not bad, bad
    modules = _modules()
    plotting = sorted(m for m in reached if m in modules and _imports_matplotlib(modules[m]))
    assert not plotting, plotting
    # and at run time: the modules an import of the service loads
    code = (
        "import sys, diff_fastener_jax.deploy.service; "
        "print(sorted(m for m in sys.modules if m.startswith(('diff_fastener_jax.training', 'matplotlib')) "
        "or m == 'diff_fastener_jax.evaluation.report'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_version_is_defined_once_and_matches_pyproject():
    import re

    import diff_fastener_jax
    from diff_fastener_jax import version

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        declared = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert version.__version__ == diff_fastener_jax.__version__ == declared
    assert _graph()["diff_fastener_jax.version"] == set()  # imports nothing of the package
