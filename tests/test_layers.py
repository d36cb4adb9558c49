"""The import graph of the package: layers point down (jobs -> pipeline -> models), no module takes part in a
cycle, and nothing installed imports `bench/` (which lives beside the package). Lazy imports inside functions
count: a cycle that only closes at run time is still two modules that cannot be understood apart."""
from __future__ import annotations

import ast
from pathlib import Path

from testkit import ROOT

LAYERS = {"models": 0, "pipeline": 1, "jobs": 2}


def _modules() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("segmill", *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, anywhere in its body (an imported package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_layers_import_only_downwards() -> None:
    upward = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
              if LAYERS[b.split(".")[1]] > LAYERS[a.split(".")[1]]]
    assert upward == []


def test_nothing_installed_imports_the_benchmarks() -> None:
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "bench" or n.startswith("bench.") for n in names), path


def test_the_scan_sees_a_cycle_when_there_is_one() -> None:
    """The checks above must be able to fail: a planted cycle and a planted upward edge are found."""
    graph = _graph()
    graph["segmill.models.spec"] = graph["segmill.models.spec"] | {"segmill.models.registry"}
    graph["segmill.models.registry"] = graph["segmill.models.registry"] | {"segmill.models.spec"}
    assert ["segmill.models.registry", "segmill.models.spec"] in _cycles(graph)
    assert "segmill.pipeline.bulk.job" in _graph()["segmill.jobs.cli.segment"] | _graph()["segmill.jobs.demo"]
