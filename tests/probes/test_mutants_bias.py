"""Tests written against mutants of probes/bias.py (docs/tests.md): every number the bias probe
returns, recomputed input by input from the two forwards' caches on a 2-layer model with a soft
prompt of length 1 and 2, for all layers and heads and for a subset in batches of 2; its JSON,
tensors, summary and verdict."""

import pytest
import torch

from probes.bias import PROBE, TOL, bias_decomposition
from toy_models.model import MethodState, ToyConfig, ToyTransformer


def _setup(P):
    torch.manual_seed(0)
    m = ToyTransformer(ToyConfig(n_layers=2, n_heads=2, d_model=8, d_vocab=12, n_ctx=12, n_prompt=2,
                                 dropout=0.0)).eval()
    for b in m.blocks:  # sharper patterns (not so sharp that the prompt's weight underflows)
        b.attn.W_Q.data *= 20
        b.attn.W_K.data *= 20
    g = torch.Generator().manual_seed(1)
    return m, MethodState(prompt=torch.randn(P, 8, generator=g) * 0.5), torch.randint(0, 10, (5, 4), generator=g)


def _by_hand(m, state, tokens, layers, heads):
    out = {}
    for li, l in enumerate(layers):
        for hi, h in enumerate(heads):
            res, zmax, biases, ex = 0.0, 0.0, [], None
            for t in tokens:
                _, a = m.run_with_cache(t[None])
                _, b = m.run_with_cache(t[None], state=state)
                T = t.shape[0]
                Apt = b[f"blocks.{l}.attn.hook_pattern"][0, h].double()
                n = Apt.shape[-1] - T
                v = b[f"blocks.{l}.attn.hook_v"][0, :n, h].double()
                rows = []
                for i in range(T):
                    q = Apt[n + i]
                    bias = (q[:n, None] * v).sum(0)
                    zpt = b[f"blocks.{l}.attn.hook_z"][0, n + i, h].double()
                    z = a[f"blocks.{l}.attn.hook_z"][0, i, h].double()
                    res = max(res, float((zpt - q[n:].sum() * z - bias).abs().max()))
                    zmax = max(zmax, float(zpt.abs().max()))
                    rows.append(bias)
                biases += rows
                ex = torch.stack(rows) if ex is None else ex
            B = torch.stack(biases)
            d = B.sum(0) / B.sum(0).norm()
            cos = [float((x / x.norm()) @ d) if x.norm() > 0 else 1.0 for x in B]
            out[li, hi] = dict(res=res, rel=res / zmax, norm=float(B.norm(dim=-1).mean()), cos=min(cos), dir=d, ex=ex, n=n)
    return out


@pytest.mark.parametrize("P, layers, heads, kw", [(1, None, None, {}), (2, [1, 0], None, {"batch_size": 2}), (2, [0], [1], {}),
                                                  (1, [1], None, {"tol": 0.5})])
def test_every_number_by_hand(P, layers, heads, kw):
    m, state, tokens = _setup(P)
    L, H = layers or [0, 1], heads or [0, 1]
    tol = kw.get("tol", TOL)
    r = bias_decomposition(m, state, tokens, layers=layers, heads=heads, **kw)
    want = _by_hand(m, state, tokens, L, H)
    assert r.layers == L and r.heads == H and r.tol == tol and r.P == [P] * len(L)
    for (li, hi), w in want.items():
        assert r.max_residual[li, hi].item() == pytest.approx(w["res"], rel=1e-3, abs=1e-7)
        assert r.rel_residual[li, hi].item() == pytest.approx(w["rel"], rel=1e-3, abs=1e-6)
        assert r.mean_bias_norm[li, hi].item() == pytest.approx(w["norm"], rel=1e-4)
        assert r.min_bias_cosine[li, hi].item() == pytest.approx(w["cos"], rel=1e-4)
        torch.testing.assert_close(r.mean_bias_direction[li, hi], w["dir"].float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r.example_bias[li, hi], w["ex"].float(), rtol=1e-4, atol=1e-7)
    assert r.mean_bias_norm.dtype == torch.float32 and r.mean_bias_direction.shape == (len(L), len(H), 4)
    assert min(w["cos"] for w in want.values()) < 0.999 or P == 1  # P = 2: the bias turns
    i0 = L.index(0) if 0 in L else None
    s = r.summary
    assert s == {"layer0_max_residual": None if i0 is None else float(r.max_residual[i0].max()),
                 "layer0_rel_residual": None if i0 is None else float(r.rel_residual[i0].max()),
                 "layer0_identity_holds": None if i0 is None else bool(r.rel_residual[i0].max() <= tol),
                 "layer0_min_bias_cosine": None if i0 is None or P != 1 else float(r.min_bias_cosine[i0].min()),
                 "n_inputs": 5}
    if i0 is not None:
        assert s["layer0_identity_holds"] is True
    assert r.to_json() == {"probe": "bias", "layers": L, "heads": H, "tol": tol, "P": r.P,
                           "max_residual": r.max_residual.tolist(), "rel_residual": r.rel_residual.tolist(),
                           "mean_bias_norm": r.mean_bias_norm.tolist(),
                           "min_bias_cosine": r.min_bias_cosine.tolist(), **s}
    t = r.tensors()
    assert list(t) == ["bias.max_residual", "bias.rel_residual", "bias.mean_bias_norm", "bias.min_bias_cosine",
                       "bias.mean_bias_direction", "bias.example_bias"]
    assert all(x is y for x, y in zip(t.values(), (r.max_residual, r.rel_residual, r.mean_bias_norm,
                                                   r.min_bias_cosine, r.mean_bias_direction, r.example_bias)))
    assert PROBE.verdict(r) == ("layer-0 bias decomposition", s["layer0_identity_holds"], s["layer0_rel_residual"])


def test_a_relative_residual_of_exactly_tol_holds():
    m, state, tokens = _setup(1)
    rel = bias_decomposition(m, state, tokens, layers=[0]).summary["layer0_rel_residual"]
    assert bias_decomposition(m, state, tokens, layers=[0], tol=rel).summary["layer0_identity_holds"] is True
    assert bias_decomposition(m, state, tokens, layers=[0], tol=rel / 2 if rel else -1.0).summary[
        "layer0_identity_holds"] is False
