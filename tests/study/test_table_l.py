"""The [L] rows of the paper-vs-lab table (study.experiments.sample_eff.rows): each verdict at, just
above and just below its threshold, and with one side of the contrast missing."""

from pathlib import Path

import pytest

from study.experiments.sample_eff import rows as sample_eff_rows
from study.table import paper_vs_lab


def _cell(*values):
    m = sum(values) / len(values)
    return {"mean": m, "std": 0.0, "values": list(values)}


def _se(none_small, shared_small, none_large, shared_large, seeds=(0, 1), deep_large=None, variants=None):
    """A sample_eff result: No-share and Simple-share (and Deep-share) at n = 64 / 1024."""
    acc = {"none": {"64": _cell(*none_small), "1024": _cell(*none_large)},
           "simple": {"64": _cell(*shared_small), "1024": _cell(*shared_large)}}
    if deep_large is not None:
        acc["deep512"] = {"64": _cell(*[0.0] * len(seeds)), "1024": _cell(*deep_large)}
    if variants is not None:
        acc = {v: acc[v] for v in variants}
    loss = {v: {n: _cell(*[1.0] * len(seeds)) for n in by} for v, by in acc.items()}
    return {"task": "ascending_add1", "P": 10, "steps": 1500, "sizes": ["64", "1024"], "seeds": list(seeds),
            "lr": {v: 1e-2 for v in acc}, "acc": acc, "test_loss": loss}


def _verdict(se):
    return sample_eff_rows(se)[0]["verdict"]


def test_sharing_ahead_beyond_the_spread_and_gap_closing_is_reproduced():
    # gap 20 pp at n=64 (spread 4 pp), 2 pp at n=1024
    assert _verdict(_se((0.10, 0.14), (0.30, 0.34), (0.60, 0.60), (0.62, 0.62))) == "reproduced"


# dyadic accuracies, so that "at the threshold" is exact in floating point
@pytest.mark.parametrize("shared, expected", [
    ((0.3125, 0.4375), "reproduced"),  # gap 0.25 > spread 0.125 (No-share: 0.125 ± 0.0625)
    ((0.1875, 0.3125), "differs"),     # gap 0.125 = spread: not more than the spread
    ((0.125, 0.25), "differs"),        # gap 0.0625 < spread
])
def test_gap_at_small_n_against_the_seed_spread(shared, expected):
    se = _se((0.0625, 0.1875), shared, (0.5, 0.5), (0.5, 0.5))
    assert _verdict(se).startswith(expected)


@pytest.mark.parametrize("large_gap, expected", [(0.125, "reproduced"), (0.25, "differs"), (0.375, "differs")])
def test_gap_must_shrink_with_n(large_gap, expected):
    se = _se((0.25, 0.25), (0.5, 0.5), (0.5, 0.5), (0.5 + large_gap, 0.5 + large_gap))  # gap 0.25 at n=64
    assert _verdict(se).startswith(expected)


def test_no_share_ahead_is_differs():
    assert _verdict(_se((0.30, 0.32), (0.10, 0.12), (0.6, 0.6), (0.6, 0.6))).startswith("differs")


def test_one_seed_cannot_reproduce():
    se = _se((0.10,), (0.50,), (0.6,), (0.6,), seeds=(0,))
    v = _verdict(se)
    assert v.startswith("differs") and "one seed" in v


@pytest.mark.parametrize("variants", [["none"], ["simple"]])
def test_a_missing_side_is_not_reproduced(variants):
    se = _se((0.10, 0.10), (0.50, 0.50), (0.6, 0.6), (0.6, 0.6), variants=variants)
    assert _verdict(se).startswith("differs")


@pytest.mark.parametrize("deep, expected", [
    ((0.5625, 0.5625), "reproduced"),  # 3.75 pp below Simple-share (0.6)
    ((0.55, 0.55), "reproduced"),      # 5 pp below, on the threshold
    ((0.5375, 0.5375), "differs"),     # 6.25 pp below
    ((0.75, 0.75), "reproduced"),      # above
])
def test_deep_share_trains_row(deep, expected):
    rows = sample_eff_rows(_se((0.1, 0.1), (0.3, 0.3), (0.6, 0.6), (0.6, 0.6), deep_large=deep))
    assert len(rows) == 3 and _named(rows, "Deep-share trains")["verdict"].startswith(expected)


def test_deep_share_that_learned_nothing_does_not_train():
    # within 5 pp of a Simple-share that learned nothing either: not evidence that Deep-share trains
    rows = sample_eff_rows(_se((0.0, 0.0), (0.0, 0.0), (0.02, 0.02), (0.03, 0.03), deep_large=(0.0, 0.0)))
    assert _named(rows, "Deep-share trains")["verdict"].startswith("differs")


def _named(rows, start):
    (row,) = [r for r in rows if r["claim"].startswith(start)]
    return row


def _with_loss(se, none_small, shared_small, none_large, shared_large):
    """The same result with the test losses given (No-share and Simple-share, n = 64 / 1024)."""
    loss = {"none": {"64": _cell(*none_small), "1024": _cell(*none_large)},
            "simple": {"64": _cell(*shared_small), "1024": _cell(*shared_large)}}
    return {**se, "test_loss": {v: loss[v] for v in se["acc"]}}


def _loss_verdict(se):
    return _named(sample_eff_rows(se), "sharing is more sample-efficient in test loss")["verdict"]


# the loss row: lower is better, the gap in nats against the seed spread; dyadic, so exact
@pytest.mark.parametrize("shared, expected", [
    ((0.5, 0.625), "reproduced"),   # gap 0.375 > spread 0.125 (No-share 0.9375 ± 0.0625)
    ((0.75, 0.875), "differs"),     # gap 0.125 = spread
    ((0.8125, 0.9375), "differs"),  # gap 0.0625 < spread
    ((1.0, 1.0), "differs"),        # No-share lower
])
def test_loss_row_gap_at_small_n_against_the_seed_spread(shared, expected):
    se = _with_loss(_se((0.1, 0.1), (0.1, 0.1), (0.5, 0.5), (0.5, 0.5)),
                    (0.875, 1.0), shared, (0.25, 0.25), (0.25, 0.25))
    assert _loss_verdict(se).startswith(expected)


@pytest.mark.parametrize("large, expected", [(0.25, "reproduced"), (0.0, "differs"), (-0.125, "differs")])
def test_loss_row_gap_must_shrink_with_n(large, expected):
    # gap 0.25 nats at n=64 (no spread); at n=1024 No-share 0.5, Simple-share 0.5 - (0.25 - large)
    se = _with_loss(_se((0.1, 0.1), (0.1, 0.1), (0.5, 0.5), (0.5, 0.5)),
                    (1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (0.25 + large, 0.25 + large))
    assert _loss_verdict(se).startswith(expected)


def test_loss_row_is_independent_of_the_accuracy_row():
    # accuracy says no-share ahead (differs), loss says sharing ahead and closing (reproduced)
    se = _with_loss(_se((0.30, 0.32), (0.10, 0.12), (0.6, 0.6), (0.6, 0.6)),
                    (0.9, 0.9), (0.5, 0.5), (0.1, 0.1), (0.2, 0.2))
    rows = sample_eff_rows(se)
    assert rows[0]["verdict"].startswith("differs") and _loss_verdict(se) == "reproduced"


def test_loss_row_one_seed_cannot_reproduce():
    se = _with_loss(_se((0.1,), (0.5,), (0.6,), (0.6,), seeds=(0,)), (1.0,), (0.5,), (0.1,), (0.2,))
    assert "one seed" in _loss_verdict(se)


def test_the_table_carries_the_rows_of_a_done_stage():
    se = _se((0.10, 0.14), (0.30, 0.34), (0.60, 0.60), (0.62, 0.62))
    rows = paper_vs_lab({"sample_eff": {"status": "done", "result": se}})
    # accuracy reproduced; _se's losses are all equal, so the loss row differs
    assert [r["verdict"][:10] for r in rows if r["source"] == "[L] toy"] == ["reproduced", "differs (a"]
    failed = paper_vs_lab({"sample_eff": {"status": "failed"}})
    assert not [r for r in failed if r["source"] == "[L] toy"]


def _d2t(holds):
    return {"table_row": {"claim": "c", "paper": "p", "lab": "l", "holds": holds, "criterion": "k", "gap": "g"}}


@pytest.mark.parametrize("holds, verdict", [(True, "reproduced"), (False, "differs (g)"), (None, "differs (g)")])
def test_language_row_follows_its_computed_verdict(holds, verdict):
    rows = paper_vs_lab({"d2t": {"status": "done", "result": _d2t(holds)}})
    assert [r["verdict"] for r in rows if r["source"] == "[L] language"] == [verdict]


def test_language_row_says_where_it_runs_when_the_scale_has_no_stage():
    from study.stages import stages_for
    assert "d2t" in [s.name for s in stages_for("paper", Path("/tmp/x"))]
    assert "d2t" not in [s.name for s in stages_for("quick", Path("/tmp/x"))]
    row = [r for r in paper_vs_lab({}) if r["source"] == "[L] language"]
    assert row[0]["verdict"] == "not run" and "--scale paper" in row[0]["lab"]


def _rich():
    """Four variants, three finite sizes and fresh data, unequal seeds: every branch of the text."""
    acc = {"none": [(0.25, 0.3125), (0.5, 0.5625), (0.875, 0.9375), (0.9375, 0.9375)],
           "simple": [(0.125, 0.125), (0.25, 0.25), (0.375, 0.375), (0.5, 0.5)],
           "deep48": [(0.375, 0.4375), (0.5, 0.625), (0.75, 0.8125), (0.875, 0.875)],
           "deep512": [(0.5, 0.625), (0.75, 0.75), (0.875, 0.875), (0.9375, 1.0)]}
    sizes = ["64", "256", "1024", "fresh"]
    loss = {"none": 0.9, "simple": 0.5, "deep48": 0.6, "deep512": 0.55}
    return {"task": "ascending_add1", "P": 10, "steps": 1500, "sizes": sizes, "seeds": [0, 1],
            "lr": {"none": 3e-2, "simple": 1e-2, "deep48": 3e-4, "deep512": 1e-3},
            "acc": {v: {n: _cell(*xs) for n, xs in zip(sizes, cells)} for v, cells in acc.items()},
            "test_loss": {v: {n: _cell(x / (i + 1), x / (i + 1)) for i, n in enumerate(sizes)} for v, x in loss.items()}}


def test_rows_as_a_reader_sees_them():
    """The whole text of the [L] toy rows, pinned (tests/study/table_l_rows.json): the largest *finite*
    n is the contrast's far end (not 'fresh'), the best shared and the best Deep-share are named."""
    import json
    want = json.loads((Path(__file__).parent / "table_l_rows.json").read_text())
    assert {k: sample_eff_rows(se) for k, se in _scenarios().items()} == want


def _scenarios():
    return {"rich": _rich(),
            "within_spread": _se((0.0625, 0.1875), (0.1875, 0.3125), (0.5, 0.5), (0.5, 0.5)),
            "not_shrinking": _se((0.25, 0.25), (0.5, 0.5), (0.5, 0.5), (0.75, 0.75)),
            "one_seed": _se((0.1,), (0.5,), (0.6,), (0.6,), seeds=(0,)),
            "missing_side": _se((0.1, 0.1), (0.5, 0.5), (0.6, 0.6), (0.6, 0.6), variants=["simple"]),
            "deep_untrained": _se((0.0, 0.0), (0.0, 0.0), (0.02, 0.02), (0.03, 0.03), deep_large=(0.0, 0.0))}
