"""The study line (`engine.progress.StudyEta`, `StudyProgress`): stages and runs done of all and one
ETA for the whole study, from expected costs and the worker count, updated as runs finish. A fake
clock and fake costs; the last test runs plain stage functions through the driver."""

import io
import json
import re

from engine.driver import run_stages
from engine.progress import StudyEta, StudyProgress, finished_runs
from engine.schedule import study_plan
from engine.stage import Stage


def _plan(costs: dict, runs: dict | None = None, needs: dict | None = None, spans: dict | None = None) -> list:
    return [{"name": n, "work_s": c, "span_s": (spans or {}).get(n, c), "needs": (needs or {}).get(n, ()),
             "runs": (runs or {}).get(n), "dir": None} for n, c in costs.items()]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(eta: StudyEta, clock: _Clock, name: str, seconds: float, runs: int = 0) -> None:
    """One stage from start to end, its runs finishing evenly, `seconds` of work."""
    eta.start(name)
    for r in range(1, runs + 1):
        clock.t += seconds / runs
        eta.runs(name, r)
    clock.t += 0 if runs else seconds
    eta.done(name, {"status": "done", "timing": {"work_s": seconds}}, runs)


def test_sequential_after_half_the_work_the_eta_is_half_the_total():
    clock = _Clock()
    costs = {"a": 100.0, "b": 300.0, "c": 200.0, "d": 200.0}
    eta = StudyEta(_plan(costs, runs={n: 4 for n in costs}), workers=1, clock=clock)
    assert eta.eta_s() == 800.0
    _run(eta, clock, "a", 100.0, 4)
    _run(eta, clock, "b", 300.0, 4)
    assert clock.t == 400.0 and abs(eta.eta_s() - 400.0) < 1e-9
    assert eta.line() == "[study] 2/4 stages, 8/16 runs, 6m40s elapsed, ETA 6m40s"


def test_runs_that_finish_move_the_eta_and_a_running_group_counts_by_its_steps():
    clock = _Clock()
    eta = StudyEta(_plan({"E3": 600.0}, runs={"E3": 6}), workers=1, clock=clock)
    eta.start("E3")
    eta.step("E3", 250, 500, {"runs": 4})  # a fused group of 4 half way: 2 runs' worth done
    assert abs(eta.eta_s() - 400.0) < 1e-9
    assert eta.runs("E3", 4) and not eta.runs("E3", 4)  # the group ended: counted once
    assert abs(eta.eta_s() - 200.0) < 1e-9


def test_slower_than_expected_stages_stretch_the_rest():
    """Every stage takes 1.5 x its expected work: half way, the ETA has learnt most of that."""
    clock = _Clock()
    costs = {n: 100.0 for n in "abcdef"}
    eta = StudyEta(_plan(costs, runs={n: 2 for n in costs}), workers=1, clock=clock)
    for n in "abc":
        _run(eta, clock, n, 150.0, 2)
    true_left = 450.0
    assert clock.t == 450.0 and abs(eta.eta_s() - true_left) / true_left < 0.2
    assert eta.factor() > 1.3


def test_with_workers_the_eta_is_the_work_shared_or_the_longest_chain():
    clock = _Clock()
    costs = {"base": 100.0, "long": 200.0, "a": 100.0, "b": 100.0, "c": 100.0}
    needs = {"long": ("base",)}
    eta = StudyEta(_plan(costs, needs=needs), workers=2, clock=clock)
    assert eta.eta_s() == 300.0  # 600 s of work on 2 workers, and the chain base -> long
    eta.start("base"), eta.start("a")
    clock.t = 100.0
    eta.done("base", {"timing": {"work_s": 100.0}}, 0), eta.done("a", {"timing": {"work_s": 100.0}}, 0)
    eta.start("long"), eta.start("b")
    clock.t = 150.0  # half of the study's 300 s: long a quarter through by its time, b half
    assert abs(eta.eta_s() - 150.0) < 1e-9
    wide = StudyEta(_plan({"base": 100.0, "long": 200.0, "a": 100.0}, needs=needs), workers=16, clock=clock)
    assert wide.eta_s() == 300.0  # many workers: the chain is what is left


def test_a_stage_without_a_run_count_counts_by_its_time_and_at_most_nine_tenths():
    clock = _Clock()
    eta = StudyEta(_plan({"thm": 10.0, "E1": 40.0}), workers=1, clock=clock)
    assert eta.line().startswith("[study] 0/2 stages, 0/? runs")
    eta.start("E1")
    clock.t = 20.0
    assert eta.eta_s() == 30.0  # half of E1's time, and thm
    eta.runs("E1", 3)
    clock.t = 100.0  # overdue: 90 % done, never past
    assert abs(eta.eta_s() - 14.0) < 1e-9
    assert "3/3+ runs" in eta.line()
    eta.done("E1", {"cached": True}, 7)
    assert "1/2 stages, 7/7+ runs" in eta.line()


def test_a_cached_stage_counts_as_done_and_teaches_nothing():
    clock = _Clock()
    eta = StudyEta(_plan({"a": 100.0, "b": 100.0}, runs={"a": 3, "b": 3}), clock=clock)
    eta.done("a", {"cached": True, "timing": {"work_s": 1.0}}, 3)
    assert eta.factor() == 1.0 and eta.eta_s() == 100.0 and "1/2 stages, 3/6 runs" in eta.line()


def _stage(name):
    return type("S", (), {"name": name, "title": f"{name}'s title"})()


def _study_lines(out: io.StringIO) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.startswith("[study]")]


def test_the_study_line_comes_as_runs_finish_and_never_floods(tmp_path):
    """A stage of 20 runs over 2,000 s of steps: a study line when runs finish (at most one in 5 s)
    and one a minute between; a finished stage always gets one."""
    clock, out = _Clock(), io.StringIO()
    d = tmp_path / "E3"
    with StudyProgress(out, tty=False, clock=clock) as sp:
        sp.factory.plan(_plan({"E3": 2000.0, "E4": 1000.0}, runs={"E3": 20, "E4": 2}), 1)
        sp.study.stages["E3"]["dir"] = d
        prog = sp.factory(0, 2, _stage("E3"))
        for step in range(1, 2001):
            clock.t = float(step)
            if step % 100 == 0:  # a run ends every 100 s
                (d / f"run{step}").mkdir(parents=True)
                (d / f"run{step}" / "metrics.json").write_text("{}")
            prog(step, 2000, {"loss": 0.1})
        n_before = len(_study_lines(out))
        sp.done("E3", {"status": "done", "timing": {"work_s": 2000.0, "wall_s": 2000.0}}, 1, 2)
    lines = _study_lines(out)
    assert 20 <= n_before <= 20 + 2000 / 60 + 1  # one per finished run, one a minute at most besides
    assert len(lines) == n_before + 1
    assert lines[-1] == "[study] 1/2 stages, 20/22 runs, 33m20s elapsed, ETA 16m40s"
    assert all(re.match(r"\[study\] \d+/2 stages, \d+/22 runs, ", line) for line in lines)


def _runs_stage(n_runs):
    def fn(d, cfg, up, progress, device=None):
        for i in range(n_runs):
            (d / f"r{i}").mkdir(exist_ok=True)
            if progress:
                progress(1, 1, {})
            (d / f"r{i}" / "metrics.json").write_text("{}")
        return {"runs": n_runs}
    return fn


def test_a_sequential_study_shows_its_line_and_records_its_run_counts(tmp_path):
    stages = [Stage("base", "a base", {}, _runs_stage(0), estimate=5.0),
              Stage("tune", "three runs", {}, _runs_stage(3), needs=("base",), estimate=10.0),
              Stage("other", "two runs", {}, _runs_stage(2), estimate=1.0)]
    out = io.StringIO()
    with StudyProgress(out, tty=False) as sp:
        run_stages(tmp_path, stages, sp.factory, on_done=sp.done)
    lines = _study_lines(out)
    assert lines[0].startswith("[study] 0/3 stages, 0/? runs") and lines[-1].startswith("[study] 3/3 stages, 5/5 runs")
    hist = json.loads((tmp_path / "timings.json").read_text())
    assert {n: h["runs"] for n, h in hist.items()} == {"base": 0, "tune": 3, "other": 2}
    # the next study of the same stages knows every run count before it starts
    plan = study_plan(stages, {n: h["key"] for n, h in hist.items()}, hist, {})
    assert [p["runs"] for p in plan] == [0, 3, 2] and finished_runs(tmp_path / "nowhere") == 0
    out = io.StringIO()
    with StudyProgress(out, tty=False) as sp:
        run_stages(tmp_path, stages, sp.factory, on_done=sp.done)
    assert _study_lines(out)[-1].startswith("[study] 3/3 stages, 5/5 runs")


def test_a_study_whose_stages_are_cached_starts_with_them_done_and_no_eta(tmp_path):
    stages = [Stage("base", "a base", {}, _runs_stage(0), estimate=5000.0),
              Stage("tune", "three runs", {}, _runs_stage(3), needs=("base",), estimate=9000.0)]
    run_stages(tmp_path, stages)
    stages.append(Stage("new", "one run", {}, _runs_stage(1), estimate=60.0))
    out = io.StringIO()
    with StudyProgress(out, tty=False) as sp:
        run_stages(tmp_path, stages, sp.factory, on_done=sp.done)
    first = _study_lines(out)[0]
    # the first line already counts the two cached stages as done: only the new stage's minute is left
    assert first.startswith("[study] 2/3 stages, 3/3+ runs"), first
    assert re.search(r"ETA (0m\d\ds|1m00s)$", first), first
