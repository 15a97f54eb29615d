"""Inside tuning/ imports go one way (tuning/__init__.py): methods -> registry -> jobs ->
pipeline | fused -> sweep, with no import placed inside a function to hide a circle. Read from the
source, so a new circle fails here before it can hide."""

import ast
from pathlib import Path

import pytest

from tuning.registry import METHODS

ROOT = Path(__file__).resolve().parents[2] / "tuning"
# a module may import only modules of a lower rank: the machinery's ranks, and every registered
# method's module at rank 2 (a new method is ranked without editing this file); the hard prompt
# builds on the soft prompt, so it sits one above
MACHINERY = {"options": 0, "base": 1, "registry": 4, "jobs": 5, "pipeline": 6, "fused": 6, "sweep": 7}
METHOD_MODULES = {cls.__module__.split(".")[-1] for cls in METHODS.values()}
RANK = {**MACHINERY, **{m: 3 if m == "prompt" else 2 for m in METHOD_MODULES}}


def tuning_imports(tree) -> list[tuple[str, bool]]:
    """(module under tuning, imported inside a function?) for each import of a tuning module."""
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuning":
            names = [node.module] if node.module != "tuning" else [f"tuning.{a.name}" for a in node.names]
            out += [(n, id(node) in inner) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in inner) for a in node.names if a.name.split(".")[0] == "tuning"]
    return out


def test_every_module_is_ranked():
    assert {p.stem for p in ROOT.glob("*.py")} - {"__init__"} == set(RANK)


@pytest.mark.parametrize("module", sorted(RANK))
def test_imports_go_one_way_and_none_hides_in_a_function(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    for name, in_function in tuning_imports(tree):
        assert not in_function, f"tuning/{module}.py imports {name} inside a function"
        other = name.split(".")[1] if "." in name else None
        assert other in RANK, f"tuning/{module}.py imports the package itself ({name}): import the module"
        assert RANK[other] < RANK[module], f"tuning/{module}.py imports {name}, which is not below it"
