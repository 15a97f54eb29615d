"""The science as properties: over random micro models, random P, random prefix/soft-prompt values
and random inputs, the layer-0 identities hold; full fine-tuning and q/k LoRA break them."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from probes.bias import bias_decomposition
from probes.clusters import activation_clusters
from probes.drift import layer_drift
from probes.hierarchy import check_hierarchy, classify, soft_prompt_to_prefix
from probes.invariance import attention_invariance
from tests.conftest import micro_model
from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from toy_models.tasks import TaskSpec
from tuning import make_method

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_setup(seed, n_layers, n_heads, P, ln, kind, scale, slots="empty"):
    spec = TaskSpec(length=4, num_digits=4, prompt_len=6)
    model = micro_model(spec, seed=seed, n_layers=n_layers, n_heads=n_heads, ln_before_attn=ln, slots=slots)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, spec.vocab_size, (6, spec.content_len), generator=g)
    cfg = model.cfg
    if kind == "soft_prompt":
        state = MethodState(prompt=torch.randn(P, cfg.d_model, generator=g) * scale)
    elif kind == "prefix_free":
        state = MethodState(prefix_k=[torch.randn(cfg.n_heads, P, cfg.d_head, generator=g) * scale for _ in range(n_layers)],
                            prefix_v=[torch.randn(cfg.n_heads, P, cfg.d_head, generator=g) * scale for _ in range(n_layers)])
    else:
        share = kind.split("_")[1]
        m = make_method("prefix", model, length=P, share=share, hidden=8, generator=g, init_scale=scale)
        state = m.state()
    return model, state, tokens


CONTEXT = ["soft_prompt", "prefix_free", "prefix_none", "prefix_simple", "prefix_deep"]


@SETTINGS
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 3), n_heads=st.sampled_from([1, 2, 4]),
       P=st.integers(1, 6), ln=st.booleans(), kind=st.sampled_from(CONTEXT), scale=st.floats(0.1, 5.0),
       slots=st.sampled_from(["token", "empty"]))
def test_layer0_identities_hold_for_any_context_method(seed, n_layers, n_heads, P, ln, kind, scale, slots):
    """Under both slot protocols; with `token`, the base forward keeps the SLOT tokens the
    method did not take, at the same positions (toy_models.model.base_view)."""
    model, state, tokens = random_setup(seed, n_layers, n_heads, P, ln, kind, scale, slots)
    inv = attention_invariance(model, state, tokens, batch_size=4)
    assert inv.summary["layer0_max_abs_diff"] <= 1e-5
    assert inv.summary["layer0_invariant"]
    assert float(inv.mean_prefix_mass[0].min()) > 0  # the prefix did take attention mass
    bias = bias_decomposition(model, state, tokens, batch_size=4)
    assert bias.summary["layer0_rel_residual"] <= 1e-5
    if P == 1:
        assert bias.summary["layer0_min_bias_cosine"] >= 1 - 1e-4


@SETTINGS
@given(seed=st.integers(0, 10_000), P=st.integers(1, 6), n_layers=st.integers(1, 3))
def test_token_protocol_prefix_takes_the_place_of_slots(seed, P, n_layers):
    """[P]'s replacement (docs/papers.md §3b): a prefix whose keys/values are the base's own keys/values
    at slots 0..P-1 gives back the plain base forward exactly; a prefix at other slots does not."""
    spec = TaskSpec(length=4, num_digits=4, prompt_len=6)
    model = micro_model(spec, seed=seed, n_layers=n_layers, slots="token")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size - 1, (5, spec.content_len), generator=g)
    names = {f"blocks.{l}.attn.hook_{kv}" for l in range(n_layers) for kv in "kv"}
    _, cache = model.run_with_cache(tokens[:1], names_filter=lambda n: n in names)
    kv = lambda l, s_, sl: cache[f"blocks.{l}.attn.hook_{s_}"][0, sl].transpose(0, 1)
    same = MethodState(prefix_k=[kv(l, "k", slice(0, P)) for l in range(n_layers)],
                       prefix_v=[kv(l, "v", slice(0, P)) for l in range(n_layers)])
    base = model.content_logits(tokens)
    assert (model.content_logits(tokens, same) - base).abs().max() <= 1e-5
    if P < spec.prompt_len:  # the keys of later slots in the first slots' place: not the base
        other = MethodState(prefix_k=[kv(l, "k", slice(1, P + 1)) for l in range(n_layers)],
                            prefix_v=[kv(l, "v", slice(1, P + 1)) for l in range(n_layers)])
        assert (model.content_logits(tokens, other) - base).abs().max() > 1e-4


def test_token_protocol_base_reads_the_slot_tokens(spec):
    """With `token` the SLOT embedding enters every base forward; with `empty` it never does."""
    toks = torch.randint(0, spec.vocab_size - 1, (3, spec.content_len), generator=torch.Generator().manual_seed(0))
    for slots, changes in (("token", True), ("empty", False)):
        model = micro_model(spec, slots=slots)
        before = model.content_logits(toks)
        with torch.no_grad():
            model.embed.W_E[spec.slot_token] += 1.0
        assert changes == (not torch.allclose(before, model.content_logits(toks)))
        assert model(toks).shape[1] == spec.content_len + (spec.prompt_len if slots == "token" else 0)


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["full", "lora_qk"]), slots=st.sampled_from(["token", "empty"]))
def test_full_finetuning_and_qk_lora_break_them(seed, kind, slots):
    spec = TaskSpec(length=4, num_digits=4, prompt_len=3)
    model = micro_model(spec, seed=seed, n_layers=2, slots=slots)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (6, spec.content_len), generator=g)
    if kind == "full":
        m = make_method("full", model)
    else:
        m = make_method("lora", model, rank=2, targets=["q", "k"], init_b="random", generator=g)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    inv = attention_invariance(model, m.state(), tokens)
    assert inv.summary["layer0_max_abs_diff"] > 1e-3
    assert not inv.summary["layer0_invariant"]
    if kind == "full":
        assert not bias_decomposition(model, m.state(), tokens).summary["layer0_identity_holds"]


def test_lora_on_output_and_mlp_keeps_layer0_attention(spec):
    model = micro_model(spec, n_layers=2)
    tokens = torch.randint(0, spec.vocab_size, (6, spec.content_len))
    m = make_method("lora", model, rank=2, init_b="random", generator=torch.Generator().manual_seed(0))
    inv = attention_invariance(model, m.state(), tokens)
    assert inv.summary["layer0_invariant"]  # scores are frozen at layer 0: [P]'s LoRA choice
    assert inv.summary["max_abs_diff_by_layer"]["1"] > 1e-4  # but layer 1 sees changed inputs


def test_deeper_layers_drift_under_a_prefix(spec):
    model, state, tokens = random_setup(3, 3, 2, 2, True, "prefix_simple", 3.0)
    inv = attention_invariance(model, state, tokens)
    assert inv.summary["max_abs_diff_by_layer"]["2"] > 1e-3
    d = layer_drift(model, state, tokens)
    assert d.pattern_js[0] < 1e-6 < d.pattern_js[1]
    assert d.summary["first_layer_with_pattern_drift"] == 1


def test_probe_without_method_is_an_error(model, spec):
    tokens = torch.randint(0, spec.vocab_size, (3, spec.content_len))
    with pytest.raises(UserError, match="base run"):
        attention_invariance(model, None, tokens)
    with pytest.raises(UserError, match="out of range"):
        attention_invariance(model, MethodState(prompt=torch.randn(1, model.cfg.d_model)), tokens, layers=[5])


@SETTINGS
@given(seed=st.integers(0, 10_000), P=st.integers(1, 3), slots=st.sampled_from(["token", "empty"]))
def test_hierarchy_hard_soft_prefix(seed, P, slots):
    spec = TaskSpec(length=4, num_digits=4, prompt_len=3)
    model = micro_model(spec, seed=seed, n_layers=2, slots=slots)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (4, spec.content_len), generator=g)
    hard = torch.randint(0, spec.vocab_size, (P,), generator=g).tolist()
    h = check_hierarchy(model, tokens, hard, torch.randn(P, model.cfg.d_model, generator=g))
    assert h.hard_equals_soft == 0.0
    assert h.soft_equals_prefix <= 1e-5


def test_classify(model):
    W_E = model.embed.W_E
    assert classify(model, MethodState(prompt=W_E[[1, 2]]))["class"].startswith("prompting")
    assert classify(model, MethodState(prompt=W_E[[1, 2]] + 0.1))["class"] == "soft prompting"
    pref = soft_prompt_to_prefix(model, W_E[[1]] + 0.1)
    assert classify(model, pref)["class"] == "prefix-tuning"
    assert "beyond" in classify(model, make_method("full", model).state(), layer0_invariant=False)["class"]


def test_clusters_separate_tasks_under_their_prefixes(spec):
    model = micro_model(spec, n_layers=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (80, spec.content_len), generator=g)
    H, Dh = model.cfg.n_heads, model.cfg.d_head
    # prefixes that take much of the attention and write large, distinct values
    states = {t: MethodState(prefix_k=[torch.randn(H, 1, Dh, generator=g) * 5],
                             prefix_v=[torch.randn(H, 1, Dh, generator=g) * 20]) for t in ("a", "b", "c")}
    res = activation_clusters(model, states, tokens, position=spec.length - 1)
    sep = res.separability
    # points move along rays alpha_i * v (small alpha stays near the base), so not all separate
    assert sep["nearest_centroid_acc_with_method"] > 0.75
    assert sep["nearest_centroid_acc_without_method"] < 0.5
    assert sep["silhouette_with_method"] > sep["silhouette_without_method"]
    assert res.pca.shape == (4, 80, 2) and res.random.shape == (4, 80, 2)


def test_separability_measures_on_synthetic_clusters():
    from probes.clusters import nearest_centroid_accuracy, silhouette
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(50)
    far = torch.randn(150, 4, generator=g) * 0.1 + torch.eye(4)[labels] * 10
    mixed = torch.randn(150, 4, generator=g)
    assert nearest_centroid_accuracy(far, labels) == 1.0 and silhouette(far, labels) > 0.9
    assert nearest_centroid_accuracy(mixed, labels) < 0.6 and abs(silhouette(mixed, labels)) < 0.1


@pytest.mark.parametrize("share", ["simple", "none"])
@pytest.mark.parametrize("slots", ["token", "empty"])
def test_the_forward_uses_the_prefix_the_method_holds(share, slots):
    """The identities above read the prefix back from the model's own hooks, so they hold for any
    keys and values the forward makes up. Here the keys and values attention uses are computed
    by hand from the method's parameters (Simple-share: p^K = W_K·LN(p)+b_K, p^V = W_V·LN(p)+b_V,
    docs/papers.md §1; No-share: its own tensors), slot by slot, in every layer; and layer 0's head
    output is the pattern times [those values; the content's values]."""
    spec = TaskSpec(length=4, num_digits=4, prompt_len=4)
    model = micro_model(spec, seed=4, n_layers=2, n_heads=2, slots=slots)
    P = 3
    m = make_method("prefix", model, length=P, share=share, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, spec.vocab_size - 1, (3, spec.content_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, m.state())
    for l in range(2):
        blk = model.blocks[l]
        if share == "simple":
            x = m.p[l]
            h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + blk.ln1.eps)
            h = h * blk.ln1.w + blk.ln1.b
            k = torch.einsum("pd,hde->phe", h, blk.attn.W_K) + blk.attn.b_K
            v = torch.einsum("pd,hde->phe", h, blk.attn.W_V) + blk.attn.b_V
        else:
            k, v = m.k[l].transpose(0, 1), m.v[l].transpose(0, 1)  # [P, head, d_head]
        for b in range(3):
            assert (cache[f"blocks.{l}.attn.hook_k"][b, :P] - k).abs().max() < 1e-5, (l, b)
            assert (cache[f"blocks.{l}.attn.hook_v"][b, :P] - v).abs().max() < 1e-5, (l, b)
        if l == 0:
            q = cache["blocks.0.attn.hook_q"]
            keys = torch.cat([k.expand(3, -1, -1, -1), cache["blocks.0.attn.hook_k"][:, P:]], 1)
            vals = torch.cat([v.expand(3, -1, -1, -1), cache["blocks.0.attn.hook_v"][:, P:]], 1)
            s = torch.einsum("bqhe,bkhe->bhqk", q, keys) / model.cfg.d_head ** 0.5
            T = q.shape[1]
            s = s.masked_fill(~torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1), float("-inf"))
            pat = s.softmax(-1)
            assert (cache["blocks.0.attn.hook_pattern"] - pat).abs().max() < 1e-5
            z = torch.einsum("bhqk,bkhe->bqhe", pat, vals)
            assert (cache["blocks.0.attn.hook_z"] - z).abs().max() < 1e-4
