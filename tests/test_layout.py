"""The layering of the tree: serving/ is the HTTP layer over the gpt2jax library.

serving/ never imports JAX or Flax itself (device work is the library's), and no module of gpt2jax/ or
serving/ imports, even through others, one that imports it back. The imports are read with `ast` (top
level and inside functions; those under `if TYPE_CHECKING:` are left out, since they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt2jax", "serving")
DEVICE_LIBRARIES = ("jax", "jaxlib", "flax")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, module: str) -> list[str]:
    """Every module named by an import in the file (absolute; relative ones resolved), with `from a import
    b` giving both a and a.b (b may be a submodule), outside `if TYPE_CHECKING:` blocks."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of gpt2jax/ and serving/ it imports (a package's __init__ included)."""
    modules = sources()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(path, module):
            if name in modules and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_serving_imports_no_jax_or_flax():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for module, path in sources().items()
        if module.partition(".")[0] == "serving"
        for name in imported_names(path, module)
        if name.partition(".")[0] in DEVICE_LIBRARIES
    ]
    assert not offenders, "serving/ is HTTP only; device work is gpt2jax's: " + "; ".join(offenders)


def test_no_import_cycle_in_gpt2jax_or_serving():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_reader_sees_what_it_checks():
    graph = import_graph()
    assert "serving.app" in graph and "gpt2jax.lm" in graph  # both packages are read
    assert "serving.errors" in graph["serving.app"]  # a top-level import
    assert "serving.loading" in graph["serving.multihost"]  # one inside a function
    assert "gpt2jax.lm" not in graph["gpt2jax"]  # gpt2jax/__init__.py names it under TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
