"""The package's imports, read with ``ast`` (lazy ones inside functions too): no import
cycle anywhere, the layers in their order (``models/`` never imports ``attention/``, nor
``attention/`` ``models/``; ``options.py`` needs no torch), and no private (underscore)
name imported from another module of the package."""

import ast
from pathlib import Path

import infllm_lite

ROOT = Path(infllm_lite.__file__).parent
PACKAGE = "infllm_lite"


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, source: str) -> list[tuple[str, list[str]]]:
    """``(absolute module, names)`` of every import in module ``name``'s ``source``."""
    is_package = name in {module_name(p) for p in ROOT.rglob("__init__.py")}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, [alias.name for alias in node.names]))
    return found


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from . import x`` counts as ``x``)."""
    out = {}
    for name, source in sources.items():
        edges = set()
        for module, names in imports(name, source):
            subs = {f"{module}.{n}" for n in names} & sources.keys()
            edges |= subs or ({module} & sources.keys())
        out[name] = edges - {name}
    return out


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as a path, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(g):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def private_imports(name: str, source: str) -> list[str]:
    """Private modules or names ``name`` imports from the package's other modules (dunders
    aside): what a module shares is public."""
    return [f"{module} {n}" for module, names in imports(name, source) if module.startswith(PACKAGE)
            for n in module.split(".") + names
            if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]


SOURCES = {name: path.read_text(encoding="utf-8") for name, path in modules().items()}
GRAPH = graph(SOURCES)


def test_the_package_has_no_import_cycle():
    assert len(GRAPH) > 40 and "infllm_lite.attention.kernels" in GRAPH
    found = cycle(GRAPH)
    assert found is None, " -> ".join(found)


def test_models_and_attention_do_not_import_each_other():
    for name, edges in GRAPH.items():
        if name.startswith("infllm_lite.models"):
            assert not {e for e in edges if e.startswith("infllm_lite.attention")}, name
        if name.startswith("infllm_lite.attention"):
            assert not {e for e in edges if e.startswith("infllm_lite.models")}, name
    assert "infllm_lite.rope" in GRAPH["infllm_lite.models.transformer"]
    assert "infllm_lite.rope" in GRAPH["infllm_lite.attention.infllm"]


def test_eval_report_does_not_import_the_runner():
    assert "infllm_lite.eval.runner" not in GRAPH["infllm_lite.eval.report"]
    assert "infllm_lite.eval.report" in GRAPH["infllm_lite.eval.runner"]


def test_options_need_no_torch():
    """options.py (and what it imports) is what --help and option checks read."""
    seen, todo = set(), ["infllm_lite.options"]
    while todo:
        name = todo.pop()
        seen.add(name)
        assert not [m for m, _ in imports(name, SOURCES[name]) if m.split(".")[0] == "torch"], name
        todo += [e for e in GRAPH[name] if e not in seen]


def test_no_private_name_is_imported():
    found = {name: private_imports(name, source) for name, source in SOURCES.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_the_checkers_see_what_they_look_for():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    source = ("from __future__ import annotations\nfrom .passkey import _token_at, PASSKEY\n"
              "def f():\n    from ..attention._impl import x\n")
    assert private_imports("infllm_lite.eval.synthetic", source) == [
        "infllm_lite.eval.passkey _token_at", "infllm_lite.attention._impl _impl"]
    assert graph({"infllm_lite.a": "from . import b\n", "infllm_lite.b": "from .a import x\n"}) == {
        "infllm_lite.a": {"infllm_lite.b"}, "infllm_lite.b": {"infllm_lite.a"}}
