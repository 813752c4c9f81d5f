"""The layout keeps the design visible: engines are used through their protocol, and clair/ has no import cycle.

Both are read from the source (ast), so a new `backend is studio.local` or a reach into another object's
private state fails here, named with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

CLAIR = Path(__file__).resolve().parent.parent / "clair"
ENGINE_NAMES = {"ollama", "local", "image"}
SHELL = {"arbiter.shell"}  # the lease is part of the arbiter's shell: it may use the shell's own state
KNOWN_CYCLES: set[tuple[str, ...]] = set()  # none: a new cycle fails here, named


def module(path: Path) -> str:
    """clair/service/studio.py -> "service.studio"; a package's __init__.py -> the package ("arbiter")."""
    parts = path.relative_to(CLAIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "clair"


def sources():
    for path in sorted(CLAIR.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_nothing_outside_an_engine_asks_which_engine_it_is():
    found = []
    for path, tree in sources():
        if module(path).startswith("engines."):  # the engines themselves may know who they are
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr in ENGINE_NAMES for s in sides):
                    found.append(f"{module(path)}:{node.lineno}: {ast.unparse(node)}")
            # Reaching into an engine's or the arbiter's private state (image._pipe, arbiter._lock).
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr in ENGINE_NAMES | {"arbiter"}
                and module(path) not in SHELL
            ):
                found.append(f"{module(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "use the engine protocol (clair/engines/base.py) instead:\n" + "\n".join(found)


def imports() -> dict[str, set[str]]:
    """clair module ("service.studio") -> the clair modules it imports, at run time (imports under
    TYPE_CHECKING left out). `from clair.device import gpu` counts as device.gpu, `from clair.arbiter import
    Lease` as the arbiter package."""
    graph: dict[str, set[str]] = {}
    names = {module(p) for p in CLAIR.rglob("*.py")}
    for path, tree in sources():
        deps: set[str] = set()

        def visit(node, deps=deps):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child)
                return
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clair":
                base = node.module.removeprefix("clair").lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    deps.add(sub if sub in names else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name.removeprefix("clair.") for a in node.names if a.name.startswith("clair."))
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(tree)
        graph[module(path)] = (deps & names) - {module(path)}
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
    assert not ({"service.front"} & graph["service.studio"] and {"service.studio"} & graph["service.front"])


# Each layer may use the ones below it, never those above (docs/design.md, "Layers"). The arbiter package's
# __init__ re-exports its policy and shell; the placement policy beside them is pure too.
LAYERS = ["base", "device", "arbiter", "engines", "service", "edge", "adapters", "main"]


def layer(name: str) -> str:
    return name.split(".")[0]


# Known to reach up, to be mended next (the list only shrinks): RenderParams.validated (the image engine)
# checks a render against the front door's limits; the check belongs in the service.
KNOWN_UP = {"engines.image imports service.limits"}


def test_each_layer_imports_only_the_layers_below_it():
    order = {name: i for i, name in enumerate(LAYERS)}
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in imports().items()
        for dep in deps
        if mod != "clair" and order[layer(dep)] > order[layer(mod)]
    )
    assert set(wrong) <= KNOWN_UP, "a layer reaches up:\n" + "\n".join(sorted(set(wrong) - KNOWN_UP))
    assert set(wrong) >= KNOWN_UP, f"mended: take these off KNOWN_UP: {sorted(KNOWN_UP - set(wrong))}"


def test_the_arbiter_policy_imports_nothing_of_clair_but_errors():
    graph = imports()
    for pure in ("arbiter.policy", "arbiter.placement"):
        assert graph[pure] <= {"base.errors"}, (pure, graph[pure])


# A function longer than this hides its steps: split it into named pieces (issue 15, "A layout that shows
# the design"). The ones still over it, to be split next, are listed by name; the list only shrinks (it is
# empty since Studio._render's hooks became clair/service/render_run.py).
MAX_FUNCTION_LINES = 80
KNOWN_LONG: set[str] = set()


def long_functions(trees) -> dict[str, int]:
    """module.Class.function -> its lines, for each function over MAX_FUNCTION_LINES in (path, tree) pairs."""
    found: dict[str, int] = {}
    for path, tree in trees:

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > MAX_FUNCTION_LINES:
                            found[name] = lines
                    visit(child, name)
                else:
                    visit(child, prefix)

        visit(tree, module(path) if path.is_absolute() else path.stem)
    return found


def test_no_function_in_clair_is_over_80_lines():
    long = long_functions(sources())
    new = {name: n for name, n in long.items() if name not in KNOWN_LONG}
    assert not new, f"split these into named pieces (at most {MAX_FUNCTION_LINES} lines each): {new}"
    done = KNOWN_LONG - set(long)
    assert not done, f"these are short now: take them off KNOWN_LONG: {sorted(done)}"


def test_the_length_check_sees_a_long_method_and_a_nested_function():
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"class C:\n    def m(self):\n{body}\n\n    def short(self):\n        pass\n")
    assert long_functions([(Path("mod.py"), tree)]) == {"mod.C.m": MAX_FUNCTION_LINES + 1}
    nested = ast.parse(f"def outer():\n    def inner():\n{body}\n    return inner\n")
    assert set(long_functions([(Path("mod.py"), nested)])) == {"mod.outer", "mod.outer.inner"}
