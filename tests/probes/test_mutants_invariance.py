"""Tests written against mutants of probes/invariance.py (docs/tests.md): every number the
invariance probe returns, recomputed input by input from the two forwards' caches on a 2-layer
model with a soft prompt (layer 0 invariant, layer 1 not), for all layers and heads and for a
subset, in batches of 2 and in one; its JSON, tensors, summary and verdict."""

import pytest
import torch

from probes.invariance import PROBE, TOL, attention_invariance
from toy_models.model import MethodState, ToyConfig, ToyTransformer


def _setup():
    torch.manual_seed(0)
    m = ToyTransformer(ToyConfig(n_layers=2, n_heads=2, d_model=8, d_vocab=12, n_ctx=12, n_prompt=2,
                                 dropout=0.0)).eval()
    for b in m.blocks:  # sharp patterns, so that the prompt moves layer 1's
        b.attn.W_Q.data *= 100
        b.attn.W_K.data *= 100
    g = torch.Generator().manual_seed(1)
    state = MethodState(prompt=torch.randn(2, 8, generator=g) * 0.5)
    return m, state, torch.randint(0, 10, (5, 4), generator=g)


def _js(p, q):
    m = (p + q) / 2
    kl = lambda a, b: sum(float(x) * (torch.log(x) - torch.log(y)).item() for x, y in zip(a, b) if x > 0)
    return max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def _by_hand(m, state, tokens, layers, heads, tol):
    nL, nH = len(layers), len(heads)
    mx, js, within, alpha, rows = torch.zeros(nL, nH), [[0.0] * nH for _ in layers], [[0] * nH for _ in layers], \
        [[0.0] * nH for _ in layers], 0
    for t in tokens:
        _, a = m.run_with_cache(t[None])
        _, b = m.run_with_cache(t[None], state=state)
        T = t.shape[0]
        rows += T
        for li, l in enumerate(layers):
            A, Apt = a[f"blocks.{l}.attn.hook_pattern"][0], b[f"blocks.{l}.attn.hook_pattern"][0]
            n = Apt.shape[-1] - T
            for hi, h in enumerate(heads):
                for i in range(T):
                    q = Apt[h, n + i]
                    r = q[n:] / q[n:].sum()
                    d = (r - A[h, i]).abs().max()
                    mx[li, hi] = max(mx[li, hi], d)
                    js[li][hi] += _js(r.double(), A[h, i].double())
                    within[li][hi] += int(d <= tol)
                    alpha[li][hi] += float(q[:n].sum())
    f = lambda x: torch.tensor(x, dtype=torch.float64) / rows
    return mx, f(js), f(within), f(alpha)


@pytest.mark.parametrize("layers, heads, kw", [(None, None, {}), ([1, 0], [1], {"batch_size": 2}),
                                               ([1], None, {"tol": 0.5})])
def test_every_number_by_hand(layers, heads, kw):
    m, state, tokens = _setup()
    L, H = layers or [0, 1], heads or [0, 1]
    tol = kw.get("tol", TOL)
    r = attention_invariance(m, state, tokens, layers=layers, heads=heads, **kw)
    mx, js, within, alpha = _by_hand(m, state, tokens, L, H, tol)
    assert r.layers == L and r.heads == H and r.tol == tol and r.n_pre == [2] * len(L)
    torch.testing.assert_close(r.max_abs_diff, mx, rtol=0, atol=1e-7)
    for got, want in ((r.mean_js, js), (r.frac_rows_within_tol, within), (r.mean_prefix_mass, alpha)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-7)
    assert 0 < float(alpha.min()) and float(mx[L.index(1)].max()) > 1e-3  # the prompt takes mass; layer 1 moves
    # the first input's patterns, as recorded
    _, a = m.run_with_cache(tokens[:1])
    _, b = m.run_with_cache(tokens[:1], state=state)
    for i, l in enumerate(L):
        assert torch.equal(r.example_base[i], a[f"blocks.{l}.attn.hook_pattern"][0, H])
        assert torch.equal(r.example_method[i], b[f"blocks.{l}.attn.hook_pattern"][0, H])
    s = r.summary
    want = {"max_abs_diff_by_layer": {str(l): float(mx[i].max()) for i, l in enumerate(L)}, "n_inputs": 5,
            "layer0_max_abs_diff": float(mx[L.index(0)].max()) if 0 in L else None,
            "layer0_invariant": bool(mx[L.index(0)].max() <= tol) if 0 in L else None}
    assert s == want
    if 0 in L:
        assert s["layer0_invariant"] is True
    j = r.to_json()
    assert j == {"probe": "invariance", "layers": L, "heads": H, "tol": tol, "max_abs_diff": r.max_abs_diff.tolist(),
                 "mean_js": r.mean_js.tolist(), "frac_rows_within_tol": r.frac_rows_within_tol.tolist(),
                 "mean_prefix_mass": r.mean_prefix_mass.tolist(), "n_pre": r.n_pre, **want}
    assert r.tensors() == {"invariance.max_abs_diff": r.max_abs_diff, "invariance.mean_js": r.mean_js,
                           "invariance.frac_rows_within_tol": r.frac_rows_within_tol,
                           "invariance.mean_prefix_mass": r.mean_prefix_mass,
                           "invariance.example_base": r.example_base, "invariance.example_method": r.example_method}
    assert PROBE.verdict(r) == ("layer-0 attention invariance", want["layer0_invariant"], want["layer0_max_abs_diff"])


def test_a_difference_of_exactly_tol_is_within():
    m, state, tokens = _setup()
    d = float(attention_invariance(m, state, tokens, layers=[1]).max_abs_diff.max())
    assert d > 0
    r = attention_invariance(m, state, tokens, layers=[1, 0], tol=d)  # every row's difference <= d
    assert float(r.frac_rows_within_tol.min()) == 1.0
    r0 = attention_invariance(m, state, tokens, layers=[0])
    d0 = r0.summary["layer0_max_abs_diff"]
    assert attention_invariance(m, state, tokens, layers=[0], tol=d0).summary["layer0_invariant"] is True
    assert attention_invariance(m, state, tokens, layers=[0], tol=d0 / 2 if d0 else -1.0).summary[
        "layer0_invariant"] is False
