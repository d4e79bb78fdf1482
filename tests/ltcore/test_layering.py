"""The package's import graph, read with ``ast`` (nothing imported): no import circle between ltcore modules, and
Ray imported only where the design allows it.

Imports inside functions count: a lazy import that closes a circle is still a circle (it only moves the failure
from import time to call time). Imports under ``if TYPE_CHECKING:`` do not count.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ltcore"

# Ray lives in the engine, the two Ray Data jobs, the Ray start-up module, the entry layer, and the two system
# layers above the engine that drive it (Tune studies; retraining and batch prediction in the lifecycle); the
# core (losses, augment, methods, models, eval, sampling, splits, config, storage) stays importable without it.
RAY_ALLOWED = ("ltcore.engine.", "ltcore.data.prepare", "ltcore.data.ingest", "ltcore.raystart", "ltcore.cli",
               "ltcore.entry", "ltcore.tune.", "ltcore.lifecycle.")

# The entry layer: argument parsing, one-line errors, console scripts. Nothing in the library imports it.
ENTRY = ("ltcore.cli", "ltcore.entry")

# Circles that exist today and are being removed; an entry must go as soon as its circle is gone.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none left; a circle that must stay would be listed here, with why


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``), at any depth."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return names


def _parse_all(root: Path) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {m: imported_names(p.read_text(), m, p.name == "__init__.py") for m, p in paths.items()}


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges between the package's modules, every imported name per module)``.

    The files are parsed in a fresh interpreter (this file run as a script): CPython 3.11 keeps the AST
    constructor's recursion counter per interpreter, so a parse racing another thread of the test process (Ray's
    driver threads, once the session's Ray is up) can fail with "AST constructor recursion depth mismatch"
    (python/cpython#106905), which says nothing about the package.
    """
    out = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, check=True)
    raw = {m: set(names) for m, names in json.loads(out.stdout).items()}
    paths = set(raw)
    edges = {m: {n for n in names if n in paths and n != m} for m, names in raw.items()}
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def ray_importers(raw: dict[str, set[str]]) -> set[str]:
    return {m for m, names in raw.items() if any(n == "ray" or n.startswith("ray.") for n in names)}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    """``module`` is one of ``prefixes`` or inside one of them (``"ltcore.engine."`` holds only submodules)."""
    return any(module == a.rstrip(".") or module.startswith(a if a.endswith(".") else a + ".") for a in prefixes)


def _allowed(module: str) -> bool:
    return _under(module, RAY_ALLOWED)


def test_no_import_circle_between_ltcore_modules():
    edges, _ = import_graph(PACKAGE)
    found = set(cycles(edges))
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, f"import circle(s) between ltcore modules: {new}; move the shared code below both"
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not gone, f"the circle(s) {gone} are gone: delete them from KNOWN_CYCLES"


def test_ray_is_imported_only_where_allowed():
    edges, raw = import_graph(PACKAGE)
    stray = sorted(m for m in ray_importers(raw) if not _allowed(m))
    assert not stray, f"Ray imported outside {', '.join(RAY_ALLOWED)}: {stray}"
    # nor reached through another module: the core never imports a module that imports Ray
    direct = ray_importers(raw)
    for m in sorted(m for m in edges if not _allowed(m)):
        seen, todo = set(), [m]
        while todo:
            for n in edges[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        assert not seen & direct, f"{m} reaches Ray through {sorted(seen & direct)}"


def test_the_library_does_not_import_the_entry_layer():
    edges, _ = import_graph(PACKAGE)
    entry = {m for m in edges if _under(m, ENTRY)}
    upward = sorted(f"{m} -> {n}" for m in edges if m not in entry for n in edges[m] & entry)
    assert not upward, f"library modules import the entry layer: {upward}; move what they need below it"


def test_the_checks_find_a_circle_and_a_stray_ray_import(tmp_path):
    pkg = tmp_path / "ltcore"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "losses" / "__init__.py").write_text("from .ce import CE\n")
    (pkg / "losses" / "ce.py").write_text("import ray.data\n\ndef f():\n    from ltcore.losses.focal import g\n")
    (pkg / "losses" / "focal.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ltcore import config\n"
        "from ltcore.losses import ce\n")
    (pkg / "config.py").write_text("from ltcore.losses import focal\n")
    edges, raw = import_graph(pkg)
    assert edges["ltcore.losses"] == {"ltcore.losses.ce"}  # relative import resolved
    assert edges["ltcore.losses.focal"] == {"ltcore.losses"} | {"ltcore.losses.ce"}  # TYPE_CHECKING skipped
    assert cycles(edges) == [frozenset({"ltcore.losses", "ltcore.losses.ce", "ltcore.losses.focal"})]
    assert ray_importers(raw) == {"ltcore.losses.ce"}
    assert not _allowed("ltcore.losses.ce") and _allowed("ltcore.engine.loops") and _allowed("ltcore.cli")
    assert not _allowed("ltcore.client") and _allowed("ltcore.entry.train")


if __name__ == "__main__":  # import_graph's parser process: every imported name per module of sys.argv[1], as JSON
    print(json.dumps({m: sorted(names) for m, names in _parse_all(Path(sys.argv[1])).items()}))
