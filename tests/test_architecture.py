"""The layout's rules, read from the source: no import cycles (deferred imports included), no
private names imported across modules, the library never imports its applications, and only
``paca/backends/`` names a device in code."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "paca"
# may import the public API (`import paca`) and the applications
TOP = ("paca.cli", "paca.recipes", "paca.integrations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every import in the file, functions included."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{prefix}.{base}" if base else prefix
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _edges(name: str) -> set[str]:
    """paca modules that ``name`` imports (``from paca import ops`` counts as ``paca.ops``)."""
    out = set()
    for module, names, _ in _imports(name):
        if not module.startswith("paca"):
            continue
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out |= set(submodules) or {module}
    return out - {name}


def test_no_import_cycles_deferred_imports_included():
    # the root package re-exports everything, so an edge into `paca` itself says nothing about
    # layering; which modules may import it is checked below
    graph = {m: {e for e in _edges(m) if e in MODULES and e != "paca"} for m in MODULES}
    cycles = []

    def visit(node, path, on_path, done):
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, path + [nxt], on_path, done)
                on_path.discard(nxt)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_private_names_cross_modules():
    offenders = []
    for name in MODULES:
        for module, names, line in _imports(name):
            if module.startswith("paca") and module != name:
                offenders += [f"{name}:{line} imports {module}.{n}" for n in names if n[0] == "_"]
    assert not offenders, offenders


def test_the_library_never_imports_its_applications():
    offenders = []
    for name in MODULES:
        if name.startswith(TOP) or name == "paca":
            continue
        for edge in _edges(name):
            if edge == "paca" or edge.startswith(TOP):
                offenders.append(f"{name} imports {edge}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("paca.ops", ("paca.layer", "paca.model", "paca.backends")),
        ("paca.backends", ("paca.layer", "paca.model", "paca.adapters")),
        ("paca.layer", ("paca.model", "paca.adapters", "paca.selection", "paca.targets")),
        ("paca.model", ("paca.adapters", "paca.summary")),
    ],
)
def test_dependencies_point_down(lower, upper):
    below = [m for m in MODULES if m == lower or m.startswith(lower + ".")]
    for name in below:
        bad = [e for e in _edges(name) if e.startswith(upper)]
        assert not bad, f"{name} imports {bad}: {lower} sits below {upper}"


def test_only_backends_name_a_device_in_code():
    devices = {"cuda", "hpu", "xpu", "mps"}
    allowed = ("paca.backends", "paca.integrations.gaudi")  # the Gaudi integration is its device
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(allowed):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in devices
                and id(node) not in docstrings
            ):
                offenders.append(f"{name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr in devices:
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_no_module_is_over_750_lines():
    # one concern per file, readable top to bottom: a module past this grows a package instead
    # (paca/recipes/train.py did at 1,179 lines)
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 750
    }
    assert not long, long
