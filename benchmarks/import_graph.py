"""The package's import graph, from the source (`ast`): who imports whom inside `llama_adapter`.

    python benchmarks/import_graph.py            # print each module's imports of other package modules
    python benchmarks/import_graph.py --check    # exit 1 on an import circle, or if the library imports the CLI

Every import counts, also those inside functions and under `if TYPE_CHECKING:`: a circle hidden in a function is
still a circle. Imports of a package (`llama_adapter.backends`) point at its `__init__` module. `__main__` (the
`python -m llama_adapter` entry point) is the one module outside `cli` allowed to import it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "llama_adapter"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t.startswith(PACKAGE) and t != mod:
                    edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail on circles or on library modules importing the CLI")
    args = ap.parse_args()
    edges = graph()
    if not args.check:
        for m in sorted(edges):
            print(
                f"{m.removeprefix(PACKAGE + '.') or PACKAGE} -> "
                + ", ".join(sorted(t.removeprefix(PACKAGE + ".") for t in edges[m]))
            )
    bad = [f"circle: {' <-> '.join(c)}" for c in cycles(edges)]
    cli = f"{PACKAGE}.cli"
    bad += [
        f"{m} imports the CLI"
        for m, ts in sorted(edges.items())
        if not (m == cli or m.startswith(cli + ".") or m == f"{PACKAGE}.__main__")
        and any(t == cli or t.startswith(cli + ".") for t in ts)
    ]
    for b in bad:
        print(b, file=sys.stderr)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(bad)} problems", file=sys.stderr)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
