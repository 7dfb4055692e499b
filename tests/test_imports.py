"""The project's import graph has no cycle: each concept lives in one module, and dependencies point one way."""

from __future__ import annotations

from pathlib import Path

from tests.flows.test_dvc import ROOT, _module_file, _project_imports


def _graph() -> dict[str, set[str]]:
    """Module file -> project module files it imports (at any depth of its code, function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted([*ROOT.joinpath("pickstyle").rglob("*.py"), *ROOT.joinpath("flows").rglob("*.py")]):
        deps = {f for f in map(_module_file, _project_imports(path)) if f is not None and f != path}
        # importing pickstyle.x runs pickstyle/__init__.py first; that edge is not a design dependency
        graph[str(path.relative_to(ROOT))] = {
            str(f.relative_to(ROOT)) for f in deps if f.name != "__init__.py" or f.parent == path.parent
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_pickstyle_or_flows():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_covers_the_tree():
    graph = _graph()
    assert "pickstyle/train.py" in graph and "flows/train.py" in graph
    assert "pickstyle/train.py" in graph["flows/train.py"]
    assert all(Path(ROOT / m).is_file() for m in graph)
