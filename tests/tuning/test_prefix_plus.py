"""Prefix-Tuning+ (tuning/prefix_plus.py, docs/papers.md §7) on the toy model: the identities as
properties over random models, inputs and memories (patterns are the base model's given the same
layer input; each head's output moves by exactly φ(q)ᵀM), a mutant that puts M inside the softmax
caught, every forward path agreeing, the refusals, fused runs trained alone, and the CLI round trip."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from cli import app
from model_checks.prefix_plus import query_bias_spread
from prefixlab_common.errors import UserError
from tests.conftest import micro_model
from toy_models.tasks import TaskSpec, resolve_task, sample_batch
from toy_models.batched import runs_logits
from tuning import make_method
from tuning.fused import plan_groups
from tuning.pipeline import load_run

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def phi(x, feature):
    """φ written out: elu(x) + 1 is x + 1 for x > 0 and exp(x) otherwise; relu is max(x, 0)."""
    return torch.where(x > 0, x + 1, torch.exp(x)) if feature == "elu" else x.clamp(min=0)


def hand_term(q, method, layer):
    """φ(q)ᵀM of `layer` from the method's own tensors: q [batch, pos, head, d_head]."""
    if layer not in method.layer_ids:
        return torch.zeros_like(q)
    i = method.layer_ids.index(layer)
    x = q if not hasattr(method, "proj") else torch.einsum("bqhe,her->bqhr", q, method.proj[i])
    return torch.einsum("bqhr,hre->bqhe", phi(x, method.opts["feature"]), method.M[i])


def captured(model, tokens, state=None, extra_hooks=()):
    """Each layer's attention input, q, pattern and z of the hooked forward."""
    names = [f"blocks.{l}.{n}" for l in range(model.cfg.n_layers)
             for n in ("attn.hook_q", "attn.hook_pattern", "attn.hook_z", "hook_resid_pre")]
    cache = {}
    hooks = [(n, lambda t, hook: cache.__setitem__(hook.name, t.detach())) for n in names]
    with torch.no_grad():
        model.run_with_hooks(tokens, state=state, fwd_hooks=hooks + list(extra_hooks))
    return cache


def attention_alone(model, layer, resid):
    """The base model's attention of `layer` on the residual input `resid`: (pattern, z)."""
    block = model.blocks[layer]
    cache = captured_attention(block, resid)
    return cache["pattern"], cache["z"]


def captured_attention(block, resid):
    out = {}
    hs = [block.attn.hook_pattern.register_forward_hook(lambda m, i, o: out.__setitem__("pattern", o)),
          block.attn.hook_z.register_forward_hook(lambda m, i, o: out.__setitem__("z", o))]
    try:
        with torch.no_grad():
            block.attn(block.ln1(resid), None, None, fast=False)
    finally:
        for h in hs:
            h.remove()
    return out


def identity_gaps(model, method, tokens, extra_hooks=()) -> tuple[float, float, float]:
    """(max |pattern - base pattern on the same layer input|, max |z - base z - φ(q)ᵀM| / max(1, max |z|), max
    |layer-0 pattern - the base model's own|) over every layer, head and position."""
    plus = captured(model, tokens, method.state(), extra_hooks)
    base = captured(model, tokens)
    pat, term = 0.0, 0.0
    for l in range(model.cfg.n_layers):
        p, z = attention_alone(model, l, plus[f"blocks.{l}.hook_resid_pre"])
        pat = max(pat, (plus[f"blocks.{l}.attn.hook_pattern"] - p).abs().max().item())
        want = hand_term(plus[f"blocks.{l}.attn.hook_q"], method, l)
        z_plus = plus[f"blocks.{l}.attn.hook_z"]  # relative to the head output's size (fp32 rounding)
        term = max(term, (z_plus - z - want).abs().max().item() / max(1.0, z_plus.abs().max().item()))
    layer0 = (plus["blocks.0.attn.hook_pattern"] - base["blocks.0.attn.hook_pattern"]).abs().max().item()
    return pat, term, layer0


def random_plus(seed, n_layers, n_heads, width, feature, scale, slots, ln=True):
    spec = TaskSpec(length=4, num_digits=4, prompt_len=3)
    model = micro_model(spec, seed=seed, n_layers=n_layers, n_heads=n_heads, slots=slots, ln_before_attn=ln)
    g = torch.Generator().manual_seed(seed + 1)
    m = make_method("prefix_plus", model, generator=g, feature=feature, width=width, init="normal", init_scale=scale)
    tokens = torch.randint(0, spec.vocab_size - 1, (4, spec.content_len), generator=g)
    return model, m, tokens


@SETTINGS
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 3), n_heads=st.sampled_from([1, 2, 4]),
       width=st.sampled_from([None, 1, 3, 8]), feature=st.sampled_from(["elu", "relu"]),
       scale=st.floats(0.05, 3.0), slots=st.sampled_from(["token", "empty"]), ln=st.booleans())
def test_patterns_are_the_base_s_and_heads_move_by_exactly_phi_q_m(seed, n_layers, n_heads, width, feature,
                                                                    scale, slots, ln):
    model, m, tokens = random_plus(seed, n_layers, n_heads, width, feature, scale, slots, ln)
    pat, term, layer0 = identity_gaps(model, m, tokens)
    assert pat <= 1e-6 and layer0 <= 1e-6
    assert term <= 1e-5
    # and the memory did change the heads' outputs (the identity is not the base's)
    z_plus = captured(model, tokens, m.state())["blocks.0.attn.hook_z"]
    assert (z_plus - captured(model, tokens)["blocks.0.attn.hook_z"]).abs().max() > 1e-3


def test_a_memory_inside_the_softmax_is_caught():
    """The mutant: the same M, but as a score bias φ(q_i)ᵀM k_j inside the softmax."""
    model, m, tokens = random_plus(3, 2, 2, None, "elu", 1.0, "token")
    q = {}

    def keep_q(t, hook):
        q[hook.name.split(".")[1]] = t

    def inside(t, hook):
        l = int(hook.name.split(".")[1])
        k = q.get(("k", l))
        return t + torch.einsum("bqhe,bkhe->bhqk", hand_term(q[str(l)], m, l), k) if k is not None else t

    def keep_k(t, hook):
        q[("k", int(hook.name.split(".")[1]))] = t

    hooks = [(f"blocks.{l}.attn.hook_{n}", f) for l in range(2)
             for n, f in (("q", keep_q), ("k", keep_k), ("attn_scores", inside))]
    assert identity_gaps(model, m, tokens)[0] <= 1e-6
    pat, _, layer0 = identity_gaps(model, m, tokens, hooks)
    assert pat > 1e-3 and layer0 > 1e-3


@pytest.mark.parametrize("opts", [{}, {"width": 3, "layers": "1"}, {"feature": "relu", "layers": "shallow"}])
def test_every_forward_path_gives_the_same_logits(opts):
    """Fast (SDPA), shared head (content_logits), hooked and a LoRA-style weight override path."""
    model, _, tokens = random_plus(0, 2, 2, None, "elu", 1.0, "token")
    m = make_method("prefix_plus", model, generator=torch.Generator().manual_seed(1), init="normal", init_scale=1.0, **opts)
    st_ = m.state()
    with torch.no_grad():
        fast = model(tokens, st_)
        tail = model.content_logits(tokens, st_)
        hooked, _ = model.run_with_cache(tokens, st_)
        st_.weights = {**st_.weights, "blocks.0.attn.b_O": model.blocks[0].attn.b_O + 0.0}  # functional_call path
        over = model(tokens, st_)
        base = model(tokens)
    assert (fast - hooked).abs().max() < 1e-5 and (over - hooked).abs().max() < 1e-5
    assert (tail - hooked[:, -tokens.shape[1]:]).abs().max() < 1e-5
    assert (fast - base).abs().max() > 1e-3


def test_zero_init_is_an_exact_no_op_and_counts_follow_the_formula():
    spec = TaskSpec(length=4, num_digits=4, prompt_len=3)
    model = micro_model(spec, n_layers=3, n_heads=2)
    toks = torch.randint(0, spec.vocab_size - 1, (3, spec.content_len), generator=torch.Generator().manual_seed(0))
    m = make_method("prefix_plus", model)
    with torch.no_grad():
        assert torch.equal(model(toks, m.state()), model(toks))
    H, Dh = model.cfg.n_heads, model.cfg.d_head
    assert m.n_params == 3 * H * Dh * Dh
    assert make_method("prefix_plus", model, width=5, layers="0,2").n_params == 2 * H * 2 * 5 * Dh
    assert make_method("prefix_plus", model, layers="shallow").opts["layers"] == "0"
    assert make_method("prefix_plus", model, layers="2,0,1").opts["layers"] == "all"


@pytest.mark.parametrize("opts,match", [
    ({"feature": "exp"}, r"^unknown prefix_plus feature 'exp'; use one of elu, relu$"),
    ({"width": 0}, r"^prefix_plus width r must be positive, got 0$"),
    ({"layers": "3"}, r"^prefix_plus layers '3' are not in 0\.\.2$"),
    ({"layers": "x"}, r"^prefix_plus layers must be all, shallow or a comma list"),
    ({"init": "slot"}, r"^unknown prefix_plus init 'slot'; use one of zero, normal$"),
])
def test_bad_options_are_one_line_errors(opts, match):
    model = micro_model(SPEC, n_layers=3)
    with pytest.raises(UserError, match=match):
        make_method("prefix_plus", model, **opts)


def test_fold_is_refused_with_its_reason():
    m = make_method("prefix_plus", micro_model(SPEC))
    with pytest.raises(UserError, match="outside the softmax"):
        m.fold()


def test_bias_direction_varies_with_the_query_where_a_one_slot_prefix_s_does_not():
    model, m, tokens = random_plus(5, 1, 2, None, "elu", 1.0, "empty")
    plus = query_bias_spread(model, m.state(), tokens)
    prefix = make_method("prefix", model, length=1, share="none", generator=torch.Generator().manual_seed(0))
    one = query_bias_spread(model, prefix.state(), tokens)
    assert np.allclose(one["mean_cosine"], 1.0, atol=1e-4)
    assert plus["mean_cosine"].max() < 0.999  # every head's direction moves with the query
    assert plus["mean_cosine"].shape == one["mean_cosine"].shape == (1, 2)


def test_fused_runs_fuse_through_the_reserved_weight_names(micro_add1_base, tmp_path):
    """K runs stack their memories as LoRA's weights (vmap), so they fuse; the fused logits are
    each run's own (tests/tuning/test_fused.py checks the metrics against runs alone)."""
    jobs = [dict(method="prefix_plus", task="add2", out=tmp_path / f"pp{s}", opts={"width": 2},
                 train={"steps": 2}, seed=s) for s in (0, 1)]
    assert plan_groups(micro_add1_base, jobs) == [[0, 1]]
    model = micro_model(SPEC, n_layers=2)
    ms = [make_method("prefix_plus", model, width=2, feature="relu", init="normal", init_scale=1.0,
                      generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    toks = torch.randint(0, SPEC.vocab_size - 1, (2, 3, SPEC.content_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = runs_logits(model, toks, [m.state() for m in ms])
        for k, m in enumerate(ms):
            assert (both[k] - model(toks[k], m.state())).abs().max() < 1e-5


def test_cli_finetune_trains_saves_and_reloads_to_the_same_logits(micro_add1_base, tmp_path):
    out = tmp_path / "pp"
    r = CliRunner().invoke(app, [str(a) for a in [
        "finetune", micro_add1_base, "--method", "prefix_plus", "--width", "2", "--feature", "relu",
        "--init", "normal", "--task", "add2", "--out", out, "--steps", "30", "--batch-size", "16",
        "--eval-every", "10", "--json"]])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    run = load_run(out)
    assert run.config["method"] == {"name": "prefix_plus", "feature": "relu", "width": 2, "layers": "all",
                                    "init": "normal", "init_scale": 0.02}
    assert metrics["n_params"] == run.method.n_params == 2 * run.model.cfg.n_heads * 2 * run.model.cfg.d_head
    test = sample_batch(resolve_task("add2", run.spec), run.spec, 64, np.random.default_rng(1))
    with torch.no_grad():
        again = load_run(out)
        assert torch.equal(run.model(test.content, run.state), again.model(test.content, again.state))
        fresh = make_method("prefix_plus", run.model, width=2, feature="relu", init="normal",
                            generator=torch.Generator().manual_seed(0))
        assert (run.model(test.content, run.state) - run.model(test.content, fresh.state())).abs().max() > 1e-4
    saved = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved[-1]["step"] == 30
