"""eval/'s imports, read with ``ast`` (lazy ones inside functions too): no cycle among its
modules, and no private (underscore) name or module imported from anywhere."""

import ast
from pathlib import Path

import infllm_lite.eval

EVAL = Path(infllm_lite.eval.__file__).parent
PACKAGE = "infllm_lite.eval"


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """``(absolute module, names)`` of every import in an eval module's ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = PACKAGE.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, [alias.name for alias in node.names]))
    return found


def _graph(folder: Path = EVAL) -> dict[str, set[str]]:
    """eval module -> the eval modules it imports (``from . import x`` counts as ``x``)."""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        edges = set()
        for module, names in _imports((folder / f"{name}.py").read_text(encoding="utf-8")):
            if module == PACKAGE:
                edges |= {n for n in names if n in modules}
            elif module.startswith(PACKAGE + "."):
                edges.add(module.split(".")[2])
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_eval_modules_import_each_other_without_a_cycle():
    graph = _graph()
    assert {"plan", "runner", "report"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert "runner" not in graph["report"] and "report" in graph["runner"]


def _private(source: str) -> list[str]:
    """The private modules or names ``source`` imports (dunders such as __future__ aside)."""
    return [f"{module} {n}" for module, names in _imports(source) for n in module.split(".") + names
            if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]


def test_eval_imports_no_private_name():
    private = {p.name: _private(p.read_text(encoding="utf-8")) for p in sorted(EVAL.glob("*.py"))}
    assert not any(private.values()), private


def test_the_checker_sees_a_cycle_and_a_private_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    source = ("from __future__ import annotations\nfrom .passkey import _token_at, PASSKEY\n"
              "def f():\n    from ..attention._impl import x\n")
    assert _private(source) == ["infllm_lite.eval.passkey _token_at",
                                "infllm_lite.attention._impl _impl"]
