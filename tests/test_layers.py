"""limner's import graph: no cycles between modules, and no import from a lower layer to a higher one.

The layers are declared once, in the docstring of src/limner/__init__.py; this test reads them from
there, so the documentation and the check cannot drift apart. Every import statement counts: at
module top, inside functions (a lazy import hides a dependency, it does not remove it), and under
`if TYPE_CHECKING:` (a lower layer that names a higher layer's type still knows about it).
`importlib.import_module` with a constant string counts too. A computed name cannot be read: the
method registry's `import_module(f"limner.methods.{name}")` is not followed, so a cycle closed only
through it goes unseen; the layer check still holds every method module to its layer.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "limner"


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # the limner module it imports
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line}"


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    patterns: tuple[str, ...]  # "limner.io" (that module) or "limner.training.*" (the package and all below it)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The limner module an import of `name` loads: `name` itself, else the longest module prefix
    (limner.a.attr -> limner.a). None outside limner."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import node loads, relative imports made absolute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            # `from . import x` in a package's __init__ is relative to the package itself, in a module to its parent
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import sub` loads the submodule when there is one, else pkg (the name is an attribute)
        return [f"{prefix}.{alias.name}" for alias in node.names]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def import_edges() -> list[Edge]:
    modules = all_modules()
    edges = set()  # `from m import a, b` is one edge
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    edges.add(Edge(module, target, path, node.lineno))
    return sorted(edges, key=lambda e: (e.source, e.line, e.target))


def declared_layers() -> list[Layer]:
    """The numbered list in limner's docstring: `N. name: limner.a, limner.b.*`, continued on indented lines."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    layers, current = [], None
    for line in doc.splitlines():
        if m := re.match(r"^(\d+)\. ([^:]+): (.*)$", line):
            current = [int(m[1]), m[2].strip(), m[3]]
            layers.append(current)
        elif current is not None and line.startswith(" ") and line.strip():
            current[2] += " " + line.strip()
        else:
            current = None
    parsed = [Layer(n, name, tuple(p.strip() for p in text.split(",") if p.strip())) for n, name, text in layers]
    assert parsed, "no layers declared in src/limner/__init__.py's docstring"
    assert [layer.number for layer in parsed] == list(range(1, len(parsed) + 1)), (
        "layers must be numbered 1, 2, 3, ... bottom to top"
    )
    for layer in parsed:
        for p in layer.patterns:
            assert re.fullmatch(r"limner(\.\w+)*(\.\*)?", p), (
                f"layer {layer.number}: {p!r} is not a module name or a package.*"
            )
    return parsed


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return module == package or fnmatch.fnmatchcase(module, pattern)
    return module == pattern


def layer_of(modules: list[str], layers: list[Layer]) -> dict[str, Layer]:
    """Each module's layer. A module named by several patterns takes the most specific one (an exact name over
    a package.*, a deeper package over a shallower one), so a package can sit in one layer and one of its
    modules in another."""
    out = {}
    for module in modules:
        best = None
        for layer in layers:
            for p in layer.patterns:
                if _matches(module, p):
                    rank = (not p.endswith(".*"), p.count("."))
                    if best is None or rank > best[0]:
                        best = (rank, layer)
        if best is not None:
            out[module] = best[1]
    return out


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as the edges that close it."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)  # the first import of a target stands for all
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        # the shortest cycle through the component's first module, by breadth-first search inside it
        start = min(component)
        previous: dict[str, Edge] = {}
        frontier, closing = [start], None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph.get(v, {}).items()):
                    if w not in component:
                        continue
                    if w == start:
                        closing = e
                        break
                    if w not in previous:
                        previous[w] = e
                        nxt.append(w)
                if closing:
                    break
            frontier = nxt
        path, v = [closing], closing.source
        while v != start:
            path.append(previous[v])
            v = previous[v].source
        found.append(path[::-1])
    return found


def test_every_module_has_a_layer():
    layers = declared_layers()
    placed = layer_of(list(all_modules()), layers)
    missing = sorted(set(all_modules()) - set(placed))
    assert not missing, "modules in no layer (add them to the list in src/limner/__init__.py): " + ", ".join(missing)


def test_no_import_cycles():
    found = cycles(import_edges())
    report = [
        "  "
        + " -> ".join([c[0].source] + [e.target for e in c])
        + "\n"
        + "\n".join(f"      {e.where()}: {e.source} imports {e.target}" for e in c)
        for c in found
    ]
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(report)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    layers = declared_layers()
    edges = import_edges()
    placed = layer_of(sorted({e.source for e in edges} | {e.target for e in edges}), layers)
    upward = [
        e
        for e in edges
        if e.source in placed and e.target in placed and placed[e.target].number > placed[e.source].number
    ]
    report = [
        f"  {e.where()}: {e.source} ({placed[e.source].number} {placed[e.source].name}) imports {e.target} "
        f"({placed[e.target].number} {placed[e.target].name})"
        for e in upward
    ]
    assert not upward, f"{len(upward)} import(s) from a lower layer to a higher one:\n" + "\n".join(report)


def test_the_walker_reads_lazy_relative_and_type_checking_imports(tmp_path):
    """The rules above are only as good as the walk: it must see the imports a module hides."""
    code = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from limner.io import cache_dir\n"
        "def f():\n    from . import heldout\n    from .render import render\n    import limner.errors\n"
    )
    names = [n for node in ast.walk(ast.parse(code)) for n in _imported_names(node, "limner.world.bench", False)]
    modules = all_modules()
    assert {_resolve(n, modules) for n in names} >= {
        "limner.io",
        "limner.world.heldout",
        "limner.world.render",
        "limner.errors",
    }
    in_init = [
        n
        for node in ast.walk(ast.parse("from .loop import train\n"))
        for n in _imported_names(node, "limner.training", True)
    ]
    assert _resolve(in_init[0], modules) == "limner.training.loop"


def test_the_cycle_finder_reports_the_path():
    def e(a: str, b: str) -> Edge:
        return Edge(a, b, SRC / "limner" / f"{a}.py", 1)

    found = cycles([e("a", "b"), e("b", "c"), e("c", "a"), e("d", "a"), e("c", "x")])
    assert [[(x.source, x.target) for x in c] for c in found] == [[("a", "b"), ("b", "c"), ("c", "a")]]
