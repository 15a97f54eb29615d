"""toy_models/model.py: tests written against the mutants that survived `make mutate
MODULES=toy_models/model.py` (docs/tests.md, "Every survivor"). Each pins a behaviour the older
tests left open: the causal mask and its cache, the config's bounds and messages, the fast
(SDPA), shared-head and trimmed paths against the explicit forward, dtype casts of a method's
tensors, weight overrides combined with a context method, hook detection, the Simple-share
prefix map, LayerNorm's eps and the initialisation scales."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import toy_models.model as tm
from tests.conftest import micro_model
from prefixlab_common.errors import UserError
from toy_models.model import PRESETS, MethodState, ToyConfig, ToyTransformer, base_view, preset_config
from toy_models.tasks import resolve_task, sample_batch

import numpy as np


def content(spec, n=3, seed=0):
    return sample_batch(resolve_task("ascending", spec), spec, n, np.random.default_rng(seed)).content


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ causal mask


def test_causal_mask_is_exact_on_the_device_asked_and_cached():
    tm._MASKS.clear()
    try:
        for T, P in [(1, 0), (3, 0), (3, 2), (5, 1)]:
            m = tm._causal_mask(T, P, torch.device("cpu"))
            expected = torch.tensor([[j < P or j - P <= i for j in range(P + T)] for i in range(T)])
            assert m.dtype == torch.bool and torch.equal(m, expected)
            assert torch.equal(tm._MASKS[(T, P, "cpu")], expected)  # cached under its device
            assert tm._causal_mask(T, P, torch.device("cpu")) is m  # and read back from the cache
        meta = tm._causal_mask(4, 2, torch.device("meta"))  # made where it is asked for
        assert meta.device.type == "meta" and meta.dtype == torch.bool and meta.shape == (4, 6)
        tm._MASKS.clear()
        tm._MASKS.update({("filler", i, "cpu"): None for i in range(255)})
        tm._causal_mask(1, 1, "cpu")
        assert (1, 1, "cpu") in tm._MASKS and len(tm._MASKS) == 256
        tm._causal_mask(1, 2, "cpu")  # the cache is bounded at 256 entries
        assert (1, 2, "cpu") not in tm._MASKS and len(tm._MASKS) == 256
    finally:
        tm._MASKS.clear()


def test_the_forward_caches_its_masks_on_the_inputs_device(spec):
    m = micro_model(spec, slots="token")
    cfg = m.cfg
    state = MethodState(prefix_k=[torch.randn(cfg.n_heads, 1, cfg.d_head)],
                        prefix_v=[torch.randn(cfg.n_heads, 1, cfg.d_head)])
    tm._MASKS.clear()
    try:
        m(content(spec), state, last=2)
        m.fast_attention = False
        m(content(spec), state)
        assert tm._MASKS and all(k[2] == "cpu" for k in tm._MASKS)
    finally:
        tm._MASKS.clear()


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kw, msg", [
    (dict(slots="pads"), "unknown slot protocol 'pads'; use one of token, empty"),
    (dict(n_heads=0), "n_heads must be positive, got 0"),
    (dict(d_model=10, n_heads=3), "d_model=10 is not divisible by n_heads=3"),
    (dict(n_prompt=20, n_ctx=20), "n_prompt=20 does not fit the context n_ctx=20"),
    (dict(n_prompt=-1), "n_prompt=-1 does not fit the context n_ctx=20"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(dropout=1.5), "dropout must be in [0, 1), got 1.5"),
    (dict(d_mlp=0), "d_mlp must be positive, got 0"),
])
def test_config_refusals_and_their_messages(kw, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        ToyConfig(**kw)


def test_config_edges_that_are_allowed():
    assert ToyConfig(n_prompt=0).n_prompt == 0
    assert ToyConfig(n_prompt=19, n_ctx=20).n_prompt == 19
    assert ToyConfig(dropout=0.0).dropout == 0.0
    assert ToyConfig(d_mlp=1).mlp_width == 1


def test_preset_and_from_dict_messages():
    with pytest.raises(UserError, match=re.escape(f"unknown preset 'huge'; known: {', '.join(PRESETS)}")):
        preset_config("huge")
    cfg = ToyConfig(n_layers=3, slots="token")
    assert ToyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match=re.escape("model config has unknown fields ['bogus', 'extra']")):
        ToyConfig.from_dict({**cfg.to_dict(), "extra": 1, "bogus": 2})


# ------------------------------------------------------------------------------ method state


def test_prefix_len_base_view_and_base_params():
    cfg_tok, cfg_empty = ToyConfig(slots="token", n_prompt=4), ToyConfig(n_prompt=4)
    st = MethodState(prompt=torch.zeros(1, 64), prefix_k=[torch.zeros(4, 2, 16), None],
                     prefix_v=[torch.zeros(4, 2, 16), None], vacant=1)
    assert (st.prefix_len(0), st.prefix_len(1), MethodState().prefix_len(0)) == (2, 0, 0)
    assert st.slots_taken == 4
    view = base_view(cfg_tok, st)
    assert view.vacant == 4 and view.prompt is None and view.prefix_k is None and not view.weights
    assert base_view(cfg_empty, st) is None
    assert base_view(cfg_tok, None) is None and base_view(cfg_tok, MethodState()) is None
    m = ToyTransformer(ToyConfig())
    params = m.base_params()
    assert list(params) == [n for n, _ in m.named_parameters()]
    assert all(params[n] is p for n, p in m.named_parameters())


# ------------------------------------------------------------------------------ paths agree


def states(cfg, B, slots):
    """Context methods of every shape the forward accepts, and (token protocol) a vacant slot."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    L, H, Dh, D = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
    out = {
        "none": None,
        "prompt": MethodState(prompt=r(2, D)),
        "prefix": MethodState(prefix_k=[r(H, 1, Dh) for _ in range(L)], prefix_v=[r(H, 1, Dh) for _ in range(L)]),
        "both": MethodState(prompt=r(1, D), prefix_k=[r(H, 1, Dh), None], prefix_v=[r(H, 1, Dh), None]),
        "batched prompt": MethodState(prompt=r(B, 1, D)),
        "batched prefix": MethodState(prefix_k=[r(B, H, 2, Dh) for _ in range(L)],
                                      prefix_v=[r(B, H, 2, Dh) for _ in range(L)]),
    }
    if slots == "token":
        out["vacant"] = MethodState(vacant=1)
    return out


@pytest.mark.parametrize("slots", ["empty", "token"])
def test_fast_shared_head_and_trimmed_paths_equal_the_explicit_forward(spec, slots):
    """Two layers (the micro preset has one, so a mutant that trims every layer passed): every
    `last`, with and without hooks, equals the tail of the explicit forward with every position."""
    m = micro_model(spec, slots=slots, n_layers=2)
    toks = content(spec)
    B = toks.shape[0]
    for name, st in states(m.cfg, B, slots).items():
        m.fast_attention = False
        full = m(toks, st)
        m.fast_attention = True
        close(m(toks, st), full)
        for last in range(1, full.shape[1] + 1):
            close(m(toks, st, last=last), full[:, -last:])
            out, cache = m.run_with_cache(toks, state=st, last=last)  # hooks: every position runs
            close(out, full[:, -last:])
            assert cache["blocks.1.hook_resid_post"].shape[1] == full.shape[1], (name, last)
        if name.startswith("batched"):  # each row used its own prompt / prefix
            for b in range(B):
                row = MethodState(prompt=None if st.prompt is None else st.prompt[b],
                                  prefix_k=None if st.prefix_k is None else [k[b] for k in st.prefix_k],
                                  prefix_v=None if st.prefix_v is None else [v[b] for v in st.prefix_v])
                close(m(toks, st, last=2)[b], m(toks[b:b + 1], row, last=2)[0])


@pytest.mark.parametrize("slots", ["empty", "token"])
def test_a_prompt_and_prefix_in_another_dtype_are_cast_to_the_models(spec, slots):
    m = micro_model(spec, slots=slots, n_layers=2)
    cfg, toks = m.cfg, content(spec)
    g = torch.Generator().manual_seed(1)
    pk = [torch.randn(cfg.n_heads, 1, cfg.d_head, generator=g) for _ in range(2)]
    pv = [torch.randn(cfg.n_heads, 1, cfg.d_head, generator=g) for _ in range(2)]
    prompt = torch.randn(1, cfg.d_model, generator=g)
    s32 = MethodState(prompt=prompt, prefix_k=pk, prefix_v=pv)
    s64 = MethodState(prompt=prompt.double(), prefix_k=[t.double() for t in pk], prefix_v=[t.double() for t in pv])
    for fast in (True, False):
        m.fast_attention = fast
        for last in (None, 2):  # last=2: the shared-head path on the fast side
            out = m(toks, s64, last=last)
            assert out.dtype == torch.float32
            close(out, m(toks, s32, last=last))


def test_weight_overrides_keep_the_prompt_prefix_and_vacant_slots(spec):
    m = micro_model(spec, slots="token", n_layers=2)
    cfg, toks = m.cfg, content(spec)
    g = torch.Generator().manual_seed(2)
    pk = [torch.randn(cfg.n_heads, 1, cfg.d_head, generator=g) for _ in range(2)]
    pv = [torch.randn(cfg.n_heads, 1, cfg.d_head, generator=g) for _ in range(2)]
    prompt = torch.randn(1, cfg.d_model, generator=g)
    w = {"blocks.0.attn.W_Q": m.blocks[0].attn.W_Q * 1.5, "unembed.W_U": m.unembed.W_U.flip(0)}
    moved = copy.deepcopy(m)
    with torch.no_grad():
        moved.blocks[0].attn.W_Q.copy_(w["blocks.0.attn.W_Q"])
        moved.unembed.W_U.copy_(w["unembed.W_U"])
    ref = moved(toks, MethodState(prompt, pk, pv, vacant=1))
    close(m(toks, MethodState(prompt, pk, pv, w, vacant=1)), ref)
    T = toks.shape[1]
    assert not torch.allclose(m(toks, MethodState(prompt, pk, pv, w))[:, -T:], ref[:, -T:], atol=1e-3)  # vacant matters


def test_forward_limits_and_messages(spec):
    m = micro_model(spec, slots="token")
    cfg = m.cfg
    toks = content(spec)
    full = m(toks, MethodState(prompt=torch.randn(cfg.n_prompt, cfg.d_model)))  # a prompt filling every slot
    assert full.shape[1] == cfg.n_prompt + toks.shape[1]
    too_long = torch.zeros(1, cfg.n_ctx - cfg.n_prompt + 1, dtype=torch.long)
    with pytest.raises(UserError, match=re.escape(f"{too_long.shape[1]} content tokens do not fit the context "
                                                  f"({cfg.n_ctx} positions, {cfg.n_prompt} of them prompt slots)")):
        m(too_long)
    with pytest.raises(UserError, match=re.escape(f"the method takes {cfg.n_prompt + 1} slots, but the model has {cfg.n_prompt}")):
        m(toks, MethodState(prompt=torch.randn(1, cfg.d_model), vacant=cfg.n_prompt))
    n = cfg.n_prompt + toks.shape[1]
    assert m(toks, last=n).shape[1] == n
    for last in (0, n + 1):
        with pytest.raises(ValueError, match=re.escape(f"last={last} is not in 1..{n}")):
            m(toks, last=last)


# ------------------------------------------------------------------------------ which path runs


def test_the_fast_path_runs_exactly_when_no_hook_is_attached(spec, monkeypatch):
    calls, heads = [], []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(tm.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = micro_model(spec, slots="token", n_layers=2)
    real_head = m._forward_shared_head
    m._forward_shared_head = lambda *a: heads.append(1) or real_head(*a)
    toks = content(spec)
    assert m.fast_attention is True
    m(toks)
    assert (len(calls), len(heads)) == (2, 0)  # one SDPA per layer; the head's logits are wanted
    calls.clear()
    m(toks, last=2)  # shared head: each layer's content once, the head once below the last layer
    assert (len(calls), len(heads)) == (3, 1)
    calls.clear()
    m.run_with_hooks(toks, last=2, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: None)])
    m.fast_attention = False
    m(toks, last=2)
    m(toks)
    assert (len(calls), len(heads)) == (0, 1)
    m.fast_attention = True
    seen = []  # a plain hook on a non-HookPoint module: the fast path still runs
    h = m.blocks[-1].mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    m(toks, last=2)
    m(toks[:1], last=2)  # batch of one: no shared head, the final block still trimmed
    h.remove()
    assert seen == [2, 2] and len(heads) == 2


def test_shared_head_is_taken_exactly_when_it_is_exact(spec):
    m = micro_model(spec, slots="token")  # dropout 0.1
    cfg = m.cfg
    T, S = content(spec).shape[1], cfg.n_prompt
    x = torch.zeros(3, S + T, cfg.d_model)
    plain = [(None, None)] * cfg.n_layers
    sh = m._shared_head
    assert [sh(None, x, plain, T, last) for last in (1, T, T + 1, None)] == [S, S, 0, 0]
    assert sh(None, x[:1], plain, T, 2) == 0  # batch of one: nothing to share
    assert sh(None, x[:, S:], plain, T, 2) == 0  # no head
    assert sh(MethodState(prompt=torch.zeros(1, cfg.d_model)), x, plain, T, 2) == S
    assert sh(MethodState(prompt=torch.zeros(3, 1, cfg.d_model)), x, plain, T, 2) == 0  # per-sequence prompts
    k3, k4 = torch.zeros(cfg.n_heads, 1, cfg.d_head), torch.zeros(3, cfg.n_heads, 1, cfg.d_head)
    assert sh(None, x, [(k3, k3)], T, 2) == S and sh(None, x, [(k4, k4)], T, 2) == 0
    m.train()
    assert sh(None, x, plain, T, 2) == 0  # dropout differs per sequence
    m0 = micro_model(spec, slots="token", dropout=0.0).train()
    assert m0._shared_head(None, x, plain, T, 2) == S


def test_has_hooks_sees_every_kind_of_hook(spec):
    m = micro_model(spec)
    assert not m.has_hooks()
    hp = m.blocks[0].attn.hook_z
    for register in (hp.register_forward_hook, hp.register_forward_pre_hook,
                     hp.register_full_backward_hook, hp.register_full_backward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *a: None)
        try:
            assert m.has_hooks(), register
        finally:
            handle.remove()
        assert not m.has_hooks()
    hp.add_hook(lambda t, hook: None)
    assert m.has_hooks()
    m.reset_hooks()
    assert not m.has_hooks()


def test_attention_and_block_default_to_the_explicit_path_and_fast_attention_drops_out(spec):
    m = micro_model(spec, dropout=0.5)
    attn = m.blocks[0].attn
    x = torch.randn(2, 5, m.cfg.d_model)
    seen = []
    attn.hook_pattern.add_hook(lambda t, hook: seen.append(t.shape))
    attn(x, None, None)
    m.blocks[0](x, None, None)
    attn.hook_pattern.remove_hooks()
    assert len(seen) == 2  # the pattern was formed: the explicit path
    attn.train()
    torch.manual_seed(0)
    dropped = attn(x, None, None, fast=True)
    attn.eval()
    assert not torch.allclose(dropped, attn(x, None, None, fast=True))


# ------------------------------------------------------------------------------ maps and init


@pytest.mark.parametrize("ln", [True, False])
def test_prefix_from_residual_is_layernorm_then_the_key_and_value_maps(spec, ln):
    m = micro_model(spec, ln_before_attn=ln, layer_norm_eps=0.1)
    blk, cfg = m.blocks[0], m.cfg
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in [blk.attn.b_K, blk.attn.b_V] + ([blk.ln1.w, blk.ln1.b] if ln else []):
            p.copy_(torch.randn(p.shape, generator=g))
    p = torch.randn(2, 3, cfg.d_model, generator=g)  # [batch, P, d_model]
    k, v = blk.prefix_from_residual(p)
    h = p
    if ln:
        mu, var = p.mean(-1, keepdim=True), p.var(-1, unbiased=False, keepdim=True)
        h = (p - mu) / torch.sqrt(var + 0.1) * blk.ln1.w + blk.ln1.b
    for got, W, b in ((k, blk.attn.W_K, blk.attn.b_K), (v, blk.attn.W_V, blk.attn.b_V)):
        assert got.shape == (2, cfg.n_heads, 3, cfg.d_head)
        close(got, torch.einsum("bpd,hde->bhpe", h, W) + b[:, None])


def test_layernorm_uses_the_configured_eps(spec):
    m = micro_model(spec, layer_norm_eps=0.5)
    ln = m.ln_final
    with torch.no_grad():
        ln.w.copy_(torch.linspace(0.5, 2.0, m.cfg.d_model))
        ln.b.copy_(torch.linspace(-1.0, 1.0, m.cfg.d_model))
    x = torch.randn(2, 3, m.cfg.d_model) * 0.3
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    close(ln(x), (x - mu) / torch.sqrt(var + 0.5) * ln.w + ln.b)


def test_init_draws_from_the_generator_at_the_documented_scales():
    cfg = ToyConfig(n_layers=2, n_heads=4, d_model=256, d_vocab=12, n_ctx=20)
    a, b = ToyTransformer(cfg), ToyTransformer(cfg)
    torch.manual_seed(1)
    a.reset_parameters(torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b.reset_parameters(torch.Generator().manual_seed(5))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # the generator alone decides
        if name.endswith(("W_O", "W_out")):  # GPT-2's residual-write scale: 0.02 / sqrt(2 * n_layers)
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05), name
        elif name.endswith(("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_in", "W_U")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
