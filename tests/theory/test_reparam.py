"""Tests of theory/reparam.py: the Voronoi loss, the generator, the fused gradient, fitting, API."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.reparam import (
    MODELS, ReparamConfig, ReparamResult, evaluate_fit, fit_prompts, gate_features,
    loglog_slope, loss_and_grads, make_dataset, make_truth, regression,
    run_reparam_study, sample_inputs, voronoi_loss,
)
from reports.theory_figures import reparam_figure
from toy_models.errors import UserError



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small batched ops: a second thread on busy cores costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(ns=(50, 100), replicates=2, restarts=2, screen_samples=50, screen_steps=5, steps=10,
            heldout=64, bootstrap=50)


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
    # splitting a true atom into two half-mass copies at the same place costs nothing,
    # moving one copy away costs the squared distance times its mass
    split = torch.cat([true[:1], true[:1], true[1:]])
    half = torch.cat([true_bias[:1] - math.log(2), true_bias[:1] - math.log(2), true_bias[1:]])
    assert voronoi_loss(split, half, true, true_bias).item() == pytest.approx(0, abs=1e-9)


def test_voronoi_hand_example():
    # true atoms (0,0), (10,0), both mass 1. Cell 1 gets two atoms (squared distances 1, 1,
    # masses 1/2 each) -> 1; mass |1 - 1| = 0. Cell 2 is a singleton at distance 2 with mass 2
    # -> 2*2 = 4; mass |2 - 1| = 1. D = 6.
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 2.0]])
    log_mass = torch.log(torch.tensor([0.5, 0.5, 2.0]))
    assert voronoi_loss(atoms, log_mass, true, torch.zeros(2)).item() == pytest.approx(6.0)
    # an empty cell pays its whole true mass: all three atoms near (0,0)
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    # cell 1: 0.5*1 + 0.5*1 + 2*4 = 9, mass |3 - 1| = 2; cell 2 empty: |0 - 1| = 1 -> 12
    assert voronoi_loss(atoms, log_mass, true, torch.zeros(2)).item() == pytest.approx(12.0)


def test_voronoi_batched_shapes():
    atoms, bias = torch.randn(5, 3, 3, 8), torch.randn(5, 3, 3)  # (R, S, L, 2d)
    true, true_bias = torch.randn(2, 8), torch.randn(2)
    d = voronoi_loss(atoms, bias, true, true_bias)
    assert d.shape == (5, 3)
    assert torch.allclose(d[2, 1], voronoi_loss(atoms[2, 1], bias[2, 1], true, true_bias))


def test_generator_deterministic_per_seed():
    cfg = ReparamConfig(**TINY)
    truth = make_truth(cfg)
    a, b = make_dataset(cfg, truth, 40, 3), make_dataset(cfg, truth, 40, 3)
    assert torch.equal(a.u, b.u) and torch.equal(a.noise, b.noise)
    assert torch.equal(make_truth(cfg).p, truth.p)
    # replicate r depends on (seed, n, r) only, not on how many replicates are drawn
    assert torch.equal(make_dataset(cfg, truth, 40, 2).u, a.u[:2])
    assert not torch.equal(a.u[0], a.u[1])
    other = ReparamConfig(**{**TINY, "seed": 1})
    assert not torch.equal(make_dataset(other, make_truth(other), 40, 3).u, a.u)
    assert not torch.equal(make_dataset(cfg, truth, 41, 3).u[:, :40], a.u)


def test_features_reproduce_attention_row():
    cfg = ReparamConfig(**TINY, dtype="float64")
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


def test_fused_gradient_matches_autograd():
    g = torch.Generator().manual_seed(0)
    u, mean, y = (torch.randn(3, 2, 50, 4, generator=g, dtype=torch.float64) for _ in range(3))
    log_z = torch.randn(3, 2, 50, generator=g, dtype=torch.float64)
    key, value = (torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    bias = 3 * torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (key, value, bias)]
    loss = ((regression(u, log_z, mean, *leaves) - y) ** 2).sum(-1).mean(-1)
    loss.sum().backward()
    fused_loss, *grads = loss_and_grads(u, log_z, mean, y, key, value, bias)
    assert torch.allclose(fused_loss, loss.detach(), atol=1e-10)
    for leaf, grad in zip(leaves, grads):
        assert torch.allclose(leaf.grad, grad, atol=1e-10)


def test_fit_shapes_and_more_data_lowers_voronoi_loss():
    # exactly specified, true parameterization (shared-tanh with the true W_1, W_2)
    cfg = ReparamConfig(d=2, n_tokens=2, n_true_prompts=1, n_fit_prompts=1, d_prompt=2,
                        reparam_weights="known", ns=(100, 10000), replicates=3, restarts=2,
                        screen_samples=100, screen_steps=50, steps=300, lr=0.05,
                        noise_sd=0.5, heldout=512)
    truth = make_truth(cfg)
    x_held, _ = sample_inputs(cfg, cfg.heldout, 1, 99)
    held = gate_features(x_held[0], truth)
    medians = []
    for n in cfg.ns:
        data = make_dataset(cfg, truth, n, cfg.replicates)
        y = data.responses(truth, "tanh", cfg.noise_sd)
        fit = fit_prompts(cfg, "shared-tanh", data, y, n, truth)
        assert fit["key"].shape == (3, 1, 2) and fit["bias"].shape == (3, 1)
        assert fit["train_loss"].shape == (3,)
        d, l2 = evaluate_fit(fit, truth, "tanh", held)
        assert d.shape == (3,) and l2.shape == (3,)
        medians.append((d.median().item(), l2.median().item()))
    assert medians[1][0] < 0.5 * medians[0][0]
    assert medians[1][1] < 0.5 * medians[0][1]


def test_loglog_slope_recovers_known_rate():
    rng = np.random.default_rng(0)
    ns = np.array([100, 1000, 10000, 100000])
    values = 3.0 * ns[:, None] ** -0.5 * np.exp(0.2 * rng.standard_normal((4, 12)))
    s = loglog_slope(ns, values, 500, seed=1)
    assert s["slope"] == pytest.approx(-0.5, abs=0.05)
    assert s["ci_low"] < -0.5 < s["ci_high"] and s["ci_high"] - s["ci_low"] < 0.2
    assert loglog_slope(ns, values, 500, seed=1) == s


def test_study_json_round_trip_and_progress():
    calls = []
    cfg = ReparamConfig(**TINY)
    result = run_reparam_study(cfg, progress=lambda done, total, msg: calls.append((done, total)))
    assert calls[-1] == (6, 6) and len(calls) == 6
    for m in MODELS:
        assert result.voronoi[m].shape == (2, 2) and np.all(result.voronoi[m] > 0)
        assert set(result.slopes[m]) == {"D", "L2"}
    payload = json.loads(json.dumps(result.to_json()))
    assert payload == result.to_json()
    assert ReparamResult.from_json(payload).to_json() == result.to_json()
    # same config -> same numbers (seeded inits and data)
    again = run_reparam_study(cfg)
    assert np.array_equal(again.voronoi["no-share"], result.voronoi["no-share"])
    fig = reparam_figure(result)
    assert any("slope" in (t.name or "") for t in fig.data)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


@pytest.mark.parametrize("bad", [
    dict(ns=(0, 100)), dict(ns=(-5, 100)), dict(ns=(100,)), dict(replicates=1),
    dict(n_true_prompts=3, n_fit_prompts=2), dict(models=("shared-cubic",)),
    dict(steps=0), dict(reparam_weights="frozen"), dict(dtype="float16"),
])
def test_bad_knobs_raise_user_error(bad):
    with pytest.raises(UserError) as info:
        run_reparam_study(ReparamConfig(**{**TINY, **bad}))
    assert "\n" not in str(info.value)


def test_presets():
    quick, full = ReparamConfig.quick(), ReparamConfig.full()
    quick.validate(), full.validate()
    assert min(full.ns) == 100 and max(full.ns) == 100000 and full.replicates >= 10
    assert len(quick.ns) < len(full.ns) and quick.replicates < full.replicates
