"""Critical path first (`engine.schedule`), honest stage times (`engine.timing`) and progress with
an ETA (`engine.progress`): pure bookkeeping, tested without Ray or training."""

import io
import json

from engine.progress import ProgressFile, StudyProgress, read_progress, with_eta
from engine.schedule import CoreBroker, priorities, simulate, stage_cost
from engine.timing import StageClock, longest_chain, study_timing

# the quick study's shape: a long chain (base -> long stage -> probes) and short independent work
NEEDS = {"base": (), "long": ("base",), "probes": ("long",), "a": (), "b": (), "c": ()}
COSTS = {"base": 10.0, "long": 20.0, "probes": 1.0, "a": 6.0, "b": 6.0, "c": 6.0}


def test_priority_is_the_longest_chain_through_the_dependents():
    p = priorities(COSTS, NEEDS)
    assert p == {"base": 31.0, "long": 21.0, "probes": 1.0, "a": 6.0, "b": 6.0, "c": 6.0}


def test_the_longest_chain_starts_first_and_short_stages_fill_the_other_core():
    crit = simulate(COSTS, NEEDS, 2, pinned=True)
    assert crit["stages"]["base"][0] == 0.0  # starts at once
    assert crit["stages"]["long"][0] == 10.0  # right when its base is done: it never waited
    assert crit["wall_s"] == 31.0  # = the chain: a, b, c packed beside it
    # first come, first served in stage order (Ray's own queue) puts the short stages first
    fifo = simulate(COSTS, NEEDS, 2, order=["a", "b", "c", "base", "long", "probes"], pinned=True)
    assert fifo["wall_s"] > crit["wall_s"]


def test_a_stage_alone_in_the_queue_takes_every_free_core():
    b = CoreBroker(2, pinned=False)
    assert b.request([("x", 5.0, None)]) == ["x"] and b.grants["x"] == 2
    b = CoreBroker(2, pinned=False)
    assert b.request([("x", 5.0, None), ("y", 1.0, None)]) == ["x", "y"]
    assert (b.grants["x"], b.grants["y"]) == (1, 1)
    pinned = CoreBroker(2, pinned=True)
    assert pinned.request([("x", 5.0, None)]) == ["x"] and pinned.grants["x"] == 1


def test_the_broker_grants_by_priority_and_frees_on_release_and_drop():
    b = CoreBroker(1, pinned=True)
    assert b.request([("low", 1.0, None), ("high", 9.0, None)]) == ["high"]
    assert b.release(["high"]) == ["low"]
    b = CoreBroker(1, pinned=True)
    b.request([("E4", 9.0, None)])
    b.request([("E4/g0", 9.0, None), ("E4/g1", 8.0, None)], ["E4"])  # a stage lends its slot to its groups
    assert b.held == {"E4/g0": 1}
    assert b.drop("E4") == []  # a dead attempt's group slot comes back and its queued group goes
    assert b.free == 1 and b.waiting == []
    b = CoreBroker(2, pinned=False)
    assert b.request([("s1", 1.0, None), ("s2", 1.0, None)]) == ["s1", "s2"]
    b.request([("E4", (float("inf"),), 2)])  # takes its 2 slots back: waits for both, nothing overtakes it
    assert b.request([("other", 5.0, None)]) == [] and b.release(["s1"]) == []
    assert b.release(["s2"]) == ["E4"] and b.grants["E4"] == 2 and b.release(["E4"]) == ["other"]


def test_the_cost_is_the_measured_span_of_the_same_stage_else_the_scaled_estimate():
    hist = {"E4": {"key": "k1", "estimate": 100.0, "span_s": 50.0, "work_s": 90.0}}
    assert stage_cost("E4", "k1", 100.0, hist) == 50.0
    assert stage_cost("E4", "k2", 200.0, hist) == 100.0  # another config: scaled by the estimates
    assert stage_cost("E3", "k", 7.0, hist) == 7.0


def test_work_is_told_apart_from_wall():
    clock = StageClock(threads=1)
    clock.wall_s, clock.away_s, clock.waited_s = 100.0, 90.0, 60.0
    clock.groups = [(20.0, 1), (10.0, 2)]
    t = clock.to_json()
    assert (t["work_s"], t["span_s"], t["core_s"], t["wall_s"]) == (40.0, 30.0, 50.0, 100.0)


def test_a_study_reads_its_speed_from_its_records():
    rec = lambda work, span: {"status": "done", "timing": {"work_s": work, "span_s": span, "core_s": work}}  # noqa: E731
    records = {"base": rec(10.0, 10.0), "long": rec(30.0, 20.0), "probes": rec(1.0, 1.0), "a": rec(6.0, 6.0),
               "b": {"status": "done", "cached": True}, "c": rec(6.0, 6.0)}
    assert longest_chain({"base": 10.0, "long": 20.0, "a": 6.0}, NEEDS) == (30.0, ["base", "long"])
    t = study_timing(records, NEEDS, 40.0, 2)
    assert (t["work_s"], t["longest_chain_s"], t["longest_chain"]) == (53.0, 31.0, ["base", "long", "probes"])
    assert t["bound_s"] == 31.0 and t["of_bound"] == 31.0 / 40.0 and t["stages_cached"] == 1


def test_the_eta_comes_from_the_rate_since_the_group_began():
    now = [0.0]
    seen = []
    prog = with_eta(lambda s, n, i: seen.append(i), clock=lambda: now[0])
    prog(100, 1000, {"loss": 1.0})  # a resumed group: its rate counts from here
    now[0] = 10.0
    prog(200, 1000, {"loss": 0.9})
    assert "eta_s" not in seen[0] and seen[1]["rate"] == 10.0 and seen[1]["eta_s"] == 80.0
    now[0] = 11.0
    prog(5, 50, {})  # the next group restarts the count
    assert "eta_s" not in seen[2]


def test_progress_files_are_summed_per_stage_and_ended_ones_drop_out(tmp_path):
    now = [0.0]
    with ProgressFile(tmp_path / "g0.json", 1, clock=lambda: now[0]) as a:
        a(10, 100, {"loss": 2.0})
        now[0] = 10.0
        a(20, 100, {"loss": 1.0})
        with ProgressFile(tmp_path / "g1.json", 2, clock=lambda: now[0]) as b:
            b(50, 50, {"loss": 3.0})  # its last step is always written
            state = read_progress(tmp_path)
        assert state["step"] == 70 and state["total"] == 150 and state["info"]["threads"] == 3
        assert state["info"]["loss"] == 2.0 and state["info"]["eta_s"] == 80.0 and state["info"]["pieces"] == 2
    assert read_progress(tmp_path) is None
    assert json.loads((tmp_path / "g0.json").read_text())["done"] is True


class _Stage:
    name, title = "E4", "E4: prefix vs LoRA"


def test_without_a_terminal_a_running_stage_prints_one_line_a_minute():
    out, now = io.StringIO(), [0.0]
    with StudyProgress(out, tty=False, clock=lambda: now[0]) as sp:
        prog = sp.factory(3, 13, _Stage())
        for step in range(1, 301):
            now[0] = step  # one step a second for five minutes
            prog(step, 1000, {"loss": 0.5})
        sp.done("E4", {"status": "done", "timing": {"work_s": 40.0, "wall_s": 1614.0, "threads": 1}}, 4, 13)
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if "step" in line]
    assert lines[0] == "[E4] started: E4: prefix vs LoRA"
    assert len(steps) == 5 and "loss 0.5000" in steps[0] and "ETA" in steps[0]
    assert lines[-1] == "[4/13] E4: done, work 40 s, wall 1614 s, 1 thread(s)"
