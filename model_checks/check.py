"""LLaMA prefix attention checks on real LLaMA-family checkpoints (docs/papers.md §4 "LLaMA check", Fig. 5).

The identity maths and the result type are in `model_checks.identities`, the hook capture in
`model_checks.bridge`; this module feeds them a prefix, in memory or streamed, and `run_identity_check`
hands a soft prompt to `model_checks.soft_check`.

For one head, query i, content keys j and prefix slots k = 1..P, with A the pattern without prefix
and A^pt the pattern with it ([P] §4):

- prefix mass ``α_i = Σ_k A^pt_ik``;
- rescaling (attention invariance): ``A^pt_ij = (1 − α_i)·A_ij`` on content;
- bias: ``t^pt_i = Σ_k A^pt_ik·v_k + (1 − α_i)·t_i`` for the per-head output t (``hook_z``) and the
  prefix values v_k (GQA: query head h reads key/value head ``h // (heads / kv_heads)``, as
  `repeat_kv` does);
- renormalized-pattern drift ``A^pt_ij / (1 − α_i)`` vs ``A_ij``: exact at layer 0, only
  approximate deeper, because earlier layers' prefix biases change the content's inputs there;
- attention-sink mass: the mass on content position 0 (BOS), reported apart from the prefix mass.

**How the prefix enters.** As a `transformers.DynamicCache` holding P post-rotary keys/values per
layer, passed through `TransformerBridge.forward(past_key_values=...)`, which reaches the bridge's
re-implemented attention (`_update_kv_cache`), so ``hook_pattern`` has P + T keys with the prefix
first (``pattern[..., :P]``) — asserted on every run. (`boot_native` bridges ignore a cache;
this module only uses `boot_transformers(hf_model=...)`.)

**Positions and the causal mask.** With a cache of length P, HF gives the content positions
P..P+T−1 (``cache_position``) and the causal mask lets query i see all P prefix slots and content
keys ≤ i. RoPE scores depend only on position differences, so every content–content score, hence
the pretrained pattern A over content, is the same as at positions 0..T−1; the prefix keys are
cached after rotation and are never rotated again, so only the query's absolute rotation enters
the prefix scores. The layer-0 identities therefore hold up to float rounding (of cos/sin at the
shifted angles); `rope_shift_error` (`model_checks.bridge`) measures exactly that: the layer-0 pattern without prefix at
positions P..P+T−1 vs 0..T−1. This is also what PEFT prefix-tuning does at training time.

**Tolerances** (layer 0; max abs error of the rescaling identity on pattern entries, and the bias
residual relative to max |t^pt|): `identities.TOLERANCES`, with `2·rope_shift_error` added to the pattern
tolerance (`identities.within_tolerance`): that much error the position shift alone causes. In fp32 both are ~1e-6
(SmolLM2: docs/llama.md, "Measured").
In bf16/fp16 the floor is set by the model dtype: q and k are rotated at the shifted positions and
rounded to 8/11 mantissa bits before the score matmul, so content scores differ by ~|score|·2^-8
(2^-11) between the two runs; on SmolLM2 the layer-0 errors in bf16 and fp16 equal
`rope_shift_error`, the same error without any prefix (docs/llama.md, "Measured"). fp16 runs on CPU (PyTorch
2.13 has CPU fp16 matmul) but is slow and can overflow in models with large activations; bf16 is
the better reduced precision on CPU.

**Stream mode** (``stream=True``, checkpoint directories only): embeddings rows of the input
tokens and one decoder layer at a time are read from the safetensors shards into a one-layer
bridged model; the base and with-prefix residual streams are carried from layer to layer. Only
layers up to the deepest requested one are read, so a layer-0 check reads the embeddings and the
first layer only. To bound memory on deep models, stream mode keeps the Fig. 5 patterns in float16
(the identities themselves are always computed in float64 from the hooked tensors).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
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
from model_checks.family import check_prefix_fits, layer_attention, layer_type
from model_checks.identities import TEST_SAMPLE, LlamaCheckResult, check_result, layer_check, pattern_recon_error
from model_checks.models import (
    LoadedModel,
    NAMED_MODELS,
    StreamedCheckpoint,
    load_model,
    release_memory,
    resolve_dtype,
)
from model_checks.prefix import (
    CachePrefix,
    hard_prompt_prefix,
    prefix_cache,
    prefix_from_source,
    random_normals,
    random_prefix_layer,
    train_prefix,
)
from model_checks.soft_check import check_soft_loaded
from model_checks.soft_prompt import adapter_base_warning, adapter_kind, load_soft_prompt
from prefixlab_common.errors import UserError


def run_identity_check(
    model: str,
    prefix: str = "random",
    adapter: str | None = None,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    prefix_len: int = 1,
    dtype: str = "float32",
    text: str | None = None,
    seed: int = 0,
    stream: bool = False,
    progress: Callable[[str], None] | None = None,
    soft_prompt: str | None = None,
    on_loaded: Callable[[LoadedModel], None] | None = None,
) -> LlamaCheckResult:
    """Check the prefix (or soft-prompt) identities of docs/papers.md §4 on a LLaMA-family model.

    model: ``tiny``, ``tiny-gqa``, ``tiny-gemma3``, ``smollm2``, ``gemma3`` or a checkpoint directory. prefix: ``random``,
    ``train`` or a prefixlab prefix file (see `model_checks.prefix`); adapter: a PEFT
    prefix-tuning or prompt-tuning directory (replaces `prefix`; the type is read from its
    adapter_config.json). soft_prompt: ``random`` or a prefixlab soft-prompt file: check a soft
    prompt of `prefix_len` embeddings instead of a prefix (`model_checks.soft_check`). layers/heads:
    default all. text: default the docs/papers.md §4 test sample; a BOS token is prepended. stream: read a
    checkpoint directory one layer at a time (see module docstring). progress: called with a
    one-line status string. on_loaded: called with the loaded model (not in stream mode), so that a
    caller that needs the same model again (the CLI's --dilution) does not load it twice.
    """
    say = progress or (lambda msg: None)
    torch_dtype = resolve_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if prefix_len < 1:
        raise UserError(f"prefix_len must be >= 1, got {prefix_len}")
    if adapter is not None and prefix != "random":
        raise UserError("give either --prefix or --adapter, not both")
    if soft_prompt is not None and adapter is not None:
        raise UserError("give either --soft-prompt or --adapter, not both")
    if soft_prompt is not None and prefix != "random":
        raise UserError("give either --prefix or --soft-prompt, not both")
    text = text if text is not None else TEST_SAMPLE
    if not text.strip():
        raise UserError("text is empty; give some text to check on")
    soft = soft_prompt is not None or (adapter is not None and adapter_kind(adapter) == "soft_prompt")
    warning = adapter_base_warning(adapter, model) if adapter is not None else None  # printed once the check ran
    if soft_prompt not in (None, "random"):
        load_soft_prompt(soft_prompt)  # a missing or corrupt file fails before the model loads
    t0 = time.perf_counter()
    if soft:
        if stream:
            raise UserError("the soft-prompt check needs the whole model in memory; use it without --stream")
        say(f"loading {model}")
        loaded = load_model(model, torch_dtype, seed=seed, progress=say)
        if on_loaded is not None:
            on_loaded(loaded)
        return _warned(check_soft_loaded(loaded, soft_prompt or "random", adapter, layers, heads, prefix_len, dtype_name,
                                         text, seed, say, t0=t0), warning)
    if stream:
        if model in NAMED_MODELS:
            raise UserError(f"stream mode reads a checkpoint directory; {model!r} is not one (write one with write_random_llama_checkpoint)")
        if prefix == "train" and adapter is None:
            raise UserError("prefix 'train' needs the whole model in memory; use it without --stream")
        say("opening checkpoint for streaming")
        return _warned(_run_stream(Path(model), prefix, adapter, layers, heads, prefix_len, torch_dtype, dtype_name, text,
                                   seed, say, t0), warning)
    say(f"loading {model}")
    loaded = load_model(model, torch_dtype, seed=seed, progress=say)
    if on_loaded is not None:
        on_loaded(loaded)
    return _warned(check_loaded(loaded, prefix, adapter, layers, heads, prefix_len, dtype_name, text, seed, say, t0=t0),
                   warning)


def _warned(result, warning: str | None):
    """`result`, after printing `warning` (an adapter made for another model) on stderr: a check
    that fails on a user mistake prints only its one error line."""
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    return result


def check_loaded(
    loaded: LoadedModel, prefix: str = "random", adapter: str | None = None, layers: list[int] | None = None,
    heads: list[int] | None = None, prefix_len: int = 1, dtype_name: str | None = None, text: str | None = None,
    seed: int = 0, say: Callable[[str], None] = lambda m: None, pt_hooks=(), t0: float | None = None,
    train_steps: int = 30,
) -> LlamaCheckResult:
    """The checks on an already-loaded model (tests use `pt_hooks` to perturb the prefixed run)."""
    t0 = t0 if t0 is not None else time.perf_counter()
    text = text if text is not None else TEST_SAMPLE
    config = loaded.config
    torch_dtype = next(loaded.model.parameters()).dtype
    dtype_name = dtype_name or str(torch_dtype).removeprefix("torch.")
    n_layers, n_heads, kv_heads, d_head = model_dims(config)
    layers = select_indices(layers, n_layers, "layer")
    heads = select_indices(heads, n_heads, "head")
    ids = token_ids(loaded.tokenizer, loaded.bos_token_id, text)
    T = len(ids)
    say("building the TransformerBridge")
    bridge = loaded.bridged()
    t_load = time.perf_counter() - t0
    inp = ids.unsqueeze(0)

    base_names = kv_hook_names(n_layers) + [n for l in layers for n in hook_names(l)]
    base_names = list(dict.fromkeys(base_names + ["blocks.0.attn.hook_pattern"]))
    say("forward without prefix")
    base = capture(bridge, inp, base_names)

    losses: list[float] = []
    pre = prefix_from_source(prefix, adapter, n_layers, kv_heads, d_head, prefix_len, seed,
                             lambda l: content_kv(base, l, T, kv_heads, d_head))
    if prefix == "train" and adapter is None:
        say("training a prefix on model_checks/data/dart_style.txt")
        start_id = loaded.bos_token_id if loaded.bos_token_id is not None else int(ids[0])
        init = hard_prompt_prefix(loaded.model, torch.full((prefix_len,), start_id, dtype=torch.long))
        pre, losses = train_prefix(loaded.model, loaded.tokenizer, init, loaded.bos_token_id, steps=train_steps,
                                   seed=seed, progress=say)
    pre = pre.to(torch_dtype)
    P = pre.prefix_len
    check_prefix_fits(config, P)

    say("forward with prefix")
    pt = capture(bridge, inp, list(dict.fromkeys(n for l in layers for n in hook_names(l, qk=True))),
                 cache=prefix_cache(pre, config), extra_hooks=pt_hooks)
    rope_err = rope_shift_error(bridge, inp, base["blocks.0.attn.hook_pattern"], P)

    checks, patterns = [], {}
    for l in range(n_layers):
        if l not in layers:
            continue
        spec = layer_attention(config, l)
        check, pats = layer_check(l, heads, P, base[f"blocks.{l}.attn.hook_pattern"], pt[f"blocks.{l}.attn.hook_pattern"],
                                  base[f"blocks.{l}.attn.hook_z"], pt[f"blocks.{l}.attn.hook_z"], pre.values[l],
                                  n_heads // kv_heads, dtype_name, rope_err, spec=spec)
        check.pattern_recon_err = pattern_recon_error(spec, pt[f"blocks.{l}.attn.hook_pattern"], rot_q(pt, l, T, n_heads, d_head),
                                                      pt[f"blocks.{l}.attn.hook_rot_k"].reshape(T, kv_heads, d_head), pre.keys[l])
        checks.append(check)
        patterns.update(pats)
    return check_result(loaded.name, config, dtype_name, pre, prefix, adapter, text, token_strings(loaded.tokenizer, ids),
                        layers, heads, seed, False, rope_err, checks, losses, patterns,
                        {"load_s": t_load, "check_s": time.perf_counter() - t0 - t_load, "total_s": time.perf_counter() - t0})


def _run_stream(path: Path, prefix, adapter, layers, heads, prefix_len, torch_dtype, dtype_name, text, seed, say, t0):
    sc = StreamedCheckpoint(path, torch_dtype)
    n_layers, n_heads, kv_heads, d_head = model_dims(sc.config)
    if len({layer_type(sc.config, l) for l in range(n_layers)}) > 1:
        raise UserError(f"{path} mixes sliding-window and global layers ({sc.config.model_type}); stream mode runs every layer "
                        "in one one-layer model of a single type: check it without --stream")
    layers = select_indices(layers, n_layers, "layer")
    heads = select_indices(heads, n_heads, "head")
    ids = token_ids(sc.tokenizer, sc.bos_token_id, text)
    T = len(ids)
    upto = max(layers) + 1
    fixed = None
    if adapter is not None or prefix not in ("random",):
        fixed = prefix_from_source(prefix, adapter, n_layers, kv_heads, d_head, prefix_len, seed, None).to(torch_dtype)
    else:
        zk, zv = random_normals(n_layers, kv_heads, prefix_len, d_head, seed)
    P = fixed.prefix_len if fixed is not None else prefix_len
    check_prefix_fits(sc.config, P)
    t_load = time.perf_counter() - t0
    h_base = sc.embed(ids)
    h_pt = h_base.clone()
    keys, values, checks, patterns = [], [], [], {}
    rope_err = float("nan")
    for l in range(upto):
        say(f"layer {l + 1}/{upto}: reading weights")
        sc.load_layer(l)
        base = capture(sc.bridge, h_base, hook_names(0, kv=True, resid=True))
        if l == 0:
            rope_err = rope_shift_error(sc.bridge, h_base, base["blocks.0.attn.hook_pattern"], P)
        if fixed is None:
            k, v = random_prefix_layer(zk[l], zv[l], *content_kv(base, 0, T, kv_heads, d_head))
        else:
            k, v = fixed.keys[l], fixed.values[l]
        keys.append(k)
        values.append(v)
        one = CachePrefix([k], [v])
        pt = capture(sc.bridge, h_pt, hook_names(0, resid=True), cache=prefix_cache(one, sc.model.config))
        if l in layers:
            check, pats = layer_check(l, heads, P, base["blocks.0.attn.hook_pattern"], pt["blocks.0.attn.hook_pattern"],
                                      base["blocks.0.attn.hook_z"], pt["blocks.0.attn.hook_z"], v, n_heads // kv_heads, dtype_name,
                                      rope_err, pattern_dtype=torch.float16, spec=layer_attention(sc.config, l))
            checks.append(check)
            patterns.update(pats)
        h_base = base["blocks.0.hook_resid_post"].unsqueeze(0)
        h_pt = pt["blocks.0.hook_resid_post"].unsqueeze(0)
        del base, pt
        release_memory()
    pre = fixed if fixed is not None else CachePrefix(keys, values, {"source": "random", "seed": seed})
    return check_result(str(path), sc.config, dtype_name, pre, prefix, adapter, text, token_strings(sc.tokenizer, ids),
                        layers, heads, seed, True, rope_err, checks, [], patterns,
                        {"load_s": t_load, "check_s": time.perf_counter() - t0 - t_load, "total_s": time.perf_counter() - t0})
