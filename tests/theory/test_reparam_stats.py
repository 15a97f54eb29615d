"""theory/reparam_stats.py: the statistics checked by hand on small arrays, and the verdict rule
at, just above and just below each of its thresholds (deleting any bound makes a test fail)."""

import copy
import math

import numpy as np
import pytest

from theory.reparam_stats import (
    RULE, judge, mean_summary, median_summary, near_best_max, pooled_slope, share_summary, wilson,
)

NAN = float("nan")


# ----------------------------------------------------------------------------- statistics by hand


def test_wilson_by_hand():
    # 5/10: p = 0.5, z² = 3.8415; centre 0.5, half = z·sqrt(0.025 + z²/400)/(1 + z²/10)
    z = 1.959963984540054
    half = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert wilson(5, 10) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/10: lower 0, upper z²/(10 + z²) = 0.2775
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z * z / (10 + z * z))
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] == pytest.approx(1 - z * z / (10 + z * z))
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_pooled_slope_averages_truths_and_skips_missing():
    x = np.array([0.0, 1.0, 2.0])
    y = np.array([[1.0, 3.0, 5.0],  # slope 2
                  [0.0, NAN, 1.0]])  # two points: slope 0.5
    assert pooled_slope(x, y) == pytest.approx((2.0 + 0.5) / 2)
    assert pooled_slope(x, np.array([[1.0, NAN, NAN], [0.0, 1.0, 2.0]])) == pytest.approx(1.0)
    assert math.isnan(pooled_slope(x, np.array([[1.0, NAN, NAN]])))
    # batched over a leading axis
    assert pooled_slope(x, np.stack([y, 2 * y])).tolist() == pytest.approx([1.25, 2.5])


def test_mean_summary_by_hand():
    ns = [100, 10000]
    v = np.array([[[1.0, 3.0, NAN], [0.5, 0.5, 2.0]],  # truth 0: means 2, 1
                  [[4.0, 4.0, 4.0], [1.0, 1.0, 1.0]]])  # truth 1: means 4, 1
    s = mean_summary(ns, v, 200, seed=0)
    # pooled per n: (1 + 3 + 12)/5 = 3.2 and (3 + 3)/6 = 1
    assert [p["value"] for p in s["per_n"]] == pytest.approx([3.2, 1.0])
    assert [p["count"] for p in s["per_n"]] == [5, 6] and [p["n"] for p in s["per_n"]] == ns
    # slope: mean of ln(1/2)/ln(100) and ln(1/4)/ln(100)
    expected = (math.log(0.5) + math.log(0.25)) / 2 / math.log(100)
    assert s["slope"]["slope"] == pytest.approx(expected)
    assert s["slope"]["ci_low"] <= expected <= s["slope"]["ci_high"]
    assert s["per_n"][0]["ci_low"] <= 3.2 <= s["per_n"][0]["ci_high"]
    assert mean_summary(ns, v, 200, seed=0) == s  # seeded
    # constant data: intervals of zero width; a power law n^-1/2: slope -1/2 exactly
    const = np.ones((1, 2, 4)) * np.array([1.0, 0.1])[None, :, None]
    c = mean_summary(ns, const, 50, seed=1)
    assert c["slope"]["slope"] == pytest.approx(-0.5) and c["slope"]["ci_low"] == pytest.approx(-0.5)
    assert c["per_n"][1]["ci_low"] == pytest.approx(0.1) and c["per_n"][1]["ci_high"] == pytest.approx(0.1)
    # one n with values only: no slope
    assert mean_summary(ns, np.array([[[1.0, 2.0], [NAN, NAN]]]), 50, seed=1)["slope"] is None


def test_mean_summary_bootstrap_interval_by_hand():
    ns = [10, 1000]
    v = np.array([[[1.0, 2.0, 4.0], [0.1, 0.3, 0.2]]])
    s = mean_summary(ns, v, 300, seed=5)
    rng = np.random.default_rng(5)
    b0 = v[0, 0][rng.integers(0, 3, size=(300, 3))].mean(-1)
    b1 = v[0, 1][rng.integers(0, 3, size=(300, 3))].mean(-1)
    slopes = (np.log(b1) - np.log(b0)) / math.log(100)
    assert s["slope"]["ci_low"] == pytest.approx(np.percentile(slopes, 2.5))
    assert s["slope"]["ci_high"] == pytest.approx(np.percentile(slopes, 97.5))
    assert s["per_n"][0]["ci_high"] == pytest.approx(np.percentile(b0, 97.5))


def test_median_summary_by_hand():
    v = np.array([[[1.0, 5.0, 2.0], [0.1, 0.4, 100.0]]])
    s = median_summary([10, 1000], v, 100, seed=0)
    assert [p["value"] for p in s["per_n"]] == pytest.approx([2.0, 0.4])
    assert s["slope"]["slope"] == pytest.approx(math.log(0.2) / math.log(100))


def test_share_summary_by_hand():
    ns = [1000, 10000, 100000]
    flags = np.array([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, NAN]],  # shares 1/2, 1/4, 0
                      [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]])  # shares 1, 1/2, 1/2
    s = share_summary(ns, flags, 200, seed=3)
    assert [(p["k"], p["m"]) for p in s["per_n"]] == [(6, 8), (3, 8), (2, 7)]
    assert s["per_n"][2]["share"] == pytest.approx(2 / 7)
    assert (s["per_n"][2]["ci_low"], s["per_n"][2]["ci_high"]) == pytest.approx(wilson(2, 7))
    # per decade: truth 0 falls 1/4 per decade, truth 1: least squares through (3, 1), (4, .5), (5, .5)
    assert s["trend"]["per_decade"] == pytest.approx((-0.25 + -0.25) / 2)
    assert s["trend"]["ci_low"] <= s["trend"]["per_decade"] <= s["trend"]["ci_high"]
    none = share_summary(ns, np.zeros((1, 3, 5)), 50, seed=0)
    assert none["trend"] == {"per_decade": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert [p["ci_low"] for p in none["per_n"]] == [0.0] * 3


def test_near_best_max_by_hand():
    n, sd = 1000, 0.1  # σ²/n = 1e-5: tol 0.05 -> slack 5e-7
    losses = np.array([[1.0, 1.0 + 4e-7, 1.0 + 6e-7],  # third too far
                       [2.0, 2.0 - 1e-6, 2.0],  # the second is best; the others 1e-6 above: out
                       [1.0, 0.5, 0.5]])  # the best endpoints are uncertified
    d = np.array([[0.1, 0.7, 3.0], [0.2, 0.05, 9.0], [0.3, 8.0, 8.0]])
    cert = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=bool)
    assert near_best_max(losses, d, cert, n, sd, 0.05).tolist() == pytest.approx([0.7, 0.05, 0.3])
    # at the boundary: exactly tol·σ²/n above the best counts
    exact = np.array([[1.0, 1.0 + 0.05 * sd ** 2 / n]])
    assert near_best_max(exact, np.array([[0.1, 0.9]]), np.ones((1, 2), bool), n, sd, 0.05)[0] == 0.9
    # no certified endpoint: NaN; σ = 0: a relative tolerance
    assert math.isnan(near_best_max(losses[:1], d[:1], np.zeros((1, 3), bool), n, sd, 0.05)[0])
    assert near_best_max(np.array([[1.0, 1.04, 1.06]]), np.array([[0.1, 0.2, 0.3]]), np.ones((1, 3), bool),
                         n, 0.0, 0.05)[0] == 0.2


# ----------------------------------------------------------------------------- the verdict


NS = [1000, 100000]


def _slope(s, lo=None, hi=None):
    return {"slope": s, "ci_low": s - 0.1 if lo is None else lo, "ci_high": s + 0.1 if hi is None else hi}


def _share(k, m, lo=None, hi=None):
    wl, wh = wilson(k, m)
    return {"n": NS[-1], "k": k, "m": m, "share": k / m, "ci_low": wl if lo is None else lo,
            "ci_high": wh if hi is None else hi}


def _passing() -> dict:
    """Pooled statistics that pass every check with a margin."""
    shared = {"mean_D_multi": {"per_n": [], "slope": _slope(-0.5)},
              "share_D_multi": {"per_n": [_share(0, 20)], "trend": {"per_decade": 0.0, "ci_low": 0.0, "ci_high": 0.0}},
              "nonidentified": {"per_n": [_share(0, 20)], "trend": None},
              "D_max": {"per_n": [], "slope": _slope(-0.5)}}
    no_share = {"mean_D_multi": {"per_n": [], "slope": _slope(-0.1, -0.4, 0.2)},
                "share_D_multi": {"per_n": [_share(8, 20)], "trend": {"per_decade": -0.05, "ci_low": -0.2, "ci_high": 0.1}},
                "nonidentified": {"per_n": [_share(10, 20)], "trend": None},
                "D_max": {"per_n": [], "slope": _slope(-0.1, -0.5, 0.3)}}
    return {"shared-linear": copy.deepcopy(shared), "shared-tanh": copy.deepcopy(shared), "no-share": no_share,
            "no-share-exact": {"mean_D": {"per_n": [], "slope": _slope(-0.5)}, "mean_L2": {}}}


def _holds(stats, ns=NS):
    return judge(stats, ns)["holds"]


def test_the_passing_statistics_pass_and_every_check_is_reported():
    v = judge(_passing(), NS)
    assert v["holds"] is True and v["gap"] == ""
    assert len(v["checks"]) == 3 * 2 + 3 and all(c["ok"] for c in v["checks"])


@pytest.mark.parametrize("model", ["shared-linear", "shared-tanh"])
@pytest.mark.parametrize("value, ok", [(-0.65, True), (-0.651, False), (-0.649, True),
                                       (-0.35, True), (-0.349, False), (-0.351, True)])
def test_shared_mean_slope_band(model, value, ok):
    s = _passing()
    s[model]["mean_D_multi"]["slope"] = _slope(value)
    v = judge(s, NS)
    assert v["holds"] is ok
    if not ok:
        assert f"{model}: mean split-cell D slope" in v["gap"]


@pytest.mark.parametrize("model", ["shared-linear", "shared-tanh"])
@pytest.mark.parametrize("stat", ["share_D_multi", "nonidentified"])
@pytest.mark.parametrize("share, ok", [(0.10, True), (0.1001, False), (0.0999, True)])
def test_shared_shares_at_the_largest_n(model, stat, share, ok):
    s = _passing()
    s[model][stat]["per_n"] = [{"n": 1000, "k": 20, "m": 20, "share": 1.0}, {**_share(2, 20), "share": share}]
    assert _holds(s) is ok  # only the largest n counts (the first n is all far)


@pytest.mark.parametrize("low, ok", [(0.10, True), (0.0999, False), (0.1001, True)])
def test_no_share_nonidentified_wilson_lower_bound(low, ok):
    s = _passing()
    s["no-share"]["nonidentified"]["per_n"] = [_share(10, 20, lo=low)]
    v = judge(s, NS)
    assert v["holds"] is ok
    if not ok:
        assert "no-share: non-identified share" in v["gap"]


@pytest.mark.parametrize("hi, ok", [(0.0, True), (-0.001, False), (0.001, True)])
def test_no_share_mean_slope_interval_reaching_zero(hi, ok):
    s = _passing()
    s["no-share"]["mean_D_multi"]["slope"] = _slope(-0.2, -0.4, hi)
    s["no-share"]["share_D_multi"]["trend"]["ci_high"] = -0.01  # the other route closed
    assert _holds(s) is ok


@pytest.mark.parametrize("trend_hi, dmax_hi, ok", [
    (0.0, 0.0, True), (-0.001, 0.0, False), (0.001, 0.0, True),
    (0.0, -0.001, False), (0.0, 0.001, True), (-0.001, -0.001, False)])
def test_no_share_share_and_dmax_route(trend_hi, dmax_hi, ok):
    s = _passing()
    s["no-share"]["mean_D_multi"]["slope"] = _slope(-0.5, -0.6, -0.4)  # the mean route closed
    s["no-share"]["share_D_multi"]["trend"]["ci_high"] = trend_hi
    s["no-share"]["D_max"]["slope"] = _slope(-0.2, -0.4, dmax_hi)
    assert _holds(s) is ok
    # with the mean route open the verdict holds whatever the other route says
    s["no-share"]["mean_D_multi"]["slope"] = _slope(-0.2, -0.4, 0.0)
    assert _holds(s) is True


@pytest.mark.parametrize("value, ok", [(-0.65, True), (-0.651, False), (-0.649, True),
                                       (-0.35, True), (-0.349, False), (-0.351, True)])
def test_control_band(value, ok):
    s = _passing()
    s["no-share-exact"]["mean_D"]["slope"] = _slope(value)
    v = judge(s, NS)
    assert v["holds"] is ok
    if not ok:
        assert "control" in v["gap"]


@pytest.mark.parametrize("ns, judged", [([1000, 100000], True), ([1000, 99999], False),
                                        ([1000, 100001], True), ([1000, 3162, 10000], False)])
def test_range_of_n_needed_to_judge(ns, judged):
    v = judge(_passing(), ns)
    assert (v["holds"] is True) if judged else (v["holds"] is None and "not judged" in v["gap"])


def test_missing_statistics_give_no_verdict():
    for model, key in [("no-share-exact", "mean_D"), ("shared-tanh", "mean_D_multi"), ("no-share", "nonidentified")]:
        s = _passing()
        del s[model][key]
        assert _holds(s) is None
    s = _passing()
    del s["shared-linear"]
    assert _holds(s) is None
    assert judge({}, NS)["holds"] is None


def test_a_failing_check_names_its_value_and_bound():
    s = _passing()
    s["shared-tanh"]["mean_D_multi"]["slope"] = _slope(-0.2)
    s["no-share"]["nonidentified"]["per_n"] = [_share(1, 20)]
    v = judge(s, NS)
    assert v["holds"] is False
    assert "shared-tanh: mean split-cell D slope = -0.2, needs in [-0.65, -0.35]" in v["gap"]
    assert "no-share: non-identified share at n=100000, Wilson lower bound" in v["gap"]
    assert RULE["band"] == (-0.65, -0.35) and RULE["threshold"] == 0.05
