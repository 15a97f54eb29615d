"""No function over 80 lines in study/ and reports/: a long function there is a stage, a
table or a report section that wants a function of its own. Lines run from the `def` (or its first
decorator) to the function's last line, docstring and comments included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "reports")
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than `limit` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            if n > limit:
                out.append((node.name, n))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_80_lines(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    found = {f"{f.relative_to(ROOT)}:{name}": n for f in files for name, n in long_functions(f.read_text())}
    assert not found, f"functions over {MAX_LINES} lines (split them): {found}"


def test_the_check_counts_lines_as_a_reader_does():
    """81 lines fail, 80 pass; decorators, docstrings and nested functions count; methods are checked."""
    body = lambda n: "".join("    x = 1\n" for _ in range(n))
    assert long_functions("def f():\n" + body(79)) == []
    assert long_functions("def f():\n" + body(80)) == [("f", 81)]
    assert long_functions("@staticmethod\ndef f():\n" + body(79)) == [("f", 81)]
    assert long_functions('def f():\n    """doc\n    more"""\n' + body(78)) == [("f", 81)]
    assert long_functions("class C:\n    def m(self):\n" + "".join("        x = 1\n" for _ in range(80))) == [("m", 81)]
    assert long_functions("async def f():\n" + body(80)) == [("f", 81)]
