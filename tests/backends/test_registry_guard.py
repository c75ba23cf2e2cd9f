"""Every backend in the registry has a conversion test (tests/backends/test_<name>.py).

A conversion test is a ``test_*`` function that calls ``convert`` (the backend's method or a
fixture of that name) or ``build`` (the whole build pipeline), directly or through a helper
function defined in the same module. Static check (ast): cheap, no backend needs to be installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.registry import BACKENDS

HERE = Path(__file__).resolve().parent
CONVERTING = {"convert", "build"}


def _called_names(node: ast.AST) -> set[str]:
    """Names of everything called inside ``node`` (``f(...)`` -> f, ``a.b.f(...)`` -> f)."""
    names = set()
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Name):
            names.add(call.func.id)
        elif isinstance(call.func, ast.Attribute):
            names.add(call.func.attr)
    return names


def conversion_tests(path: Path) -> list[str]:
    """Names of the test functions in ``path`` that run a conversion (see module docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    # module-level helpers that convert, resolved to a fixed point (helpers calling helpers)
    converting = set(CONVERTING)
    changed = True
    while changed:
        changed = False
        for name, f in funcs.items():
            if name not in converting and not name.startswith("test_") and _called_names(f) & converting:
                converting.add(name)
                changed = True
    return [name for name, f in funcs.items() if name.startswith("test_") and _called_names(f) & converting]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_has_a_conversion_test(backend: str) -> None:
    path = HERE / f"test_{backend}.py"
    assert path.is_file(), f"backend {backend!r} is registered but tests/backends/test_{backend}.py is missing"
    assert conversion_tests(path), (f"tests/backends/test_{backend}.py has no test that calls convert(...) "
                                    "or build(...); add a real conversion test")


def test_guard_detects_missing_conversion(tmp_path: Path) -> None:
    empty = tmp_path / "test_x.py"
    empty.write_text("def test_nothing():\n    assert True\n\ndef helper():\n    return 1\n")
    assert conversion_tests(empty) == []
    good = tmp_path / "test_y.py"
    good.write_text("def helper(b, c):\n    return b.convert(c, 'fp32')\n\n"
                    "def test_it(b, c):\n    helper(b, c)\n")
    assert conversion_tests(good) == ["test_it"]
