"""Each experiment is one module: `study.<e>` holds its run and its table rows,
`reports.experiments.<e>` its report section, and the table, the report and `EXPERIMENTS` reach
them through those modules rather than through string keys spread over four files."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("e1", "e2", "e3", "e4", "sample_eff")


@pytest.mark.parametrize("name", MODULES)
def test_each_experiment_module_has_its_run_rows_and_section(name):
    study = importlib.import_module(f"study.{name}")
    report = importlib.import_module(f"reports.experiments.{name}")
    assert callable(study.run) and callable(study.rows) and callable(report.section)
    assert report.STAGE == study.STAGE


def test_table_report_and_registry_go_through_the_modules():
    from reports import study as report
    from study import e1, e2, e3, e4, experiments, sample_eff, table
    mods = (e1, e2, e3, e4, sample_eff)
    rows = {name: fn for name, fn, _ in table.STAGE_ROWS}
    assert all(rows[m.STAGE] is m.rows for m in mods)
    assert table.sample_eff_rows is sample_eff.rows
    assert {k: f.__wrapped__ for k, f in experiments.EXPERIMENTS.items()} == {m.STAGE: m.run for m in (e1, e2, e3, e4)}
    assert experiments.run_sample_efficiency.__wrapped__ is sample_eff.run
    assert report.e1.section is importlib.import_module("reports.experiments.e1").section


@pytest.mark.parametrize("name", MODULES + ("runkit", "rows"))
def test_experiment_modules_import_no_layer_above_the_table(name):
    """study.table (the study contract's bottom layer) imports these, so they import nothing of
    `study` but each other's shared bottom: `rows` and `runkit` (run_jobs comes as an argument)."""
    tree = ast.parse((ROOT / "study" / f"{name}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.split(".")[0] == "study"} <= {"study.rows", "study.runkit"}
