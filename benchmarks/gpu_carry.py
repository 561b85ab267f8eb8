"""The wheels the GPU suite needs on the offline GPU machine, derived from the code and constraints.txt.

The GPU machine has Python 3.12 and PyTorch (with what torch itself requires) but no internet, so every other
package the suite's benchmarks import travels as a wheel. Which ones is not written down by hand:

1. roots: the third-party packages that importing ``fullchain.cli`` and each suite benchmark's module loads
   (measured by importing them here), plus those a benchmark module imports inside its functions (read from its
   source; an import inside ``try: ... except ImportError`` is optional and the benchmark skips what needs it);
2. the closure of their requirements (package metadata, markers evaluated for CPython 3.12 on Linux x86_64),
   less torch and everything torch requires;
3. each at the version constraints.txt pins (a package without a pin is an error: pin it first).

    python benchmarks/gpu_carry.py amp fusion serve      # prints NAME==VERSION, one a line

Run it with the project's virtualenv (the packages must be installed here: their metadata is read locally).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
PROVIDED = "torch"  # the GPU machine's own: it and everything it requires are never carried


def read_pins(path: Path) -> dict[str, str]:
    """constraints.txt as canonical name -> exact version."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def requirements(dist: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """`dist`'s requirements that apply on the target (its `extras` included), from the installed metadata."""
    found = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras | {""}):
            found.append(req)
    return found


def closure(roots: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Every distribution `roots` (name -> extras) need on the target, with the extras asked of each."""
    seen: dict[str, frozenset[str]] = {}
    todo = list(roots.items())
    while todo:
        name, extras = todo.pop()
        name = canonicalize_name(name)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, frozenset()) | extras
        try:
            todo += [(r.name, frozenset(r.extras)) for r in requirements(name, seen[name])]
        except md.PackageNotFoundError:
            if name != "triton" and not name.startswith("nvidia-"):  # torch's CUDA-only requirements
                raise SystemExit(f"gpu_carry: {name} is needed but not installed here; "
                                 f"install it with: .venv/bin/pip install -c constraints.txt {name}") from None
    return seen


def lazy_imports(module: str) -> tuple[set[str], set[str]]:
    """Modules a benchmark imports inside its functions: (required, optional). A package is optional when the
    module imports it somewhere inside a ``try`` that handles ImportError (it skips what needs the package)."""
    source = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(source).read_text())
    optional_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            optional_nodes |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    required, optional = set(), set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            (optional if id(node) in optional_nodes else required).update(names)
    guarded = {name.split(".")[0] for name in optional}  # a package guarded once is optional everywhere
    return {name for name in required if name.split(".")[0] not in guarded}, optional


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def suite_modules(benches: list[str]) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from fullchain.bench import BENCHMARKS

    unknown = [b for b in benches if b not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"gpu_carry: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [f"fullchain.bench.{BENCHMARKS[b][0]}" for b in benches]


def imported_distributions(modules: list[str]) -> set[str]:
    """Distributions whose modules are loaded by importing `modules` (measured, in this process)."""
    before = set(sys.modules)
    for module in modules:
        importlib.import_module(module)
    owners = md.packages_distributions()
    tops = {m.split(".")[0] for m in set(sys.modules) - before}
    return {canonicalize_name(d) for top in tops if top != "fullchain" for d in owners.get(top, [])}


def suite_imports(benches: list[str]) -> tuple[list[str], set[str], set[str]]:
    """What the suite imports: (fullchain modules, third-party top-level modules its benchmarks import inside
    functions, optional top-level modules)."""
    modules = suite_modules(benches)
    to_import, third_party, optional = ["fullchain.cli", *modules], set(), set()
    for module in modules:
        required, opt = lazy_imports(module)
        to_import += sorted(m for m in required if m.startswith("fullchain."))
        third_party |= {m.split(".")[0] for m in required if not m.startswith("fullchain.")}
        optional |= {m.split(".")[0] for m in opt}
    return list(dict.fromkeys(to_import)), third_party, optional - third_party  # another benchmark may need it


def provided() -> set[str]:
    """torch and every distribution it requires on the target (the GPU machine has them)."""
    return set(closure({PROVIDED: frozenset()}))


def carry_list(benches: list[str], constraints: Path = ROOT / "constraints.txt") -> tuple[dict[str, str], list[str]]:
    """The pinned carry list (canonical name -> version) and notes on what it leaves out."""
    to_import, third_party, optional = suite_imports(benches)
    owners = md.packages_distributions()
    roots = imported_distributions(to_import) | {canonicalize_name(d) for m in third_party
                                                 for d in owners.get(m, [m])}
    torch_brings = provided()
    needed = {name for name in closure(dict.fromkeys(roots - torch_brings, frozenset())) if name not in torch_brings}
    pins = read_pins(constraints)
    unpinned = sorted(needed - pins.keys())
    if unpinned:
        raise SystemExit(f"gpu_carry: {constraints.name} pins no version of {', '.join(unpinned)}: add the pin")
    notes = [f"optional, not carried (the benchmark skips what needs it): {', '.join(sorted(optional))}"]
    return {name: pins[name] for name in sorted(needed)}, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="+", help="the benchmarks gpu_suite.sh runs")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt", help="the pins")
    parser.add_argument("--modules", action="store_true", help="print the fullchain modules the suite imports")
    parser.add_argument("--provided", action="store_true", help="print what the GPU machine's torch brings")
    args = parser.parse_args()
    if args.modules or args.provided:
        print("\n".join(suite_imports(args.benches)[0] if args.modules else sorted(provided())))
        return
    pins, notes = carry_list(args.benches, args.constraints)
    for name, version in pins.items():
        print(f"{name}=={version}")
    for note in notes:
        print(f"gpu_carry: {note}", file=sys.stderr)


if __name__ == "__main__":
    main()
