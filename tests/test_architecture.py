"""The package's shape: no import cycle among ``aimm`` modules, no module over 450 lines.

Imports are read from the source (AST), anywhere in a module: at the top, inside functions and
methods, lazy ``__getattr__`` ones, and those under ``if TYPE_CHECKING:`` too (they never run, but a
reader and a type checker follow them, so they may not close a cycle either). Importing ``aimm.a.b`` also imports the package ``aimm.a`` (its ``__init__`` runs), so
that is an edge too. The one exception: a submodule importing its own parent package
(``aimm/data/loader.py`` -> ``aimm.data``) is not an edge, so a package and the submodules it
re-exports do not count as a cycle; a package's imports of its submodules do count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aimm"
MAX_LINES = 450
#: Modules allowed over MAX_LINES for now, each with the reason. Shrink this list; never grow it.
OVERSIZED: dict[str, str] = {}
ENGINE_MAX_LINES = 350  # aimm/training/engine.py: orchestration only


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The aimm modules ``name`` imports (the module itself when ``from pkg import submodule``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "aimm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "aimm":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


def with_parents(targets: set[str], known: set[str]) -> set[str]:
    """``targets`` and the packages above them (importing ``aimm.a.b`` runs ``aimm/a/__init__``)."""
    out = set(targets)
    for t in targets:
        parts = t.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in known)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the aimm modules it imports; a submodule's edge to its own parent is dropped."""
    mods = modules()
    known = set(mods)
    return {name: {m for m in with_parents(imports_of(name, path, known), known)
                   if not name.startswith(m + ".") and m != name}
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_counts_function_level_and_type_checking_imports(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from aimm.b import x\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from aimm.a import y\n")
    c = tmp_path / "c.py"
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aimm.a import z\n")
    known = {"aimm.a", "aimm.b", "aimm.c"}
    graph = {n: imports_of(n, p, known) for n, p in (("aimm.a", a), ("aimm.b", b), ("aimm.c", c))}
    assert graph == {"aimm.a": {"aimm.b"}, "aimm.b": {"aimm.a"}, "aimm.c": {"aimm.a"}}
    assert cycles(graph) == [["aimm.a", "aimm.b"]]


def test_no_import_cycle_among_aimm_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions count): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_config_and_errors_sit_at_the_bottom():
    graph = import_graph()
    assert graph["aimm.errors"] == set()
    assert not {m for m in graph["aimm.config"] if m.startswith("aimm.methods")}
    assert "aimm.engine" not in graph["aimm.methods.base"]


def test_methods_program_against_the_context_never_the_engine():
    graph = import_graph()
    engine_side = {"aimm.engine", "aimm.training.engine", "aimm.training.artifacts"}
    for name in (n for n in graph if n.startswith("aimm.methods")):
        assert not graph[name] & engine_side, f"{name} imports {graph[name] & engine_side}"
    assert "aimm.training.context" in graph["aimm.methods.base"]
    assert graph["aimm.training"] == set(), "aimm/training/__init__.py must import nothing"


def test_the_engine_is_orchestration_only():
    path = PACKAGE / "training" / "engine.py"
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= ENGINE_MAX_LINES, f"{path}: {n} lines > {ENGINE_MAX_LINES}"


def test_no_module_over_450_lines_except_the_listed_ones():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines())
             for name, path in modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in OVERSIZED}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    stale = [name for name in OVERSIZED if sizes.get(name, 0) <= MAX_LINES]
    assert not stale, f"no longer oversized, remove from OVERSIZED: {stale}"
