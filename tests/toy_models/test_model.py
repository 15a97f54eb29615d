import numpy as np
import pytest
import torch

from tests.conftest import micro_model
from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyConfig, preset_config
from toy_models.tasks import TaskSpec, resolve_task, sample_batch


def content(spec, n=5, seed=0):
    return sample_batch(resolve_task("ascending", spec), spec, n, np.random.default_rng(seed)).content


def test_hook_names_and_shapes(model, spec):
    toks = content(spec)
    B, T = toks.shape
    cfg = model.cfg
    P = 2
    state = MethodState(prefix_k=[torch.randn(cfg.n_heads, P, cfg.d_head)] * cfg.n_layers,
                        prefix_v=[torch.randn(cfg.n_heads, P, cfg.d_head)] * cfg.n_layers)
    _, cache = model.run_with_cache(toks, state=state)
    H, D, Dh = cfg.n_heads, cfg.d_model, cfg.d_head
    expected = {
        "hook_embed": (B, T, D), "hook_pos_embed": (B, T, D),
        "blocks.0.hook_resid_pre": (B, T, D), "blocks.0.ln1.hook_normalized": (B, T, D),
        "blocks.0.attn.hook_q": (B, T, H, Dh), "blocks.0.attn.hook_k": (B, P + T, H, Dh),
        "blocks.0.attn.hook_v": (B, P + T, H, Dh), "blocks.0.attn.hook_attn_scores": (B, H, T, P + T),
        "blocks.0.attn.hook_pattern": (B, H, T, P + T), "blocks.0.attn.hook_z": (B, T, H, Dh),
        "blocks.0.hook_attn_out": (B, T, D), "blocks.0.hook_mlp_out": (B, T, D),
        "blocks.0.hook_resid_post": (B, T, D),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    # real pre-softmax scores: softmax of the scores is the pattern; the prefix comes first
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert torch.allclose(scores.softmax(-1), cache["blocks.0.attn.hook_pattern"])
    assert torch.isinf(scores[:, :, 0, P + 1:]).all() and torch.isfinite(scores[:, :, :, :P]).all()
    assert torch.allclose(cache["blocks.0.attn.hook_k"][:, :P], state.prefix_k[0].transpose(0, 1).expand(B, -1, -1, -1))


def test_causal_masking(model, spec):
    toks = content(spec, n=3)
    base = model(toks)
    for t in range(toks.shape[1]):
        changed = toks.clone()
        changed[:, t] = (changed[:, t] + 1) % spec.vocab_size
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_empty_prompt_and_prefix_are_bit_identical_to_none(model, spec):
    toks = content(spec)
    none = model(toks)
    cfg = model.cfg
    empty_prompt = MethodState(prompt=torch.zeros(0, cfg.d_model))
    empty_prefix = MethodState(prefix_k=[torch.zeros(cfg.n_heads, 0, cfg.d_head)] * cfg.n_layers,
                               prefix_v=[torch.zeros(cfg.n_heads, 0, cfg.d_head)] * cfg.n_layers)
    assert torch.equal(model(toks, empty_prompt), none)
    assert torch.equal(model(toks, empty_prefix), none)
    assert torch.equal(model(toks, MethodState()), none)


def test_content_keeps_its_positions(model, spec):
    toks = content(spec, n=2)
    prompt = MethodState(prompt=torch.randn(2, model.cfg.d_model))
    _, c0 = model.run_with_cache(toks)
    _, c1 = model.run_with_cache(toks, state=prompt)
    assert torch.equal(c1["hook_pos_embed"][:, 2:], c0["hook_pos_embed"])
    assert torch.equal(c1["hook_pos_embed"][:, :2], model.pos_embed.W_pos[spec.prompt_len - 2:spec.prompt_len].expand(2, -1, -1))


def test_prompt_that_does_not_fit_is_refused(model, spec):
    with pytest.raises(UserError, match="slots"):
        model(content(spec), MethodState(prompt=torch.randn(spec.prompt_len + 1, model.cfg.d_model)))


def test_weight_overrides_leave_the_base_untouched(model, spec):
    toks = content(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = {"blocks.0.mlp.W_in": model.blocks[0].mlp.W_in + 1.0}
    out = model(toks, MethodState(weights=w))
    assert not torch.allclose(out, model(toks))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("preset", ["micro", "default", "petrov-e1", "petrov-e2", "petrov-e3", "petrov-large"])
def test_presets_build(preset):
    spec = TaskSpec(prompt_len=10)
    cfg = preset_config(preset, d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=spec.prompt_len)
    assert cfg.d_model % cfg.n_heads == 0
    if preset == "petrov-e2":
        assert not cfg.ln_before_attn


def test_attention_only_and_no_ln_options(spec):
    m = micro_model(spec, attn_only=True, ln_before_attn=False)
    _, cache = m.run_with_cache(content(spec))
    assert "blocks.0.hook_mlp_out" not in cache and "blocks.0.ln1.hook_normalized" not in cache


@pytest.mark.parametrize("kw", [dict(n_layers=0), dict(d_model=10, n_heads=3), dict(n_prompt=30, n_ctx=20)])
def test_bad_configs(kw):
    with pytest.raises(UserError):
        ToyConfig(**kw)
