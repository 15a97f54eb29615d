"""A stage that hands its groups over in phases (a grid, then the runs it chose): its span is the
phases one after another, each as long as its longest group (`engine.timing.StageClock`)."""

from engine.timing import StageClock


def test_the_span_adds_the_phases_and_takes_the_longest_group_of_each():
    clock = StageClock(threads=1)
    clock.wall_s, clock.away_s = 1000.0, 940.0  # 60 s of its own
    clock.groups = [(370.0, 1, 0), (380.0, 1, 0), (500.0, 1, 1), (120.0, 1, 1)]
    t = clock.to_json()
    assert t["span_s"] == 60.0 + 380.0 + 500.0
    assert t["work_s"] == 60.0 + 370.0 + 380.0 + 500.0 + 120.0
    assert t["phases"] == [[370.0, 380.0], [500.0, 120.0]]


def test_groups_recorded_without_a_phase_are_one_phase():
    clock = StageClock(threads=2)
    clock.wall_s, clock.away_s = 50.0, 40.0
    clock.groups = [(30.0, 1), (40.0, 1)]
    t = clock.to_json()
    assert (t["span_s"], t["work_s"], t["core_s"]) == (50.0, 80.0, 90.0)
