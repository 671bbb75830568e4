"""The module graph of the fastlla package, read from its imports; fails on an import cycle.

    python scripts/import_graph.py          # text: each module and the package modules it imports
    python scripts/import_graph.py --dot    # Graphviz DOT (render with `dot -Tsvg`)

Every ``import`` / ``from ... import`` statement counts, including those inside functions (a
lazy import is still a dependency). Only the standard library's ``ast`` is used: the modules
are parsed, not imported. Exits with status 1, naming the cycle, if the graph has one, and if
a library module (``fastlla/*.py``, ``__main__`` aside) imports the application subpackage
``fastlla.apps``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "fastlla"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package modules ``path`` imports (``from .x import y`` counts ``.x.y`` when that is a
    module, else ``.x``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([stem] if stem else []))
            # `from x import y` imports the module x.y where there is one, else (a name) x
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # fastlla.x.y (an attribute) -> fastlla.x
                target = target.rpartition(".")[0]
            if target and target not in (name, PACKAGE):
                found.add(target)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: the package modules it imports}`` for every module under ``root``."""
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports(p, modules, root) for p in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT")
    parser.add_argument("--root", type=Path, default=ROOT, help="the package directory")
    args = parser.parse_args()
    edges = graph(args.root.resolve())
    if args.dot:
        print("digraph fastlla {\n  rankdir=BT;\n  node [shape=box, fontname=monospace];")
        for mod in sorted(edges):
            for dep in sorted(edges[mod]):
                print(f'  "{short(mod)}" -> "{short(dep)}";')
        print("}")
    else:
        for mod in sorted(edges):
            print(f"{short(mod):24s} -> {', '.join(sorted(map(short, edges[mod]))) or '-'}")
    status = 0
    cycle = find_cycle(edges)
    if cycle:
        print("import cycle: " + " -> ".join(map(short, cycle)), file=sys.stderr)
        status = 1
    apps = f"{PACKAGE}.apps"
    for mod, deps in sorted(edges.items()):
        library = not (mod == apps or mod.startswith(apps + ".") or mod == f"{PACKAGE}.__main__")
        if library and any(d == apps or d.startswith(apps + ".") for d in deps):
            print(f"library module {mod} imports the application package {apps}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
