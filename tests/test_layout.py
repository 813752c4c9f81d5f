"""The layout keeps the design visible: engines are used through their protocol, and clair/ has no import cycle.

Both are read from the source (ast), so a new `backend is studio.local` or a reach into another object's
private state fails here, named with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

CLAIR = Path(__file__).resolve().parent.parent / "clair"
ENGINES = {"chat.py", "image.py", "engines.py", "tiny.py"}  # the engines themselves may know who they are
ENGINE_NAMES = {"ollama", "local", "image"}
SHELL = {"arbiter.py"}  # the lease is part of the arbiter's shell: it may use the shell's own state
KNOWN_CYCLES: set[tuple[str, ...]] = set()  # none: a new cycle fails here, named


def sources():
    for path in sorted(CLAIR.glob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_nothing_outside_an_engine_asks_which_engine_it_is():
    found = []
    for path, tree in sources():
        if path.name in ENGINES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr in ENGINE_NAMES for s in sides):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            # Reaching into an engine's or the arbiter's private state (image._pipe, arbiter._lock).
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr in ENGINE_NAMES | {"arbiter"}
                and path.name not in SHELL
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "use the engine protocol (clair/engines.py) instead:\n" + "\n".join(found)


def imports() -> dict[str, set[str]]:
    """clair module -> the clair modules it imports, at run time (imports under TYPE_CHECKING left out)."""
    graph: dict[str, set[str]] = {}
    names = {p.stem for p in CLAIR.glob("*.py")}
    for path, tree in sources():
        deps: set[str] = set()

        def visit(node, deps=deps):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child)
                return
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clair":
                parts = node.module.split(".")
                deps.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("clair."))
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(tree)
        graph[path.stem] = (deps & names) - {path.stem}
    return graph


def test_clair_has_no_import_cycle():
    graph = imports()
    cycles = set()

    def walk(start, node, path):
        for dep in graph[node]:
            if dep == start:
                cycles.add(tuple(path))
            elif dep not in path and dep > start:
                walk(start, dep, [*path, dep])

    for name in graph:
        walk(name, name, [name])
    assert cycles <= KNOWN_CYCLES, sorted(cycles - KNOWN_CYCLES)
    assert "service" not in graph["studio"] or "studio" not in graph["service"]  # the front door sits beside
