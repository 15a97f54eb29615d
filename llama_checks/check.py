"""LLaMA prefix attention checks on real LLaMA-family checkpoints (papers.md §4 "LLaMA check", Fig. 5).

(568 lines, over the ~500 guide: the in-memory and streamed checks share `layer_check`, the hook
capture and the result type; the soft-prompt check lives apart in `soft_check.py`.)

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
shifted angles); `rope_shift_error` measures exactly that: the layer-0 pattern without prefix at
positions P..P+T−1 vs 0..T−1. This is also what PEFT prefix-tuning does at training time.

**Tolerances** (layer 0; max abs error of the rescaling identity on pattern entries, and the bias
residual relative to max |t^pt|): `TOLERANCES`, with `2·rope_shift_error` added to the pattern
tolerance (`within_tolerance`): that much error the position shift alone causes. In fp32 both are ~1e-6 (SmolLM2: 1.2e-6 / 2.5e-7).
In bf16/fp16 the floor is set by the model dtype: q and k are rotated at the shifted positions and
rounded to 8/11 mantissa bits before the score matmul, so content scores differ by ~|score|·2^-8
(2^-11) between the two runs; on SmolLM2 the measured layer-0 errors are 1.0e-2 (bf16) and 1.9e-3
(fp16), equal to `rope_shift_error`, the same error without any prefix. fp16 runs on CPU (PyTorch
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

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llama_checks.models import (
    LoadedModel,
    StreamedCheckpoint,
    load_model,
    release_memory,
    resolve_dtype,
    write_random_llama_checkpoint,  # noqa: F401  (re-exported for the benchmark and the CLI)
)
from llama_checks.prefix import (
    Prefix,
    hard_prompt_prefix,
    load_peft_prefix,
    load_prefix,
    prefix_cache,
    random_normals,
    random_prefix_layer,
    save_prefix,  # noqa: F401  (re-exported)
    train_prefix,
)
from llama_checks.soft_prompt import adapter_kind, load_soft_prompt
from toy_models.errors import UserError

TEST_SAMPLE = "TABLE: Fourth Round Qualifying : NEW_ENTRIES_THIS_ROUND : 24 TEXT: Fourth round qualifying had 24 new entries."
RENORM_MIN_CONTENT_MASS = 1e-3
TOLERANCES = {
    "float32": {"rescale": 1e-5, "bias_rel": 1e-4},
    "bfloat16": {"rescale": 4e-2, "bias_rel": 5e-2},
    "float16": {"rescale": 5e-3, "bias_rel": 8e-3},
}


@dataclass
class LayerCheck:
    """The identities of papers.md §4 at one layer, over the requested heads."""

    layer: int
    exact_expected: bool  # layer 0: the content inputs do not depend on the prefix
    rescale_max_err: float
    rescale_argmax: dict  # {"layer", "head", "query", "key"} (key = content index)
    bias_max_residual: float
    bias_rel_residual: float  # residual / max |t^pt|
    bias_argmax: dict  # {"layer", "head", "query"}
    renorm_max_diff: float
    renorm_mean_js: float  # mean Jensen–Shannon divergence (nats) over heads and queries
    renorm_rows_skipped: int  # (head, query) rows with 1 − α < RENORM_MIN_CONTENT_MASS, left out of the drift
    prefix_mass_mean: float
    prefix_mass_max: float
    prefix_mass_per_head: list[float]
    sink_mass_base: float  # mean A_i0 over queries i >= 1 (content position 0 = BOS)
    sink_mass_prefix: float  # mean A^pt_i0, raw (not renormalized)
    sink_mass_base_per_head: list[float]
    sink_mass_prefix_per_head: list[float]
    passed: bool | None  # within tolerance (exact layers only; None elsewhere), see `within_tolerance`


@dataclass
class LlamaCheckResult:
    model: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    dtype: str
    prefix_source: str
    prefix_len: int
    text: str
    tokens: list[str]
    layers: list[int]
    heads: list[int]
    seed: int
    stream: bool
    positions: str
    rope_shift_error: float
    tolerance: dict
    checks: list[LayerCheck]
    train_losses: list[float] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    method: str = "prefix"  # "prefix" or "soft_prompt"
    # soft prompt only: its per-layer keys/values used as a prefix vs the soft-prompt forward (see
    # `check_soft_loaded`): max abs differences of logits, final residual and keys/values
    hierarchy: dict = field(default_factory=dict)
    # (layer, head) -> {"with_prefix": [T, P+T], "without_prefix": [T, T]} numpy arrays (float16 in
    # stream mode), for Fig. 5
    patterns: dict = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        """True when every exact (layer-0) check is within the dtype's tolerance (and, for a soft
        prompt, its prefix reproduces the soft-prompt forward within the bias tolerance)."""
        ok = all(c.passed for c in self.checks if c.passed is not None)
        return ok and self.hierarchy.get("passed", True)

    def to_json(self) -> dict:
        """A JSON-serializable summary (no patterns)."""
        out = {k: v for k, v in asdict(self).items() if k != "patterns"}
        out["checks"] = [asdict(c) for c in self.checks]
        out["passed"] = self.passed
        out = _finite(out)
        json.dumps(out, allow_nan=False)  # fail here, not in the caller, if something is not serializable
        return out

    def table_rows(self) -> list[list[str]]:
        """Rows for a text table; the first row is the header."""
        rows = [["layer", "prefix mass", "sink base", "sink w/ prefix", "rescale err", "bias resid (rel)",
                 "renorm drift", "JS (nats)", "exact?", "ok"]]
        for c in self.checks:
            rows.append([
                str(c.layer), f"{c.prefix_mass_mean:.4f}", f"{c.sink_mass_base:.4f}", f"{c.sink_mass_prefix:.4f}",
                f"{c.rescale_max_err:.2e}", f"{c.bias_rel_residual:.2e}", f"{c.renorm_max_diff:.2e}",
                f"{c.renorm_mean_js:.2e}", "yes" if c.exact_expected else "no",
                "-" if c.passed is None else ("PASS" if c.passed else "FAIL"),
            ])
        return rows


def run_llama_check(
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
) -> LlamaCheckResult:
    """Check the prefix (or soft-prompt) identities of papers.md §4 on a LLaMA-family model.

    model: ``tiny``, ``tiny-gqa``, ``smollm2`` or a checkpoint directory. prefix: ``random``,
    ``train`` or a prefixlab prefix file (see `llama_checks.prefix`); adapter: a PEFT
    prefix-tuning or prompt-tuning directory (replaces `prefix`; the type is read from its
    adapter_config.json). soft_prompt: ``random`` or a prefixlab soft-prompt file: check a soft
    prompt of `prefix_len` embeddings instead of a prefix (`llama_checks.soft_check`). layers/heads:
    default all. text: default the papers.md test sample; a BOS token is prepended. stream: read a
    checkpoint directory one layer at a time (see module docstring). progress: called with a
    one-line status string.
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
    if soft_prompt not in (None, "random"):
        load_soft_prompt(soft_prompt)  # a missing or corrupt file fails before the model loads
    t0 = time.perf_counter()
    if soft:
        if stream:
            raise UserError("the soft-prompt check needs the whole model in memory; use it without --stream")
        from llama_checks.soft_check import check_soft_loaded

        say(f"loading {model}")
        loaded = load_model(model, torch_dtype, seed=seed)
        return check_soft_loaded(loaded, soft_prompt or "random", adapter, layers, heads, prefix_len, dtype_name, text,
                                 seed, say, t0=t0)
    if stream:
        if model in ("tiny", "tiny-gqa", "smollm2"):
            raise UserError(f"stream mode reads a checkpoint directory; {model!r} is not one (write one with write_random_llama_checkpoint)")
        if prefix == "train" and adapter is None:
            raise UserError("prefix 'train' needs the whole model in memory; use it without --stream")
        say("opening checkpoint for streaming")
        return _run_stream(Path(model), prefix, adapter, layers, heads, prefix_len, torch_dtype, dtype_name, text, seed, say, t0)
    say(f"loading {model}")
    loaded = load_model(model, torch_dtype, seed=seed)
    return check_loaded(loaded, prefix, adapter, layers, heads, prefix_len, dtype_name, text, seed, say, t0=t0)


def _dims(config) -> tuple[int, int, int, int]:
    n_heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, n_heads, kv, d_head


def _select(requested: list[int] | None, n: int, what: str) -> list[int]:
    if requested is None:
        return list(range(n))
    if not requested:
        raise UserError(f"no {what}s requested; give at least one {what} index")
    bad = [i for i in requested if not 0 <= int(i) < n]
    if bad:
        raise UserError(f"{what} {bad[0]} is out of range; the model has {what}s 0..{n - 1}")
    return sorted({int(i) for i in requested})


def _token_ids(tokenizer, bos: int | None, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long)


def _token_strings(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([i]) for i in ids.tolist()]


def _capture(bridge, inp, names: list[str], cache=None, position_ids=None, extra_hooks=(),
             output: dict | None = None) -> dict[str, torch.Tensor]:
    """One bridge forward; returns the named hook activations (batch 0, detached).

    With `output` (a dict), the forward's logits (batch 0) are stored in ``output["logits"]``."""
    store: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(x, hook):
            store[name] = x[0].detach().clone()
            return x
        return hook

    kwargs = {}
    if cache is not None:
        kwargs["past_key_values"] = cache
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.no_grad():
        out = bridge.run_with_hooks(inp, fwd_hooks=[(n, keep(n)) for n in names] + list(extra_hooks), **kwargs)
    if output is not None:
        output["logits"] = (out.logits if hasattr(out, "logits") else out)[0].detach()
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"bridge hooks did not fire: {missing[:3]}")
    return store


def _names(l: int, kv: bool = False, resid: bool = False, z: bool = True) -> list[str]:
    out = [f"blocks.{l}.attn.hook_pattern"] + ([f"blocks.{l}.attn.hook_z"] if z else [])
    if kv:
        out += [f"blocks.{l}.attn.hook_rot_k", f"blocks.{l}.attn.hook_v"]
    if resid:
        out.append(f"blocks.{l}.hook_resid_post")
    return out


def _kv(store: dict, l: int, T: int, kv_heads: int, d_head: int):
    """Content keys (post-rotary) and values as [T, kv, d] from hook_rot_k / hook_v."""
    k = store[f"blocks.{l}.attn.hook_rot_k"]
    v = store[f"blocks.{l}.attn.hook_v"]
    return k.reshape(T, kv_heads, d_head), v.reshape(T, kv_heads, d_head)


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
    n_layers, n_heads, kv_heads, d_head = _dims(config)
    layers = _select(layers, n_layers, "layer")
    heads = _select(heads, n_heads, "head")
    ids = _token_ids(loaded.tokenizer, loaded.bos_token_id, text)
    T = len(ids)
    say("building the TransformerBridge")
    bridge = loaded.bridged()
    t_load = time.perf_counter() - t0
    inp = ids.unsqueeze(0)

    base_names = [n for l in range(n_layers) for n in (f"blocks.{l}.attn.hook_rot_k", f"blocks.{l}.attn.hook_v")]
    base_names += [n for l in layers for n in _names(l)]
    base_names = list(dict.fromkeys(base_names + ["blocks.0.attn.hook_pattern"]))
    say("forward without prefix")
    base = _capture(bridge, inp, base_names)

    losses: list[float] = []
    pre = _build_prefix(prefix, adapter, n_layers, kv_heads, d_head, prefix_len, seed,
                        lambda l: _kv(base, l, T, kv_heads, d_head))
    if prefix == "train" and adapter is None:
        say("training a prefix on llama_checks/data/dart_style.txt")
        start_id = loaded.bos_token_id if loaded.bos_token_id is not None else int(ids[0])
        init = hard_prompt_prefix(loaded.model, torch.full((prefix_len,), start_id, dtype=torch.long))
        pre, losses = train_prefix(loaded.model, loaded.tokenizer, init, loaded.bos_token_id, steps=train_steps,
                                   seed=seed, progress=say)
    pre = pre.to(torch_dtype)
    P = pre.prefix_len

    say("forward with prefix")
    pt = _capture(bridge, inp, [n for l in layers for n in _names(l)], cache=prefix_cache(pre, config), extra_hooks=pt_hooks)
    shifted = _capture(bridge, inp, ["blocks.0.attn.hook_pattern"], position_ids=(torch.arange(T) + P).unsqueeze(0))
    rope_err = float((shifted["blocks.0.attn.hook_pattern"].double() - base["blocks.0.attn.hook_pattern"].double()).abs().max())

    checks, patterns = [], {}
    for l in range(n_layers):
        if l not in layers:
            continue
        check, pats = layer_check(l, heads, P, base[f"blocks.{l}.attn.hook_pattern"], pt[f"blocks.{l}.attn.hook_pattern"],
                                  base[f"blocks.{l}.attn.hook_z"], pt[f"blocks.{l}.attn.hook_z"], pre.values[l],
                                  n_heads // kv_heads, dtype_name, rope_err)
        checks.append(check)
        patterns.update(pats)
    return _result(loaded.name, config, dtype_name, pre, prefix, adapter, text, _token_strings(loaded.tokenizer, ids),
                   layers, heads, seed, False, rope_err, checks, losses, patterns,
                   {"load_s": t_load, "check_s": time.perf_counter() - t0 - t_load, "total_s": time.perf_counter() - t0})


def _build_prefix(prefix: str, adapter: str | None, n_layers: int, kv_heads: int, d_head: int, prefix_len: int,
                  seed: int, content_kv: Callable[[int], tuple], upto: int | None = None) -> Prefix:
    """The prefix from its source. `content_kv(l)` gives layer l's content keys/values (random scale)."""
    if adapter is not None:
        return load_peft_prefix(adapter, n_layers, kv_heads, d_head)
    if prefix in ("random", "train"):
        zk, zv = random_normals(n_layers, kv_heads, prefix_len, d_head, seed)
        keys, values = [], []
        for l in range(n_layers if upto is None else upto):
            k, v = random_prefix_layer(zk[l], zv[l], *content_kv(l))
            keys.append(k)
            values.append(v)
        return Prefix(keys, values, {"source": "random", "seed": seed})
    pre = load_prefix(prefix)
    pre.check_matches(n_layers, kv_heads, d_head, "prefix file")
    return pre


def within_tolerance(rescale_err: float, bias_rel: float, dtype_name: str, rope_shift_error: float = 0.0) -> bool:
    """The layer-0 pass rule: errors within the dtype's tolerance, plus twice the measured floor.

    The floor is `rope_shift_error` (same pattern, no prefix, content shifted by P): with large
    logits the rounding of the rotated q/k alone exceeds a fixed fp32 tolerance, and that part is
    not a failure of the identity.
    """
    tol = TOLERANCES[dtype_name]
    return rescale_err <= tol["rescale"] + 2 * rope_shift_error and bias_rel <= tol["bias_rel"]


def layer_check(layer: int, heads: list[int], P: int, pattern_base: torch.Tensor, pattern_pt: torch.Tensor,
                z_base: torch.Tensor, z_pt: torch.Tensor, prefix_values: torch.Tensor, groups: int,
                dtype_name: str, rope_shift_error: float = 0.0, pattern_dtype=torch.float32) -> tuple[LayerCheck, dict]:
    """The §4 identities at one layer from hook activations (batch dim removed).

    pattern_base [H, T, T], pattern_pt [H, T, P+T], z_* [T, H, d], prefix_values [kv, P, d].
    """
    T = pattern_base.shape[-1]
    if pattern_pt.shape[-1] != P + T:
        raise RuntimeError(f"layer {layer}: pattern has {pattern_pt.shape[-1]} keys, expected P+T={P + T}: the prefix cache did not reach the hooks")
    h = torch.tensor(heads)
    A = pattern_base.double()[h]  # [h, T, T]
    Apt = pattern_pt.double()[h]  # [h, T, P+T]
    alpha = Apt[..., :P].sum(-1)  # [h, T]
    content = Apt[..., P:]
    err = (content - (1 - alpha).unsqueeze(-1) * A).abs()
    flat = int(err.argmax())
    hi, qi, ki = (flat // (T * T)), (flat // T) % T, flat % T
    renorm = content / (1 - alpha).clamp_min(1e-30).unsqueeze(-1)
    # Renormalizing divides rounding error by 1 − α: rows with almost no content mass say nothing.
    usable = (1 - alpha) >= RENORM_MIN_CONTENT_MASS  # [h, T]
    drift = torch.where(usable.unsqueeze(-1), (renorm - A).abs(), torch.zeros_like(A))
    js = _js(renorm, A)[usable]
    vh = prefix_values.double()[h // groups]  # [h, P, d]
    zb, zp = z_base.double()[:, h], z_pt.double()[:, h]  # [T, h, d]
    pred = torch.einsum("htk,hkd->thd", Apt[..., :P], vh) + (1 - alpha).T.unsqueeze(-1) * zb
    resid = (zp - pred).abs().amax(-1)  # [T, h]
    rflat = int(resid.argmax())
    bias_max = float(resid.max())
    bias_rel = bias_max / max(float(zp.abs().max()), 1e-30)
    rescale = float(err.max())
    sink_base = A[:, 1:, 0].mean(-1) if T > 1 else A[:, :, 0].mean(-1)
    sink_pt = content[:, 1:, 0].mean(-1) if T > 1 else content[:, :, 0].mean(-1)
    exact = layer == 0
    check = LayerCheck(
        layer=layer, exact_expected=exact, rescale_max_err=rescale,
        rescale_argmax={"layer": layer, "head": heads[hi], "query": qi, "key": ki},
        bias_max_residual=bias_max, bias_rel_residual=bias_rel,
        bias_argmax={"layer": layer, "head": heads[rflat % len(heads)], "query": rflat // len(heads)},
        renorm_max_diff=float(drift.max()), renorm_mean_js=float(js.mean()) if js.numel() else float("nan"),
        renorm_rows_skipped=int((~usable).sum()),
        prefix_mass_mean=float(alpha.mean()), prefix_mass_max=float(alpha.max()),
        prefix_mass_per_head=[float(x) for x in alpha.mean(-1)],
        sink_mass_base=float(sink_base.mean()), sink_mass_prefix=float(sink_pt.mean()),
        sink_mass_base_per_head=[float(x) for x in sink_base], sink_mass_prefix_per_head=[float(x) for x in sink_pt],
        passed=within_tolerance(rescale, bias_rel, dtype_name, rope_shift_error) if exact else None,
    )
    pats = {(layer, hd): {"with_prefix": Apt[n].to(pattern_dtype).numpy(), "without_prefix": A[n].to(pattern_dtype).numpy()}
            for n, hd in enumerate(heads)}
    return check, pats


def _finite(obj):
    """NaN/inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats) along the last axis; 0·log 0 = 0."""
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = (p + q) / 2

    def kl(a, b):
        return torch.xlogy(a, a).sum(-1) - torch.xlogy(a, b).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def _result(name, config, dtype_name, pre, prefix, adapter, text, tokens, layers, heads, seed, stream, rope_err,
            checks, losses, patterns, timings) -> LlamaCheckResult:
    n_layers, n_heads, kv, d_head = _dims(config)
    source = f"peft:{adapter}" if adapter is not None else prefix
    P = pre.prefix_len
    return LlamaCheckResult(
        model=name, model_type=config.model_type, n_layers=n_layers, n_heads=n_heads, n_kv_heads=kv, d_head=d_head,
        dtype=dtype_name, prefix_source=source, prefix_len=P, text=text, tokens=tokens, layers=layers, heads=heads,
        seed=seed, stream=stream, positions=f"prefix = cache slots 0..{P - 1}; content at positions {P}..{P + len(tokens) - 1} (HF cache convention)",
        rope_shift_error=rope_err, tolerance=dict(TOLERANCES[dtype_name]), checks=checks, train_losses=losses,
        timings=timings, patterns=patterns,
    )


def _run_stream(path: Path, prefix, adapter, layers, heads, prefix_len, torch_dtype, dtype_name, text, seed, say, t0):
    sc = StreamedCheckpoint(path, torch_dtype)
    n_layers, n_heads, kv_heads, d_head = _dims(sc.config)
    layers = _select(layers, n_layers, "layer")
    heads = _select(heads, n_heads, "head")
    ids = _token_ids(sc.tokenizer, sc.bos_token_id, text)
    T = len(ids)
    upto = max(layers) + 1
    fixed = None
    if adapter is not None or prefix not in ("random",):
        fixed = _build_prefix(prefix, adapter, n_layers, kv_heads, d_head, prefix_len, seed, None).to(torch_dtype)
    else:
        zk, zv = random_normals(n_layers, kv_heads, prefix_len, d_head, seed)
    P = fixed.prefix_len if fixed is not None else prefix_len
    t_load = time.perf_counter() - t0
    h_base = sc.embed(ids)
    h_pt = h_base.clone()
    keys, values, checks, patterns = [], [], [], {}
    rope_err = float("nan")
    for l in range(upto):
        say(f"layer {l + 1}/{upto}: reading weights")
        sc.load_layer(l)
        base = _capture(sc.bridge, h_base, _names(0, kv=True, resid=True))
        if l == 0:
            shifted = _capture(sc.bridge, h_base, ["blocks.0.attn.hook_pattern"], position_ids=(torch.arange(T) + P).unsqueeze(0))
            rope_err = float((shifted["blocks.0.attn.hook_pattern"].double() - base["blocks.0.attn.hook_pattern"].double()).abs().max())
        if fixed is None:
            k, v = random_prefix_layer(zk[l], zv[l], *_kv(base, 0, T, kv_heads, d_head))
        else:
            k, v = fixed.keys[l], fixed.values[l]
        keys.append(k)
        values.append(v)
        one = Prefix([k], [v])
        pt = _capture(sc.bridge, h_pt, _names(0, resid=True), cache=prefix_cache(one, sc.model.config))
        if l in layers:
            check, pats = layer_check(l, heads, P, base["blocks.0.attn.hook_pattern"], pt["blocks.0.attn.hook_pattern"],
                                      base["blocks.0.attn.hook_z"], pt["blocks.0.attn.hook_z"], v, n_heads // kv_heads, dtype_name,
                                      rope_err, pattern_dtype=torch.float16)
            checks.append(check)
            patterns.update(pats)
        h_base = base["blocks.0.hook_resid_post"].unsqueeze(0)
        h_pt = pt["blocks.0.hook_resid_post"].unsqueeze(0)
        del base, pt
        release_memory()
    pre = fixed if fixed is not None else Prefix(keys, values, {"source": "random", "seed": seed})
    return _result(str(path), sc.config, dtype_name, pre, prefix, adapter, text, _token_strings(sc.tokenizer, ids), layers,
                   heads, seed, True, rope_err, checks, [], patterns,
                   {"load_s": t_load, "check_s": time.perf_counter() - t0 - t_load, "total_s": time.perf_counter() - t0})


def llama_fig5(result: LlamaCheckResult, layer: int, head: int):
    """papers.md Fig. 5: with-prefix (or soft-prompt) pattern over content queries, renormalized over
    content, and without it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    key = (layer, head)
    if key not in result.patterns:
        raise UserError(f"layer {layer}, head {head} was not checked; run the check with that layer and head")
    pats = result.patterns[key]
    with_p, without = pats["with_prefix"], pats["without_prefix"]
    P = result.prefix_len
    toks = [html.escape(t) for t in result.tokens]
    keys_pt = [f"[{'prompt' if result.method == 'soft_prompt' else 'prefix'} {k}]" for k in range(P)] + toks
    alpha = with_p[:, :P].sum(-1, keepdims=True)
    renorm = with_p[:, P:] / (1 - alpha).clip(min=1e-30)

    def hover(mat, xs):
        return [[f"query {i} {toks[i]!s}<br>key {xs[j]}<br>{mat[i, j]:.5f}" for j in range(mat.shape[1])] for i in range(mat.shape[0])]

    what = "soft prompt" if result.method == "soft_prompt" else "prefix"
    titles = (f"with {what} (P={P})", f"with {what}, renormalized over content", f"without {what}")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.06)
    for col, (mat, xs) in enumerate(((with_p, keys_pt), (renorm, toks), (without, toks)), start=1):
        fig.add_trace(go.Heatmap(z=mat, text=hover(mat, xs), hovertemplate="%{text}<extra></extra>", zmin=0, zmax=1,
                                 colorscale="Blues", showscale=col == 3), row=1, col=col)
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(xs))), ticktext=xs, tickangle=-60, row=1, col=col)
        fig.update_yaxes(tickmode="array", tickvals=list(range(len(toks))), ticktext=toks, autorange="reversed", row=1, col=col)
    check = next((c for c in result.checks if c.layer == layer), None)
    note = f" — rescale err {check.rescale_max_err:.1e}, drift {check.renorm_max_diff:.1e}" if check else ""
    fig.update_layout(title=html.escape(f"{result.model}: layer {layer}, head {head}, {result.dtype}") + note,
                      height=520, width=1500)
    return fig
