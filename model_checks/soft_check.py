"""[P]'s layer-0 identities for a soft prompt on a LLaMA-family model, and the hierarchy check
(a soft prompt's per-layer keys/values, used as a prefix, reproduce its forward). The identities
themselves (`layer_check`) and the result type are shared with the prefix check (`check.py`) through
`identities.py`; the hook capture through `bridge.py`."""

from __future__ import annotations

import time
from typing import Callable

import torch

from model_checks.bridge import (
    capture,
    content_kv,
    hook_names,
    kv_hook_names,
    model_dims,
    rope_shift_error,
    rot_q,
    select_indices,
    token_ids,
    token_strings,
)
from model_checks.family import check_prefix_fits, layer_attention
from model_checks.identities import (
    TEST_SAMPLE,
    TOLERANCES,
    LlamaCheckResult,
    check_result,
    layer_check,
    pattern_recon_error,
)
from model_checks.models import LoadedModel
from model_checks.prefix import prefix_cache
from model_checks.soft_prompt import (
    SoftPrompt,
    content_embeddings,
    load_peft_prompt,
    load_soft_prompt,
    random_soft_prompt,
    soft_prompt_prefix,
)


def _soft_prompt(loaded: LoadedModel, source: str, adapter: str | None, prompt_len: int, seed: int) -> SoftPrompt:
    """The soft prompt from its source: a PEFT prompt-tuning adapter, ``random`` or a file."""
    n_layers, n_heads, _, _ = model_dims(loaded.config)
    d_model = loaded.config.hidden_size
    if adapter is not None:
        return load_peft_prompt(adapter, d_model, n_layers, n_heads)
    if source == "random":
        return random_soft_prompt(loaded.model, prompt_len, seed)
    prompt = load_soft_prompt(source)
    prompt.check_matches(d_model, "soft-prompt file")
    return prompt


def check_soft_loaded(
    loaded: LoadedModel, soft_prompt: str = "random", adapter: str | None = None, layers: list[int] | None = None,
    heads: list[int] | None = None, prompt_len: int = 1, dtype_name: str | None = None, text: str | None = None,
    seed: int = 0, say: Callable[[str], None] = lambda m: None, pt_hooks=(), t0: float | None = None,
) -> LlamaCheckResult:
    """[P]'s identities for a soft prompt on an already-loaded model, and the hierarchy check.

    The soft-prompt forward feeds ``[E_s; W_E[BOS, content]]`` (positions 0..P+T−1); the base
    forward feeds the content alone (positions 0..T−1). Layer 0 sees the same content inputs in
    both, so with ``α_i`` the mass of content query i on the P prompt keys, the content part of the
    pattern is ``(1 − α_i)·A_ij`` and the head output is ``Σ_k A^pt_ik v_k + (1 − α_i)·t_i``, with
    v_k the prompt's layer-0 values. Those are taken from `soft_prompt_prefix` (a separate forward
    of the prompt alone), not from the checked forward. The content's positions shift by P; RoPE
    makes that exact up to rounding, measured apart as `rope_shift_error`.

    Hierarchy: the prompt's per-layer keys/values (`soft_prompt_prefix`) used as a prefix cache
    must reproduce the soft-prompt forward's content logits and final residual stream; the max
    abs differences (and the keys/values difference at the prompt positions) go to `hierarchy`.
    """
    t0 = t0 if t0 is not None else time.perf_counter()
    text = text if text is not None else TEST_SAMPLE
    config = loaded.config
    torch_dtype = next(loaded.model.parameters()).dtype
    dtype_name = dtype_name or str(torch_dtype).removeprefix("torch.")
    n_layers, n_heads, kv_heads, d_head = model_dims(config)
    layers = select_indices(layers, n_layers, "layer")
    heads = select_indices(heads, n_heads, "head")
    prompt = _soft_prompt(loaded, soft_prompt, adapter, prompt_len, seed).to(torch_dtype)
    P = prompt.prompt_len
    ids = token_ids(loaded.tokenizer, loaded.bos_token_id, text)
    T = len(ids)
    say("building the TransformerBridge")
    bridge = loaded.bridged()
    t_load = time.perf_counter() - t0
    inp = ids.unsqueeze(0)

    say("forward without soft prompt")
    base = capture(bridge, inp, list(dict.fromkeys([n for l in layers for n in hook_names(l)] + ["blocks.0.attn.hook_pattern"])))
    rope_err = rope_shift_error(bridge, inp, base["blocks.0.attn.hook_pattern"], P)

    say("forward with soft prompt")
    check_prefix_fits(config, P, "soft prompt")
    embeds = torch.cat([prompt.embeddings, content_embeddings(loaded.model, ids)]).unsqueeze(0)
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    kv_names = kv_hook_names(n_layers)
    soft_out: dict = {}
    soft = capture(bridge, embeds, list(dict.fromkeys([n for l in layers for n in hook_names(l, qk=True)] + kv_names + [last])),
                   extra_hooks=pt_hooks, output=soft_out)

    say("soft prompt as a prefix (its per-layer keys/values)")
    pre = soft_prompt_prefix(loaded.model, prompt)
    pre_out: dict = {}
    as_prefix = capture(bridge, inp, [last], cache=prefix_cache(pre, config), output=pre_out)

    checks, patterns = [], {}
    for l in layers:
        spec = layer_attention(config, l)
        check, pats = layer_check(l, heads, P, base[f"blocks.{l}.attn.hook_pattern"], soft[f"blocks.{l}.attn.hook_pattern"][:, P:, :],
                                  base[f"blocks.{l}.attn.hook_z"], soft[f"blocks.{l}.attn.hook_z"][P:], pre.values[l],
                                  n_heads // kv_heads, dtype_name, rope_err, spec=spec)
        keys = content_kv(soft, l, P + T, kv_heads, d_head)[0]  # the prompt's keys, then the content's
        check.pattern_recon_err = pattern_recon_error(spec, soft[f"blocks.{l}.attn.hook_pattern"][:, P:, :],
                                                      rot_q(soft, l, P + T, n_heads, d_head)[P:], keys[P:],
                                                      keys[:P].permute(1, 0, 2))
        checks.append(check)
        patterns.update(pats)

    logits_soft, logits_pre = soft_out["logits"][P:].double(), pre_out["logits"].double()
    kv_diff = 0.0
    for l in range(n_layers):
        k, v = content_kv(soft, l, P + T, kv_heads, d_head)
        kv_diff = max(kv_diff, float((k[:P].permute(1, 0, 2).double() - pre.keys[l].double()).abs().max()),
                      float((v[:P].permute(1, 0, 2).double() - pre.values[l].double()).abs().max()))
    logits_diff = float((logits_soft - logits_pre).abs().max())
    logits_scale = float(logits_soft.abs().max())
    hierarchy = {
        "what": "soft prompt's per-layer keys/values as a prefix cache vs the soft-prompt forward, content positions",
        "logits_max_abs_diff": logits_diff, "logits_max_abs": logits_scale,
        "logits_rel_diff": logits_diff / max(logits_scale, 1e-30),
        "resid_final_max_abs_diff": float((soft[last][P:].double() - as_prefix[last].double()).abs().max()),
        "resid_final_max_abs": float(soft[last][P:].double().abs().max()),
        "kv_max_abs_diff": kv_diff,
        "argmax_agree": bool(torch.equal(logits_soft.argmax(-1), logits_pre.argmax(-1))),
        "tolerance_rel": TOLERANCES[dtype_name]["bias_rel"],
    }
    hierarchy["passed"] = hierarchy["logits_rel_diff"] <= hierarchy["tolerance_rel"]
    result = check_result(loaded.name, config, dtype_name, pre, "soft", None, text, token_strings(loaded.tokenizer, ids),
                          layers, heads, seed, False, rope_err, checks, [], patterns,
                          {"load_s": t_load, "check_s": time.perf_counter() - t0 - t_load, "total_s": time.perf_counter() - t0})
    source = prompt.meta.get("source")
    result.prefix_source = (f"peft-prompt:{adapter}" if adapter is not None
                            else "soft:random" if source == "random" else f"soft:{soft_prompt}")
    result.method = "soft_prompt"
    result.positions = (f"soft prompt at positions 0..{P - 1}; content (BOS first) at positions {P}..{P + T - 1} "
                        f"(PEFT prompt-tuning convention); without it, content at positions 0..{T - 1}")
    result.hierarchy = hierarchy
    return result
