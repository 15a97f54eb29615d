"""Tests of theory/reparam.py: the Voronoi loss and its cells, the split starts, the hand-written
normal equations, the certified fit, the slopes, the verdict logic and the study's structure."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.theory_figures import reparam_figure
from theory.reparam import (
    METRICS, MODELS, ReparamConfig, ReparamResult, _normal_equations, _map_jacobian, _samples_last,
    cell_metrics, fit_certified, gate_features, levenberg_marquardt, loglog_slope, make_dataset,
    make_truth, mse, normal_equations, regression, run_reparam_study, sample_inputs, start_params,
    table_row, truth_reparam, voronoi_cells, voronoi_loss,
)
from toy_models.errors import UserError


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
    cfg = ReparamConfig.quick(**MICRO)
    result = run_reparam_study(cfg, progress=lambda done, total, msg: calls.append((done, total)))
    assert calls[-1] == (6, 6) and len(calls) == 6
    payload = json.loads(json.dumps(result.to_json()))
    assert payload == result.to_json()
    assert ReparamResult.from_json(payload).to_json() == result.to_json()
    assert set(payload) >= {"config", "ns", "truth", "voronoi", "l2_error", "metrics", "slopes",
                            "certified", "fits", "checkpoints", "diagnostics", "total_seconds"}
    for m in MODELS:
        assert result.voronoi[m].shape == (2, 2) and set(payload["metrics"][m]) == set(METRICS)
        assert set(payload["slopes"][m]) == set(METRICS)
        diag = payload["diagnostics"][m]
        assert set(diag) == {"n_used", "with_multi_cell", "at_step_cap", "drift_D_multi", "excess_dof"}
        assert all(len(v) == 2 for v in diag.values() if isinstance(v, list))
        assert len(payload["fits"][m]) == 2 and all(len(row) == 2 for row in payload["fits"][m])
        for row in payload["fits"][m]:
            for f in row:
                assert len(f["mass"]) == 3 and len(f["cell"]) == 3 and len(f["cell_size"]) == 2
                assert sum(f["cell_size"]) == 3 and isinstance(f["certified"], bool)
                assert len(f["D_multi_at"]) == len(payload["checkpoints"])
                assert f["mass"] == pytest.approx([math.exp(c) for c in np.array(f["params"])[:, -1]])
    # same config -> same numbers (seeded data and starts)
    again = run_reparam_study(cfg)
    assert np.array_equal(again.voronoi["no-share"], result.voronoi["no-share"])
    assert set(table_row(payload)) == {"claim", "paper", "lab", "holds", "criterion", "gap"}
    fig = reparam_figure(result)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def _slope(s, lo, hi):
    return {"slope": s, "ci_low": lo, "ci_high": hi, "intercept": 0.0}


def _result(ns_multi, shared_d=(-0.5, -0.6, -0.4)):
    shared = {"D": _slope(*shared_d), "D_multi": _slope(-0.5, -0.6, -0.4), "L2": _slope(-0.5, -0.55, -0.45)}
    return {"ns": [1000, 100000], "config": {"replicates": 20},
            "certified": {m: [20, 20] for m in MODELS},
            "slopes": {"shared-linear": shared, "shared-tanh": shared,
                       "no-share": {"D": _slope(*ns_multi), "D_multi": _slope(*ns_multi),
                                    "L2": _slope(-0.5, -0.55, -0.45)}}}


def test_table_row_verdict_is_computed_from_both_sides():
    row = table_row(_result((-0.05, -0.2, 0.1)))
    assert row["holds"] is True and set(row) == {"claim", "paper", "lab", "holds", "criterion", "gap"}
    assert "-0.05" in row["lab"] and "40/40" in row["lab"]
    # no-share as steep as the shared models: differs
    row = table_row(_result((-0.5, -0.7, -0.3)))
    assert row["holds"] is False and "no-share" in row["gap"]
    # flatter but CIs touching: differs
    assert table_row(_result((-0.3, -0.45, -0.1)))["holds"] is False
    # shared models not near -1/2: differs even if no-share is flat
    row = table_row(_result((0.0, -0.1, 0.1), shared_d=(-0.9, -1.0, -0.8)))
    assert row["holds"] is False and "not near" in row["gap"]
    # a missing slope: no verdict
    missing = _result((0.0, -0.1, 0.1))
    missing["slopes"]["no-share"]["D_multi"] = None
    assert table_row(missing)["holds"] is None
    assert table_row({})["holds"] is None


@pytest.mark.parametrize("bad", [
    dict(ns=(0, 100)), dict(ns=(-5, 100)), dict(ns=(100,)), dict(ns=(100, 100)), dict(replicates=1),
    dict(n_true_prompts=3, n_fit_prompts=3), dict(models=("shared-cubic",)),
    dict(steps=0), dict(restarts=0), dict(noise_sd=-1.0), dict(tol=0.0),
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
    assert min(full.ns) == 1000 and max(full.ns) == 100000 and full.replicates >= 20
    assert quick.replicates >= 20 and max(quick.ns) < max(full.ns)
    assert ReparamConfig.quick(replicates=5).replicates == 5
