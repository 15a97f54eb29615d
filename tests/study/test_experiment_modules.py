"""Each experiment is one module ending in its declaration, listed once in the registry: the
stage catalogue, the table and the report reach every experiment through it. Generated from the
registry, so a new experiment is covered without editing this file."""

import ast
import importlib
from pathlib import Path

import pytest

from study.experiments.declaration import SCALES, Experiment
from study.experiments.registry import EXPERIMENTS, REGISTRY, experiment
from prefixlab_common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
NAMES = [e.name for e in REGISTRY]


def _module(e: Experiment):
    return importlib.import_module(e.rows.__module__)


@pytest.mark.parametrize("name", NAMES)
def test_each_experiment_module_ends_in_its_declaration(name):
    e = EXPERIMENTS[name]
    mod = _module(e)
    assert mod.EXPERIMENT is e
    tree = ast.parse(Path(mod.__file__).read_text())
    last = tree.body[-1]
    assert isinstance(last, ast.Assign) and last.targets[0].id == "EXPERIMENT"
    assert callable(e.run) and callable(e.rows) and callable(e.estimate) and callable(e.missing_rows)
    assert set(e.scales) <= set(SCALES) and e.scales


@pytest.mark.parametrize("name", NAMES)
def test_each_report_section_is_named_and_exists(name):
    e = EXPERIMENTS[name]
    assert e.section is not None
    assert callable(importlib.import_module(f"reports.experiments.{e.section}").section)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", SCALES)
def test_each_experiment_is_a_stage_of_every_scale_it_declares(tmp_path, name, scale):
    from study.stages import stages_for
    e = EXPERIMENTS[name]
    by = {s.name: s for s in stages_for(scale, tmp_path)}
    assert (name in by) == (scale in e.scales)
    if name in by:
        s = by[name]
        assert s.title == e.title and s.estimate > 0 and set(e.needs) <= set(s.needs)
        if e.base is not None:  # its base stage comes first and trains its base
            base = [n for n in s.needs if n.startswith("base-")]
            assert len(base) == 1 and by[base[0]].config["experiment"] in EXPERIMENTS


def test_the_table_and_the_stage_list_follow_the_registry(tmp_path):
    """Every experiment's rows come in the registry's order; no experiment is named outside it."""
    from study.stages import stages_for
    from study.table import paper_vs_lab
    stages = stages_for("paper", tmp_path)
    assert {s.name for s in stages} - {s.name for s in stages if s.name.startswith("base-")} == set(NAMES)
    order = [s.name for s in stages]
    assert all(order.index(n) < order.index(s.name) for s in stages for n in s.needs)  # dependency order
    assert paper_vs_lab({})[-1]["source"] == "[L] FGVC"


def test_an_unknown_experiment_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unknown experiment 'E9'; known: E1"):
        experiment("E9")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "engine").glob("*.py")))
def test_the_engine_imports_no_experiment(path):
    """The machinery knows stages, never the experiments (also an import-linter contract)."""
    tree = ast.parse((ROOT / path).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.split(".")[0] in ("study", "reports", "probes", "model_checks", "theory")}
