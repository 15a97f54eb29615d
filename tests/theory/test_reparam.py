"""Tests of theory/reparam.py: the Voronoi loss and its cells, the split and valley starts, the
hand-written normal equations, the certified fit, the valley, the slopes, the per-model statistics
and the study's structure (the verdict rule: tests/theory/test_reparam_stats.py)."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.theory_figures import reparam_study_figure
from theory.reparam import (
    CONTROL, METRICS, MODELS, ReparamConfig, ReparamResult, _normal_equations, _map_jacobian, _samples_last,
    cell_metrics, fit_certified, fit_endpoints, gate_features, levenberg_marquardt, loglog_slope,
    make_dataset, make_truth, model_statistics, mse, normal_equations, regression, run_reparam_study, sample_inputs,
    start_params, summary_lines, table_row, truth_reparam, valley_path, valley_start, voronoi_cells,
    voronoi_loss,
)
from prefixlab_common.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small batched ops: a second thread on busy cores costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the micro study (also what study/stages.py's micro preset should pass as overrides)
MICRO = dict(ns=(100, 300), replicates=2, steps=5, restarts=2, bootstrap=50, heldout=256)


def test_voronoi_zero_at_truth():
    atoms = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.5, -0.5]], dtype=torch.float64)
    bias = torch.tensor([0.2, -0.4], dtype=torch.float64)
    assert voronoi_loss(atoms, bias, atoms, bias).item() == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1.0))
def test_voronoi_positive_when_perturbed(seed, scale):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(2, 4, generator=g, dtype=torch.float64) * 3
    true_bias = torch.randn(2, generator=g, dtype=torch.float64)
    atoms = true + scale * torch.randn(2, 4, generator=g, dtype=torch.float64)
    assert voronoi_loss(atoms, true_bias, true, true_bias).item() > 0
    # a mass error alone is positive too
    assert voronoi_loss(true, true_bias + scale, true, true_bias).item() > 0
    # splitting a true atom into two half-mass copies at the same place costs nothing,
    # moving one copy away costs the squared distance times its mass
    split = torch.cat([true[:1], true[:1], true[1:]])
    half = torch.cat([true_bias[:1] - math.log(2), true_bias[:1] - math.log(2), true_bias[1:]])
    assert voronoi_loss(split, half, true, true_bias).item() == pytest.approx(0, abs=1e-9)
    moved = split.clone()
    moved[1] += scale * 1e-2
    expected = 0.5 * true_bias[0].exp() * (scale * 1e-2) ** 2 * 4
    assert voronoi_loss(moved, half, true, true_bias).item() == pytest.approx(expected.item(), rel=1e-6)


def test_voronoi_hand_example_and_cells():
    # true atoms (0,0), (10,0), both mass 1. Cell 1 gets two atoms (squared distances 1, 1,
    # masses 1/2 each) -> 1; mass |1 - 1| = 0. Cell 2 is a singleton at distance 2 with mass 2
    # -> 2*2 = 4; mass |2 - 1| = 1. D = 6.
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 2.0]])
    log_mass = torch.log(torch.tensor([0.5, 0.5, 2.0]))
    assert voronoi_loss(atoms, log_mass, true, torch.zeros(2)).item() == pytest.approx(6.0)
    cells = voronoi_cells(atoms, log_mass, true, torch.zeros(2))
    assert cells["cell"].tolist() == [0, 0, 1] and cells["size"].tolist() == [2, 1]
    assert cells["per_cell"].tolist() == pytest.approx([1.0, 5.0])
    m = cell_metrics(cells)
    assert (m["D_multi"].item(), m["D_single"].item(), m["dist_multi"].item()) == pytest.approx((1, 5, 1))
    # an empty cell pays its whole true mass: all three atoms near (0,0); no singleton cell
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    # cell 1: 0.5*1 + 0.5*1 + 2*4 = 9, mass |3 - 1| = 2; cell 2 empty: |0 - 1| = 1 -> 12
    assert voronoi_loss(atoms, log_mass, true, torch.zeros(2)).item() == pytest.approx(12.0)
    m = cell_metrics(voronoi_cells(atoms, log_mass, true, torch.zeros(2)))
    assert m["D_multi"].item() == pytest.approx(11.0) and math.isnan(m["D_single"].item())


def test_voronoi_batched_shapes():
    atoms, bias = torch.randn(5, 3, 3, 8), torch.randn(5, 3, 3)  # (R, S, L, 2d)
    true, true_bias = torch.randn(2, 8), torch.randn(2)
    d = voronoi_loss(atoms, bias, true, true_bias)
    assert d.shape == (5, 3)
    assert torch.allclose(d[2, 1], voronoi_loss(atoms[2, 1], bias[2, 1], true, true_bias))


def test_generator_deterministic_per_seed():
    cfg = ReparamConfig(**MICRO)
    truth = make_truth(cfg)
    a, b = make_dataset(cfg, truth, 40, 3), make_dataset(cfg, truth, 40, 3)
    assert torch.equal(a.u, b.u) and torch.equal(a.noise, b.noise)
    assert torch.equal(make_truth(cfg).p, truth.p)
    # replicate r depends on (seed, n, r) only, not on how many replicates are drawn
    assert torch.equal(make_dataset(cfg, truth, 40, 2).u, a.u[:2])
    assert not torch.equal(a.u[0], a.u[1])
    other = ReparamConfig(**{**MICRO, "seed": 1})
    assert not torch.equal(make_dataset(other, make_truth(other), 40, 3).u, a.u)
    # the known maps are orthogonal (injective, well conditioned)
    for w in (truth.w1, truth.w2):
        assert torch.allclose(w @ w.T, torch.eye(cfg.d, dtype=w.dtype), atol=1e-12)


def test_features_reproduce_attention_row():
    cfg = ReparamConfig(**MICRO, d=3, n_tokens=3)
    truth = make_truth(cfg)
    x, _ = sample_inputs(cfg, 7, 1, 123)
    x = x[0]  # (n, N, d)
    key, value = truth.prompts("tanh")
    d = cfg.d
    # direct: softmax over content logits and prompt logits of the query x_1, then mix
    logits = torch.cat([torch.einsum("na,ab,njb->nj", x[:, 0], truth.qk, x) / math.sqrt(d),
                        x[:, 0] @ truth.qk @ key.T / math.sqrt(d) + truth.bias], -1)
    experts = torch.cat([x @ truth.w_v.T, value.expand(7, -1, -1)], 1)
    direct = (torch.softmax(logits, -1).unsqueeze(-1) * experts).sum(1)
    via_features = regression(*gate_features(x, truth), key, value, truth.bias)
    assert torch.allclose(direct, via_features, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_normal_equations_match_autograd(d):
    g = torch.Generator().manual_seed(d)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, mean, y, log_z = rnd(2, 40, d), rnd(2, 40, d), rnd(2, 40, d), rnd(2, 40)
    key, value, bias = rnd(2, 3, d), rnd(2, 3, d), 2 * rnd(2, 3)
    jtj, jtr, loss = normal_equations(*_samples_last((u, log_z, mean, y)), key, value, bias)
    assert torch.allclose(loss, mse((u, log_z, mean, y), key, value, bias), atol=1e-13)
    for r in range(2):
        def residual(q):
            q = q.view(3, 2 * d + 1)
            return (regression(u[r], log_z[r], mean[r], q[:, :d], q[:, d:2 * d], q[:, -1]) - y[r]).flatten()
        q = torch.cat([key[r], value[r], bias[r, :, None]], -1).flatten()
        jac = torch.autograd.functional.jacobian(residual, q)
        assert torch.allclose(jtj[r], jac.T @ jac, atol=1e-10)
        assert torch.allclose(jtr[r], jac.T @ residual(q), atol=1e-10)


@pytest.mark.parametrize("model", MODELS)
def test_model_normal_equations_chain_through_the_map(model):
    cfg = ReparamConfig(**MICRO, noise_sd=0.1)
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 30, 2)
    y = data.responses(truth, truth_reparam(model), cfg.noise_sd)
    q = start_params(cfg, model, 30, 2, 0, truth) + 0.3
    jtj, jtr = _normal_equations(model, q, _samples_last((data.u, data.log_z, data.mean, y)), truth, 1)
    for r in range(2):
        def residual(flat):
            key, value, bias, _ = _map_jacobian(model, flat.view(q.shape[1:]), truth)
            return (regression(data.u[r], data.log_z[r], data.mean[r], key, value, bias) - y[r]).flatten()
        jac = torch.autograd.functional.jacobian(residual, q[r].flatten())
        assert torch.allclose(jtj[r], jac.T @ jac, atol=1e-10)
        assert torch.allclose(jtr[r], jac.T @ residual(q[r].flatten()), atol=1e-10)


@pytest.mark.parametrize("model", MODELS)
def test_split_start_puts_two_atoms_in_one_cell(model):
    cfg = ReparamConfig(**MICRO)
    truth = make_truth(cfg)
    q = start_params(cfg, model, 100, 4, 0, truth)
    key, value, bias, _ = _map_jacobian(model, q, truth)
    true_key, true_value = truth.prompts(truth_reparam(model))
    cells = voronoi_cells(torch.cat([key, value], -1), bias, torch.cat([true_key, true_value], -1),
                          truth.bias)
    assert cells["size"].tolist() == [[2, 1]] * 4 and cells["cell"].tolist() == [[0, 1, 0]] * 4
    # the split copies share the true mass, so the mass term of the split cell is zero
    assert torch.allclose(bias[:, [0, 2]].exp().sum(-1), truth.bias[0].exp())
    # the last start is random, not split
    assert not torch.equal(start_params(cfg, model, 100, 4, cfg.restarts - 1, truth), q)


@pytest.mark.parametrize("model", MODELS)
def test_fit_started_at_truth_on_noiseless_data_stays(model):
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.0, "init_scale": 0.0, "steps": 30})
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 200, 2)
    y = data.responses(truth, truth_reparam(model), 0.0)
    fit = fit_certified(cfg, model, data, y, 200, truth)
    true_key, true_value = truth.prompts(truth_reparam(model))
    d = voronoi_loss(torch.cat([fit["key"], fit["value"]], -1), fit["bias"],
                     torch.cat([true_key, true_value], -1), truth.bias)
    assert fit["certified"].all() and (fit["train_loss"] < 1e-24).all()
    assert (d < 1e-10).all() and (fit["start"] == 0).all()


@pytest.mark.parametrize("model", MODELS)
def test_fit_lowers_the_loss_below_the_truth(model):
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.05, "steps": 60})
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 400, 3)
    y = data.responses(truth, truth_reparam(model), cfg.noise_sd)
    fit = fit_certified(cfg, model, data, y, 400, truth)
    assert fit["certified"].all() and (fit["train_loss"] < fit["truth_loss"]).all()
    assert fit["q"].shape == (3, 3, 2 * cfg.d + 1 if model == "no-share" else cfg.d + 1)
    assert fit["key"].shape == (3, 3, cfg.d) and fit["bias"].shape == (3, 3)


def test_levenberg_marquardt_records_checkpoints_and_stops():
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.05})
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 100, 2)
    y = data.responses(truth, "linear", cfg.noise_sd)
    q = start_params(cfg, "no-share", 100, 2, 0, truth)
    fit = levenberg_marquardt("no-share", q.clone(), (data.u, data.log_z, data.mean, y), truth, 8,
                              1e-12, record=(2, 4))
    assert fit["q_at"].shape == (2, 2, *q.shape[1:]) and (fit["iters"] <= 8).all()
    assert not torch.equal(fit["q_at"][:, 0], q)
    # a loose tolerance ends the fit early
    quick = levenberg_marquardt("no-share", q.clone(), (data.u, data.log_z, data.mean, y), truth,
                                50, 0.5)
    assert (quick["iters"] < 50).all()


def test_uncertified_fits_are_flagged_and_left_out_of_slopes():
    # one LM step from a far split start cannot reach the truth's loss
    cfg = ReparamConfig(**{**MICRO, "steps": 1, "restarts": 1, "init_scale": 1.0, "noise_sd": 0.01})
    res = run_reparam_study(cfg).to_json()
    flags = [f["certified"] for m in MODELS for row in res["fits"][m] for f in row]
    assert not all(flags)
    for m in MODELS:
        assert res["certified"][m] == [sum(f["certified"] for f in row) for row in res["fits"][m]]
        assert res["diagnostics"][m]["n_used"]["L2"] == res["certified"][m]


def test_loglog_slope_recovers_known_rate_and_skips_missing():
    rng = np.random.default_rng(0)
    ns = np.array([100, 1000, 10000, 100000])
    values = 3.0 * ns[:, None] ** -0.5 * np.exp(0.2 * rng.standard_normal((4, 12)))
    s = loglog_slope(ns, values, 500, seed=1)
    assert s["slope"] == pytest.approx(-0.5, abs=0.05)
    assert s["ci_low"] < -0.5 < s["ci_high"] and s["ci_high"] - s["ci_low"] < 0.2
    assert loglog_slope(ns, values, 500, seed=1) == s
    holes = values.copy()
    holes[1, :5] = np.nan
    part = loglog_slope(ns, holes, 100, seed=1)
    assert part["slope"] != s["slope"] and part["slope"] == pytest.approx(-0.5, abs=0.08)
    holes[1:] = np.nan
    assert loglog_slope(ns, holes, 100, seed=1) is None


def test_micro_study_structure_json_and_progress():
    calls = []
    cfg = ReparamConfig.quick(**MICRO, truth_seeds=(0, 1))
    result = run_reparam_study(cfg, progress=lambda done, total, msg: calls.append((done, total, msg)))
    # progress counts a fixed budget (truths x n x R x steps x fits) and ends at total/total
    total = 2 * (100 + 300) * 2 * 5 * (3 * 3 + 1)
    assert calls[-1][:2] == (total, total) and all(c[1] == total for c in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and len(calls) > 20
    assert "truth 1 n=300" in " ".join(c[2]["what"] for c in calls)
    payload = json.loads(json.dumps(result.to_json()))
    assert payload == result.to_json()
    assert ReparamResult.from_json(payload).to_json() == result.to_json()
    assert set(payload) >= {"config", "ns", "truth", "truths", "voronoi", "l2_error", "metrics", "slopes",
                            "certified", "fits", "checkpoints", "diagnostics", "stats", "valley",
                            "total_seconds"}
    assert [t["seed"] for t in payload["truths"]] == [0, 1] and payload["truths"][0]["p"] != payload["truths"][1]["p"]
    for m in MODELS:
        # columns run over truths: 2 truths x 2 replicates
        assert result.voronoi[m].shape == (2, 4) and set(payload["metrics"][m]) == {*METRICS, "D_max"}
        assert set(payload["slopes"][m]) == set(METRICS)
        diag = payload["diagnostics"][m]
        assert set(diag) == {"n_used", "with_multi_cell", "at_step_cap", "drift_D_multi", "excess_dof"}
        assert all(len(v) == 2 for v in diag.values() if isinstance(v, list))
        assert len(payload["fits"][m]) == 2 and all(len(row) == 4 for row in payload["fits"][m])
        for row in payload["fits"][m]:
            assert [f["truth_seed"] for f in row] == [0, 0, 1, 1]
            for f in row:
                assert len(f["mass"]) == 3 and len(f["cell"]) == 3 and len(f["cell_size"]) == 2
                assert sum(f["cell_size"]) == 3 and isinstance(f["certified"], bool)
                assert len(f["D_multi_at"]) == len(payload["checkpoints"])
                assert f["mass"] == pytest.approx([math.exp(c) for c in np.array(f["params"])[:, -1]])
                assert [e["spread"] for e in f["endpoints"]] == [None, 0.3, 1.0]
                assert f["endpoints"][0]["D_multi"] == pytest.approx(f["D_multi"])
        pooled = payload["stats"]["pooled"][m]
        assert set(pooled) == {"mean_D_multi", "mean_D_single", "mean_L2", "share_D_multi", "D_max", "nonidentified"}
        # counted: replicates with a certified split fit and a certified near-best endpoint
        counted = [sum(f["certified"] and f["D_max"] is not None for f in row) for row in payload["fits"][m]]
        assert [p["m"] for p in pooled["nonidentified"]["per_n"]] == counted
        assert [p["k"] for p in pooled["nonidentified"]["per_n"]] == [
            sum(f["certified"] and f["D_max"] is not None and f["D_max"] > cfg.threshold for f in row)
            for row in payload["fits"][m]]
        assert set(payload["stats"]["by_truth"]) == {"0", "1"}
        assert [p["m"] for p in payload["stats"]["by_truth"]["1"][m]["share_D_multi"]["per_n"]] == [
            sum(f["certified"] for f in row[2:]) for row in payload["fits"][m]]
    assert set(payload["stats"]["pooled"][CONTROL]) == {"mean_D", "mean_L2"}
    assert payload["metrics"][CONTROL]["D"] and len(payload["metrics"][CONTROL]["D"][0]) == 4
    assert set(payload["valley"]["models"]) == set(MODELS) and payload["valley"]["n"] == 300
    # same config -> same numbers (seeded data and starts)
    again = run_reparam_study(cfg)
    assert np.array_equal(again.voronoi["no-share"], result.voronoi["no-share"])
    assert set(table_row(payload)) == {"claim", "paper", "lab", "holds", "criterion", "gap"}
    assert table_row(payload)["holds"] is None  # n spans 3x: not judged
    lines = summary_lines(payload)
    assert lines[0].startswith("legend:") and len(lines) == 2 + 3 * 2 + 4
    fig = reparam_study_figure(result)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log" and len(fig.data) == 10


def test_a_single_truth_without_control():
    res = run_reparam_study(ReparamConfig(**MICRO, control=False, valley_spreads=(0.5,))).to_json()
    assert CONTROL not in res["stats"]["pooled"] and CONTROL not in res["metrics"]
    assert [t["seed"] for t in res["truths"]] == [0]
    assert [e["spread"] for e in res["fits"]["no-share"][0][0]["endpoints"]] == [None, 0.5]
    assert table_row(res)["holds"] is None


@pytest.mark.parametrize("bad", [
    dict(ns=(0, 100)), dict(ns=(-5, 100)), dict(ns=(100,)), dict(ns=(100, 100)), dict(replicates=1),
    dict(n_true_prompts=3, n_fit_prompts=3), dict(models=("shared-cubic",)),
    dict(steps=0), dict(restarts=0), dict(noise_sd=-1.0), dict(tol=0.0),
    dict(valley_spreads=(0.0,)), dict(threshold=0.0), dict(near_best=-1.0), dict(truth_seeds=(1, 1)),
])
def test_bad_knobs_raise_user_error(bad):
    with pytest.raises(UserError) as info:
        run_reparam_study(ReparamConfig(**{**MICRO, **bad}))
    assert "\n" not in str(info.value)


def test_unknown_override_is_a_user_error():
    with pytest.raises(UserError, match="screen_steps"):
        ReparamConfig.quick(screen_steps=10)


def test_presets():
    quick, full = ReparamConfig.quick(), ReparamConfig.full()
    quick.validate(), full.validate()
    assert min(full.ns) == 1000 and max(full.ns) == 100000 and len(full.seeds()) == 2
    assert full.replicates * len(full.seeds()) >= 20 and full.valley_spreads == (0.3, 1.0) and full.control
    assert quick.seeds() == (0,) and max(quick.ns) < max(full.ns) and quick.valley_spreads == full.valley_spreads
    assert ReparamConfig.quick(replicates=5).replicates == 5


# ----------------------------------------------------------------------------- the valley


def test_valley_start_is_an_exact_fit_of_no_share_with_d_growing_as_t_squared():
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.05})
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 300, 3)
    y = data.responses(truth, "linear", cfg.noise_sd)
    features = (data.u, data.log_z, data.mean, y)
    tk, tv = truth.prompts("linear")
    truth_loss = mse(features, tk, tv, truth.bias)
    mass0 = truth.bias[0].exp()
    for t in (0.3, 1.0):
        q = valley_start(cfg, "no-share", 300, 3, t, truth)
        key, value, bias, _ = _map_jacobian("no-share", q, truth)
        # f = f* on every input: the same training loss as the truth, on noisy data too
        assert torch.allclose(mse(features, key, value, bias), truth_loss, rtol=1e-12)
        cells = voronoi_cells(torch.cat([key, value], -1), bias, torch.cat([tk, tv], -1), truth.bias)
        assert cells["size"].tolist() == [[2, 1]] * 3
        # two copies of mass m*/2 at distance t: D = m*·t²
        assert torch.allclose(cell_metrics(cells)["D_multi"], mass0 * t ** 2 * torch.ones(3, dtype=torch.float64))
        # the copies share true atom 0's key and spread their values by ±t along a unit vector
        assert torch.allclose(key[:, 0], key[:, 2]) and torch.allclose(key[:, 0], tk[0].expand(3, -1))
        assert torch.allclose((value[:, 0] - value[:, 2]).norm(dim=-1), torch.full((3,), 2 * t, dtype=torch.float64))
    # a shared-linear valley start spreads its values the same way, but its keys move too: not exact
    qs = valley_start(cfg, "shared-linear", 300, 3, 1.0, truth)
    ks, vs, bs, _ = _map_jacobian("shared-linear", qs, truth)
    assert torch.allclose(vs, _map_jacobian("no-share", valley_start(cfg, "no-share", 300, 3, 1.0, truth), truth)[1])
    assert (mse(features, ks, vs, bs) > 1.5 * truth_loss).all()


def test_noiseless_no_share_stays_on_the_valley_and_a_shared_model_returns_to_the_truth():
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.0, "init_scale": 0.0, "steps": 60})
    truth = make_truth(cfg)
    n = 300
    data = make_dataset(cfg, truth, n, 2)
    mass0 = truth.bias[0].exp().item()
    found = {}
    for model in ("no-share", "shared-linear"):
        y = data.responses(truth, truth_reparam(model), 0.0)
        features = (data.u, data.log_z, data.mean, y)
        tk, tv = truth.prompts(truth_reparam(model))
        true_atoms = torch.cat([tk, tv], -1)
        for t in (0.3, 1.0):
            fit = levenberg_marquardt(model, valley_start(cfg, model, n, 2, t, truth), features, truth, 60, 1e-12)
            key, value, bias, _ = _map_jacobian(model, fit["q"], truth)
            d = cell_metrics(voronoi_cells(torch.cat([key, value], -1), bias, true_atoms, truth.bias))["D_multi"]
            found[model, t] = (fit["loss"], d)
    for t in (0.3, 1.0):
        loss, d = found["no-share", t]
        assert (loss < 1e-26).all()  # the truth's loss (zero) ...
        assert torch.allclose(d, torch.full((2,), mass0 * t ** 2, dtype=torch.float64))  # ... with D = m*·t²
        loss, d = found["shared-linear", t]
        assert (loss < 1e-20).all() and (d < 1e-8).all()  # back at the truth
    # D_max over the starts: No-share's is the widest valley start's, shared-linear's is ~0
    for model, expect in (("no-share", mass0), ("shared-linear", 0.0)):
        fit, ends = fit_endpoints(cfg, model, data, data.responses(truth, truth_reparam(model), 0.0), n, truth)
        assert ends["certified"].all() and ends["D_multi"].shape == (2, 3)
        assert torch.allclose(ends["D_max"], torch.full((2,), expect, dtype=torch.float64), atol=1e-8)


def test_valley_path_is_flat_for_no_share_only():
    cfg = ReparamConfig(**{**MICRO, "noise_sd": 0.05})
    truth = make_truth(cfg)
    data = make_dataset(cfg, truth, 300, 2)
    ts = [0.0, 0.25, 0.5, 1.0]
    v = valley_path(cfg, truth, data, 300, ts)
    assert v["t"] == ts and v["n"] == 300 and set(v["models"]) == set(MODELS)
    ns_ = v["models"]["no-share"]
    assert np.allclose(ns_["loss_gain"], 0.0, atol=1e-6)  # in σ² units: flat
    assert np.allclose(ns_["D_multi"], truth.bias[0].exp().item() * np.array(ts) ** 2)
    lin = v["models"]["shared-linear"]["loss_gain"]
    assert lin[0] == pytest.approx(0.0, abs=1e-6) and lin[1] > 1.0 and lin[-1] > lin[1]


def test_model_statistics_by_hand_on_a_small_array():
    """Far and non-identified mean strictly above τ; uncertified split fits are left out of all."""
    cfg = ReparamConfig(ns=(100, 10000), replicates=3, bootstrap=50)
    tau = cfg.threshold
    d_multi = np.array([[tau, tau + 1e-4, tau - 1e-4], [0.01, 0.02, 9.0]])
    d_max = np.array([[tau + 1e-4, tau, 1.0], [0.01, 0.5, 9.0]])
    ones = np.ones((2, 3))
    m = {"D": ones, "D_multi": d_multi, "D_single": 2 * ones, "L2": ones, "dist_multi": ones, "D_max": d_max}
    ok = np.array([[True, True, True], [True, True, False]])  # the 9.0 fit is uncertified
    s = model_statistics(cfg, [100, 10000], m, ok, 1, seed=0)
    assert [(p["k"], p["m"]) for p in s["share_D_multi"]["per_n"]] == [(1, 3), (0, 2)]
    assert [(p["k"], p["m"]) for p in s["nonidentified"]["per_n"]] == [(2, 3), (1, 2)]
    assert [p["value"] for p in s["mean_D_multi"]["per_n"]] == pytest.approx([tau, 0.015])
    assert [p["value"] for p in s["D_max"]["per_n"]] == pytest.approx([tau + 1e-4, (0.01 + 0.5) / 2])
    assert s["mean_D_multi"]["slope"]["slope"] == pytest.approx(math.log(0.015 / tau) / math.log(100))
    assert s["share_D_multi"]["trend"]["per_decade"] == pytest.approx((0 - 1 / 3) / 2)
    assert s["mean_D_single"]["slope"]["slope"] == pytest.approx(0.0)
    # two truths side by side: columns t·R + r
    cfg2 = ReparamConfig(ns=(100, 10000), replicates=3, truth_seeds=(4, 5), bootstrap=50)
    two = model_statistics(cfg2, [100, 10000], {k: np.concatenate([v, v], 1) for k, v in m.items()},
                           np.concatenate([ok, ok], 1), 2, seed=0)
    assert cfg2.seeds() == (4, 5)
    assert [(p["k"], p["m"]) for p in two["nonidentified"]["per_n"]] == [(4, 6), (2, 4)]
    assert two["mean_D_multi"]["slope"]["slope"] == pytest.approx(s["mean_D_multi"]["slope"]["slope"])
