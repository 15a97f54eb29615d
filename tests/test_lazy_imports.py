"""No import placed inside a function without a comment that justifies it. Every
function-level import in the packages is either commented on its own line (or the line above), or
named in a module-level comment that starts with "# Lazy import"."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["prefixlab_common", "toy_models", "tuning", "probes", "model_checks", "theory", "engine", "study", "reports"]


def unjustified(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    lazy_block = "\n".join(_comment_blocks(lines))
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            line, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" in line or above.strip().startswith("#"):
                continue
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            top = mod.split(".")[0]
            if not any(name in lazy_block for name in (mod, top, mod.split(".")[-1])):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod} inside {fn.name}()")
    return bad


def _comment_blocks(lines: list[str]) -> list[str]:
    """The module-level comment blocks that start with '# Lazy import' (their continuation lines too)."""
    out, inside = [], False
    for l in lines:
        if re.match(r"#\s*Lazy imports?\b", l):
            inside = True
        elif not l.startswith("#"):
            inside = False
        if inside:
            out.append(l)
    return out


def test_every_function_level_import_is_justified():
    bad = [b for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py")) for b in unjustified(f)]
    assert not bad, "\n".join(bad)


def test_the_check_finds_an_unjustified_lazy_import(tmp_path, monkeypatch):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import json\n    return json\n")
    monkeypatch.setattr("test_lazy_imports.ROOT", tmp_path)
    assert unjustified(f) == ["m.py:2 imports json inside f()"]
    f.write_text("# Lazy import: json, for the example.\ndef f():\n    import json\n    return json\n")
    assert unjustified(f) == []
