"""theory/reparam.py, the Voronoi loss and what reads it: tests written against the mutants that
survived `tools/mutate.py --only ... theory/reparam.py` (docs/tests.md, "Every survivor"):
cell metrics of a batch of fits and of a single true atom, the gate features of batched inputs
with N != d, and the slope's bootstrap interval and intercept against a hand computation."""

import math

import numpy as np
import pytest
import torch

from theory.reparam import ReparamConfig, cell_metrics, gate_features, loglog_slope, make_truth, voronoi_cells

F64 = torch.float64


def test_cell_metrics_of_a_batch_are_per_fit():
    """Fit 0 has a two-atom cell with distances below 1 (0.5 and 0.3) and a singleton; fit 1 has
    only singleton cells and an empty one. Every metric is that fit's own, NaN where the fit has
    no cell of the type, and dist_multi is the largest distance inside a multi-atom cell."""
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    atoms = torch.tensor([[[0.5, 0.0], [0.0, 0.3], [10.0, 2.0]],
                          [[0.0, 0.2], [10.0, 0.0], [10.0, 1.0]]], dtype=F64)
    log_mass = torch.log(torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.5, 0.5]], dtype=F64))
    cells = voronoi_cells(atoms, log_mass, true, torch.zeros(3, dtype=F64))
    assert cells["cell"].tolist() == [[0, 0, 1], [0, 1, 1]]
    m = cell_metrics(cells)
    # fit 0: cell 0 = 0.5*0.5² + 0.5*0.3² + |1-1| = 0.17; cell 1 = 1*2 (singleton: not squared);
    # cell 2 is empty and pays its mass, 1. fit 1: cell 0 = 1*0.2; cell 1 = 0.5*0² + 0.5*1²; cell 2 = 1
    d0 = [0.17, 2.0, 1.0]
    d1 = [0.2, 0.5, 1.0]
    assert cells["per_cell"].tolist() == [pytest.approx(d0), pytest.approx(d1)]
    assert m["D"].tolist() == pytest.approx([sum(d0), sum(d1)])
    assert m["D_multi"].tolist() == pytest.approx([0.17, d1[1]])
    assert m["D_single"].tolist() == pytest.approx([2.0, 0.2])  # the empty cell has size 0: neither
    assert m["dist_multi"].tolist() == pytest.approx([0.5, 1.0])
    # a fit without a multi-atom cell gets NaN, next to one with it
    atoms2 = torch.stack([atoms[0], torch.tensor([[0.0, 0.2], [10.0, 0.0], [0.0, 9.0]], dtype=F64)])
    m2 = cell_metrics(voronoi_cells(atoms2, torch.zeros(2, 3, dtype=F64), true, torch.zeros(3, dtype=F64)))
    assert not math.isnan(m2["D_multi"][0].item()) and math.isnan(m2["D_multi"][1].item())
    assert math.isnan(m2["dist_multi"][1].item()) and m2["dist_multi"][0].item() == pytest.approx(0.5)
    assert m2["D_single"][1].item() == pytest.approx(0.2 + 0.0 + 1.0)


def test_cell_metrics_with_a_single_true_atom():
    true = torch.zeros(1, 2, dtype=F64)
    atoms = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=F64)
    m = cell_metrics(voronoi_cells(atoms, torch.log(torch.tensor([0.5, 0.5], dtype=F64)), true,
                                   torch.zeros(1, dtype=F64)))
    assert m["D"].item() == pytest.approx(0.5 * 0.09 + 0.5 * 0.16)
    assert m["D_multi"].item() == pytest.approx(m["D"].item()) and math.isnan(m["D_single"].item())
    assert m["dist_multi"].item() == pytest.approx(0.4)


def test_gate_features_of_batched_inputs_with_n_not_d():
    cfg = ReparamConfig(d=2, n_tokens=3, n_true_prompts=1, n_fit_prompts=2)
    truth = make_truth(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 2, generator=g, dtype=F64)  # (R, n, N=3, d=2)
    u, log_z, mean = gate_features(x, truth)
    assert u.shape == (2, 5, 2) and log_z.shape == (2, 5) and mean.shape == (2, 5, 2)
    for r in range(2):
        for i in range(5):
            xi = x[r, i]
            logits = torch.stack([xi[0] @ truth.qk @ xi[j] for j in range(3)]) / math.sqrt(2)
            w = torch.softmax(logits, 0)
            assert torch.allclose(u[r, i], xi[0] @ truth.qk / math.sqrt(2))
            assert torch.allclose(log_z[r, i], torch.logsumexp(logits, 0))
            assert torch.allclose(mean[r, i], sum(w[j] * (truth.w_v @ xi[j]) for j in range(3)))


def test_loglog_slope_interval_and_intercept_by_hand():
    ns = [100, 1000, 10000]
    rng = np.random.default_rng(3)
    values = 2.0 * np.array(ns, dtype=float)[:, None] ** -0.5 * np.exp(0.3 * rng.standard_normal((3, 8)))
    values[1, 2] = np.nan  # skipped
    s = loglog_slope(ns, values, 400, seed=7)
    x = np.log(np.array(ns, dtype=float))
    rows = [np.log(v[np.isfinite(v)]) for v in values]
    xc = x - x.mean()
    means = np.array([r.mean() for r in rows])
    point = (means * xc).sum() / (xc ** 2).sum()
    r = np.random.default_rng(7)
    boot = np.stack([r.choice(row, size=(400, len(row))).mean(-1) for row in rows], -1)
    slopes = (boot * xc).sum(-1) / (xc ** 2).sum()
    assert s["slope"] == pytest.approx(point, rel=1e-12)
    assert s["ci_low"] == pytest.approx(np.percentile(slopes, 2.5), rel=1e-12)
    assert s["ci_high"] == pytest.approx(np.percentile(slopes, 97.5), rel=1e-12)
    assert s["intercept"] == pytest.approx(means.mean() - point * x.mean(), rel=1e-12)
    # an exact power law: intercept log(2), slope -1/2, an interval of zero width
    exact = 2.0 * np.array(ns, dtype=float)[:, None] ** -0.5 * np.ones((3, 4))
    e = loglog_slope(ns, exact, 50, seed=0)
    assert e["slope"] == pytest.approx(-0.5) and e["intercept"] == pytest.approx(math.log(2.0))
    assert e["ci_low"] == pytest.approx(-0.5) and e["ci_high"] == pytest.approx(-0.5)
