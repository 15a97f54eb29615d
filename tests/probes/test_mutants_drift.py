"""Tests written against mutants of probes/drift.py (docs/tests.md): every number the drift probe
returns, recomputed input by input from the two forwards' caches on a 2-layer model with a soft
prompt, in batches of 3 and in one; its JSON and tensor names; the first layer with drift at the
floor."""

import torch

from probes.drift import JS_FLOOR, DriftAcc, layer_drift
from toy_models.model import MethodState
from tests.conftest import tiny_model


def _model():
    return tiny_model(n_layers=2, d_vocab=12, n_ctx=12, n_prompt=2)


def _js(p, q):  # float64, 0 log 0 = 0
    m = (p + q) / 2
    kl = lambda a, b: sum(float(x) * (torch.log(x) - torch.log(y)).item() for x, y in zip(a, b) if x > 0)
    return max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def _by_hand(model, state, tokens):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    resid, attn, js, rows = [0.0] * L, [0.0] * L, [0.0] * L, 0
    for t in tokens:
        _, a = model.run_with_cache(t[None])
        _, b = model.run_with_cache(t[None], state=state)
        T = t.shape[0]
        rows += T
        for l in range(L):
            for name, acc in (("hook_resid_post", resid), ("hook_attn_out", attn)):
                x, y = a[f"blocks.{l}.{name}"][0].double(), b[f"blocks.{l}.{name}"][0, -T:].double()
                acc[l] += sum(((y[i] - x[i]).norm() / x[i].norm()).item() for i in range(T))
            A, Apt = a[f"blocks.{l}.attn.hook_pattern"][0].double(), b[f"blocks.{l}.attn.hook_pattern"][0].double()
            n = Apt.shape[-1] - T
            for i in range(T):
                js[l] += sum(_js(Apt[h, n + i, n:] / Apt[h, n + i, n:].sum(), A[h, i]) for h in range(H)) / H
    return [r / rows for r in resid], [r / rows for r in attn], [r / rows for r in js]


def test_every_number_by_hand_in_any_batching():
    m = _model()
    g = torch.Generator().manual_seed(1)
    state = MethodState(prompt=torch.randn(2, 8, generator=g) * 0.5)
    for b in m.blocks:  # sharp patterns, so that the prompt moves layer 1's
        b.attn.W_Q.data *= 100
        b.attn.W_K.data *= 100
    tokens = torch.randint(0, 10, (7, 5), generator=g)
    want = _by_hand(m, state, tokens)
    first = next((l for l in range(2) if want[2][l] > JS_FLOOR), None)
    assert first == 1  # layer 0's pattern is invariant ([P]), layer 1's drifts
    for kw in ({}, {"batch_size": 3}):
        d = layer_drift(m, state, tokens, **kw)
        for got, w in zip((d.resid_rel, d.attn_out_rel, d.pattern_js), want):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, torch.tensor(w, dtype=torch.float32), rtol=1e-4, atol=1e-7)
        j = d.to_json()
        assert set(j) == {"probe", "resid_rel", "attn_out_rel", "pattern_js", "first_layer_with_pattern_drift",
                          "n_inputs"}
        assert j["probe"] == "drift" and j["n_inputs"] == 7 and j["first_layer_with_pattern_drift"] == first
        assert j["resid_rel"] == d.resid_rel.tolist() and j["pattern_js"] == d.pattern_js.tolist()
        assert j["attn_out_rel"] == d.attn_out_rel.tolist()
        t = d.tensors()
        assert set(t) == {"drift.resid_rel", "drift.attn_out_rel", "drift.pattern_js"}
        assert t["drift.resid_rel"] is d.resid_rel and t["drift.attn_out_rel"] is d.attn_out_rel
        assert t["drift.pattern_js"] is d.pattern_js


def test_first_layer_with_drift_is_strictly_above_the_floor():
    acc = DriftAcc(_model(), 1)
    acc.rows = 1
    acc.js[:] = torch.tensor([JS_FLOOR, 2 * JS_FLOOR], dtype=torch.float64)
    assert acc.finish().summary == {"first_layer_with_pattern_drift": 1, "n_inputs": 1}
    acc.js[:] = torch.tensor([JS_FLOOR, JS_FLOOR], dtype=torch.float64)
    assert acc.finish().summary["first_layer_with_pattern_drift"] is None
