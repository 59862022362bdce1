"""The layers import one way, and the floors hold what they promise.

The import graph counts every import of a foldhpc module, function-level ones included (a lazy
import breaks a cycle at import time but not in the design), and leaves out only those under
``if TYPE_CHECKING:`` (annotations, never executed). ``from pkg import sub`` is an edge to the
submodule ``pkg.sub``; importing a submodule runs its package's ``__init__``, which is not counted
as an edge of its own (every submodule would otherwise depend on its package).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "foldhpc"

#: the top-level packages and modules of foldhpc, lowest first: each may import only those before it
LAYERS = [
    {"records", "cluster", "config"},
    {"faults"},
    {"data", "model"},
    {"checkpoint"},
    {"distributed"},
    {"resilience"},
    {"train", "session"},
    {"task"},
    {"slurm"},
    {"monitor"},
    {"chaos"},
    {"starter"},
    {"cli"},
    {"submit", "__main__"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """module -> the foldhpc modules it imports (at any depth of its code)."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"

        def walk(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for c in child.orelse:
                        walk_one(c)
                    continue
                walk_one(child)

        def walk_one(node: ast.AST) -> None:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                if t.startswith("foldhpc"):
                    r = resolve(t)
                    if r and r != name:
                        edges[name].add(r)
            walk(node)

        walk(ast.parse(path.read_text(encoding="utf-8")))
    return edges


def _cycles(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "foldhpc"


def test_the_graph_sees_function_level_imports():
    """The checker itself: a lazy import inside a function is an edge (else the tests below prove little)."""
    edges = import_graph()
    assert "foldhpc.task" in edges["foldhpc.cli"]  # imported inside cli's commands only
    assert "foldhpc.train.loop" in edges["foldhpc.task"]  # inside task.train only


def test_no_import_cycle_between_modules():
    edges = import_graph()
    assert _cycles(sorted(_modules()), edges) == []


def test_no_import_cycle_between_top_level_packages():
    edges = import_graph()
    top: dict[str, set[str]] = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if _top(a) != _top(b):
                top[_top(a)].add(_top(b))
    assert _cycles(sorted({_top(m) for m in _modules()}), top) == []


def test_layers_import_only_downward():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    tops = {_top(m) for m in _modules()} - {"foldhpc"}
    assert tops <= set(rank), f"place {sorted(tops - set(rank))} in LAYERS"
    upward = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
                    if _top(b) != "foldhpc" and rank.get(_top(b), -1) > rank.get(_top(a), -1))
    assert upward == []


@pytest.mark.parametrize("floor", ["records", "cluster"])
def test_floors_import_nothing_above_them(floor):
    """records and cluster are importable by every layer: they import only each other's peers."""
    bad = sorted(f"{a} -> {b}" for a, bs in import_graph().items() if _top(a) == floor
                 for b in bs if _top(b) not in (floor, "records"))
    assert bad == []


def _literal_strings(pattern: re.Pattern[str]) -> list[str]:
    hits = []
    for path in PKG.rglob("*.py"):
        if path.name in ("layout.py", "envvars.py", "exitcodes.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return hits


def test_run_directory_names_have_one_home():
    """Every file name of a run directory is spelled once, in foldhpc/records/layout.py (folder names such as
    ``slurm`` or ``checkpoints`` are also ordinary words of the code, so only names with a dot are checked)."""
    from foldhpc.records import layout

    names = [v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in v]
    assert _literal_strings(re.compile("|".join(re.escape(n) for n in names))) == []


def test_environment_names_have_one_home():
    """Every FOLDHPC_* variable is named once, in foldhpc/records/envvars.py."""
    assert _literal_strings(re.compile(r"FOLDHPC_[A-Z_]+")) == []


def test_exit_codes_have_one_home():
    """No module defines an EXIT_* constant of its own: foldhpc.records.exitcodes.ExitCode is the one list."""
    defs = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    names = [t] if isinstance(t, ast.Name) else list(getattr(t, "elts", []))
                    defs += [f"{path.relative_to(ROOT)}:{node.lineno}: {n.id}" for n in names
                             if isinstance(n, ast.Name) and n.id.startswith("EXIT_")]
    assert defs == []
