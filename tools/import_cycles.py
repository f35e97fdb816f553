"""Print the import cycles among the modules of src/mailpush (every import,
those under TYPE_CHECKING and inside functions included); exit 1 if any.

    python tools/import_cycles.py [SRC_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is not None:
                found.add(target)  # ``from . import x`` imports x, not the package's body again
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def main() -> int:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: {t for t in imports(p, m) if t in modules and t != m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is no cycle: Python
    # runs the parent first, by design (parent -> child edges are skipped).
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t.startswith(m + "."):
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    for c in cycles:
        print(" -> ".join(c))
    print(f"{len(modules)} modules, {sum(len(v) for v in graph.values())} imports, {len(cycles)} cycles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
