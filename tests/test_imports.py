"""The import graph of fullchain has no cycles (issue 13), read from the source with ``ast``: nothing is imported.

Every ``import`` counts, also the ones inside functions: a lazy import only hides a cycle, it does not remove
it. ``from fullchain.x import y`` is an edge to ``fullchain.x.y`` when that is a module, else to ``fullchain.x``.
Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are left out, so a
package ``__init__`` that re-exports its own submodules is not reported as a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of ``package`` under ``src``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _deepest_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (file ``path``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_deepest_module(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else _deepest_module(base, modules))
    return {target for target in found if target is not None and target != name}


def import_graph(src: Path, package: str) -> nx.DiGraph:
    """Directed graph: an edge ``a -> b`` when module ``a`` of ``package`` imports module ``b`` of it."""
    modules = module_files(src, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in imported_modules(name, path, modules))
    return graph


def import_cycles(graph: nx.DiGraph) -> list[str]:
    """Every elementary cycle as ``a -> b -> a``, each started at its smallest name, sorted."""
    cycles = []
    for cycle in nx.simple_cycles(graph):
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        cycles.append(" -> ".join([*cycle, cycle[0]]))
    return sorted(cycles)


def test_graph_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n")  # re-export: not a cycle
    (package / "a.py").write_text("from pkg.sub import b\nimport os\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def later():\n    from .. import a\n    return a\n")
    (package / "c.py").write_text("import pkg.a\nfrom pkg.sub.b import later\n")

    graph = import_graph(tmp_path, "pkg")

    assert set(graph.edges) == {("pkg", "pkg.a"), ("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.a"),
                                ("pkg.c", "pkg.a"), ("pkg.c", "pkg.sub.b")}
    assert import_cycles(graph) == ["pkg.a -> pkg.sub.b -> pkg.a"]


def test_distributed_has_no_import_cycle():
    graph = import_graph(SRC, "fullchain")
    distributed = graph.subgraph(n for n in graph if n.startswith("fullchain.distributed."))

    assert distributed.number_of_edges() > 0  # the walker saw the package's own imports
    assert import_cycles(distributed) == []


def test_package_has_no_import_cycle():
    cycles = import_cycles(import_graph(SRC, "fullchain"))
    assert cycles == [], f"{len(cycles)} import cycles:\n" + "\n".join(cycles)


# The layers of ../shared/ARCHITECTURE.md's package map, lowest first: a module may import its own layer and
# the ones below it, never one above (an import that "climbs back up" couples a piece to its users).
LAYERS = [
    "fullchain fullchain.errors fullchain.metric_names fullchain.versions fullchain.bearer",
    "fullchain.tasks",
    "fullchain.models",
    "fullchain.config",
    "fullchain.data",
    "fullchain.runtime",
    "fullchain.distributed",
    "fullchain.train",
    "fullchain.optimize",
    "fullchain.artifact",
    "fullchain.monitor",
    "fullchain.deploy",
    "fullchain.stages",
    "fullchain.scaffold",
    "fullchain.bench",
    "fullchain.cli",
]


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the longest package prefix of `module` (the root package only matches itself)."""
    matches = [(len(prefix), index) for index, names in enumerate(LAYERS) for prefix in names.split()
               if module == prefix or (prefix != "fullchain" and module.startswith(prefix + "."))]
    return max(matches)[1] if matches else None


def test_no_import_climbs_back_up():
    graph = import_graph(SRC, "fullchain")
    upward = [f"{a} -> {b}" for a, b in sorted(graph.edges) if layer_of(a) < layer_of(b)]
    assert upward == [], "imports into a higher layer:\n" + "\n".join(upward)


def test_every_module_has_a_layer():
    unplaced = [module for module in import_graph(SRC, "fullchain") if layer_of(module) is None]
    assert unplaced == [], f"add these to LAYERS: {unplaced}"
