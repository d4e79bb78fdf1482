"""The code stays readable as it grows: module and function sizes, read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ltcore"
MODULE_LINES = 400
ENGINE_FUNCTION_LINES = 60


def test_long_modules_say_why():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MODULE_LINES and "Why one" not in doc:
            long.append(f"{path.relative_to(PKG.parent)} ({len(text.splitlines())} lines)")
    assert not long, f"modules over {MODULE_LINES} lines without a 'Why one ...' reason in their docstring: {long}"


def test_engine_functions_fit_a_screen():
    long = []
    for path in sorted((PKG / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > ENGINE_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, f"engine functions over {ENGINE_FUNCTION_LINES} lines: {long}"
