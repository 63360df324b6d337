"""The house in numbers: modules, the largest module and function, and the import arrows between
rooms. A room is a top-level module or package of src/deeprecognition (`classifier`, `runs`,
`storage`, ...); an arrow is any import, at module level or inside a function, from one room into
another. tests/test_house.py holds the rules; this prints the figures. From the repository root:

    python tests/house.py [src/deeprecognition]
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "deeprecognition"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE


@dataclass(frozen=True)
class Function:
    where: str  # module.function:line
    lines: int


@dataclass(frozen=True)
class Module:
    name: str  # deeprecognition.runs.session
    path: Path
    lines: int
    imports: frozenset[str]  # the package's modules it imports
    functions: tuple[Function, ...]

    @property
    def room(self) -> str:
        return room(self.name)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def read_modules(root: Path = SOURCE) -> list[Module]:
    modules = []
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        text = path.read_text()
        tree = ast.parse(text)
        functions = tuple(_functions(tree, name))
        modules.append(Module(name, path, len(text.splitlines()), frozenset(_imported(tree, name)), functions))
    return modules


def _imported(tree: ast.AST, module: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            # `from deeprecognition import storage` imports the module deeprecognition.storage.
            names |= {f"{base}.{alias.name}" for alias in node.names} if base == PACKAGE else {base}
    return {name for name in names if name.split(".")[0] == PACKAGE}


def _functions(tree: ast.AST, module: str):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield Function(f"{module}.{node.name}:{node.lineno}", node.end_lineno - node.lineno + 1)


def arrows(modules: list[Module]) -> set[tuple[str, str]]:
    """(from room, to room) for every import that crosses rooms."""
    return {(m.room, room(dep)) for m in modules for dep in m.imports if room(dep) != m.room}


def rooms(modules: list[Module]) -> set[str]:
    return {m.room for m in modules if m.name != f"{PACKAGE}.__init__"}


def main(root: Path) -> None:
    modules = read_modules(root)
    edges = arrows(modules)
    largest = max(modules, key=lambda m: m.lines)
    longest = max((f for m in modules for f in m.functions), key=lambda f: f.lines)
    print(f"modules {len(modules)}, rooms {len(rooms(modules))}, arrows between rooms {len(edges)}")
    print(f"largest module: {largest.name} ({largest.lines} lines)")
    print(f"longest function: {longest.where} ({longest.lines} lines)")
    for name in sorted(rooms(modules)):
        print(f"  {name} -> {', '.join(sorted(to for src, to in edges if src == name)) or '-'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)
