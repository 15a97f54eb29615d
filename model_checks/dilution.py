"""Prefix dilution: how the attention mass on a prefix falls as the input grows.

For a prefix of P slots, query i of an input of length L puts mass ``α_i = Σ_k A^pt_ik`` on the
prefix. [P]'s bias identity (docs/papers.md §4) says the prefix's whole effect on a head output is

    t^pt_i = α_i · v̄_i + (1 − α_i) · t_i,     v̄_i = Σ_k A^pt_ik v_k / α_i,

so the shift the prefix adds to a head is scaled by α_i. If a prefix key matches no content key,
its score stays O(1) while the content's softmax denominator grows with the number of keys, so
α_i falls roughly like 1/i: a fixed prefix is *diluted* by long inputs unless its keys win a sink
position's share. Attention sinks (most heads park mass on the first token, BOS) change this: a head
whose content mass sits on the sink has a denominator that barely grows, and α need not fall.

What is measured, per length L (inputs are nested prefixes of one long text, BOS first), layer and
head:

- ``alpha``: the mean of α_i over the queries in the last eighth of the input (``i ≥ L − ⌈L/8⌉``):
  the prefix mass "at distance ≈ L" from the start. With causal attention α_i does not depend on
  tokens after i, so this is the mass a query near position L puts on the prefix.
- ``alpha_all``: the mean of α_i over every query (for comparison; it mixes distances).
- ``sink_base`` / ``sink_prefix``: mass on content position 0 (the sink: BOS, or the first token if
  the model has no BOS) over the same queries, without and with the prefix (raw, not
  renormalized). At layer 0 the invariance identity makes ``sink_prefix = (1 − α)·sink_base``
  per query exactly.
- per layer, the decay exponent: the least-squares slope of ``log α`` against ``log L`` over the
  lengths, for the head-aggregated curve (``--heads``: mean, max, all = one curve per head with the
  mean as the layer's curve, or a list of head indices averaged) and for each head.

- ``prefix_visible``: the share of those queries that see the prefix at all. On a sliding-window
  layer (Gemma 3: five of every six; `model_checks.family`) a query at content position i sees the
  prefix only while i < window − 1 (the prefix holds the cache's first positions): past the window
  its mass is exactly 0, and the decay fit drops those zeros (a log cannot take them).
- with ``identities=True``, per length and layer, the §4 identity residuals (rescale error, bias
  residual relative to max |t^pt|) with *every* layer's input patched to the base forward's
  (``hook_resid_pre``): then each layer sees the same content inputs with and without the prefix,
  as layer 0 does anyway, and its identities are exact up to rounding on every layer, sliding or
  global, at every length.

Each length is its own pair of forwards (without and with the prefix cache; two more for the
identities); only the per-head reductions are kept, so memory does not grow with the number of layers.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from model_checks.bridge import capture, content_kv, kv_hook_names, model_dims
from model_checks.family import check_prefix_fits, layer_attention
from model_checks.identities import layer_check
from prefixlab_common.jsonsafe import finite_json
from model_checks.models import LoadedModel, load_model, resolve_dtype
from model_checks.prefix import (
    CachePrefix,
    dart_lines,
    hard_prompt_prefix,
    load_peft_prefix,
    prefix_cache,
    prefix_from_source,
    train_prefix,
)
from model_checks.soft_prompt import adapter_kind, load_peft_prompt, soft_prompt_prefix, warn_if_other_base
from prefixlab_common.errors import UserError

DEFAULT_LENGTHS = (16, 32, 64, 128, 256, 512, 1024)
WINDOW_FRACTION = 8  # alpha(L): queries in the last ceil(L/8) positions
MAX_LENGTH = 32768


@dataclass
class LayerDilution:
    layer: int
    alpha: list[float]  # head-aggregated, per length
    alpha_per_head: list[list[float]]  # [head][length]
    alpha_all: list[float]  # mean over every query, head-aggregated
    sink_base: list[float]
    sink_prefix: list[float]
    sink_base_per_head: list[list[float]]
    sink_prefix_per_head: list[list[float]]
    fit: dict  # {"slope", "intercept", "r2", "exponent"} of log alpha vs log L
    fit_per_head: list[dict]
    layer_type: str = "full_attention"  # or "sliding_attention" (`model_checks.family`)
    window: int | None = None
    prefix_visible: list[float] = field(default_factory=list)  # per length: share of the measured queries with α_i > 0
    rescale_err: list[float] | None = None  # per length, with identities=True: max |A^pt − (1 − α)A|, inputs patched
    bias_rel: list[float] | None = None  # per length: bias residual / max |t^pt|, inputs patched


@dataclass
class DilutionResult:
    model: str
    model_type: str
    dtype: str
    n_layers: int
    n_heads: int
    prefix_source: str
    prefix_len: int
    lengths: list[int]
    heads: str  # the aggregation: "mean", "max", "all" or "h1,h2,..."
    head_indices: list[int]  # heads the aggregate is taken over
    sink: str
    window: str
    text: str
    seed: int
    context_limit: int | None
    layers: list[LayerDilution]
    timings: dict = field(default_factory=dict)
    identities: str | None = None  # what the per-length identity residuals are, when measured

    def to_json(self) -> dict:
        out = asdict(self)
        out["bias_identity"] = ("t^pt_i = alpha_i * vbar_prefix + (1 - alpha_i) * t_i: the prefix's shift of a head "
                                "output is scaled by alpha_i, so alpha's decay exponent is the decay of the prefix's "
                                "effect on that head with input length")
        out["decay_exponents"] = {str(l.layer): l.fit["exponent"] for l in self.layers}
        out = finite_json(out)
        json.dumps(out, allow_nan=False)
        return out

    def table_rows(self) -> list[list[str]]:
        rows = [["layer", "attention", f"alpha @ L={self.lengths[0]}", f"alpha @ L={self.lengths[-1]}",
                 f"prefix seen @ L={self.lengths[-1]}", "decay exponent", "R²",
                 f"sink base @ {self.lengths[-1]}", f"sink w/ prefix @ {self.lengths[-1]}"]]
        if self.identities:
            rows[0] += ["max rescale err", "max bias resid (rel)"]
        for l in self.layers:
            rows.append([str(l.layer), "full" if l.window is None else f"sliding {l.window}", f"{l.alpha[0]:.3g}",
                         f"{l.alpha[-1]:.3g}", f"{l.prefix_visible[-1]:.0%}" if l.prefix_visible else "n/a",
                         _fmt(l.fit["exponent"]), _fmt(l.fit["r2"]), f"{l.sink_base[-1]:.3f}", f"{l.sink_prefix[-1]:.3f}"])
            if self.identities:
                rows[-1] += [f"{max(l.rescale_err):.2e}", f"{max(l.bias_rel):.2e}"]
        return rows


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def parse_lengths(text: str | None) -> list[int] | None:
    """'16,64,256' -> [16, 64, 256]; UserError on anything else."""
    if text is None or text.strip() == "":
        return None
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, got {text!r}") from None
    return values


def check_lengths(lengths: list[int] | None, context_limit: int | None, prefix_len: int) -> list[int]:
    """Sorted distinct lengths, each >= 2 and fitting the context with the prefix."""
    if lengths is None:
        lengths = [L for L in DEFAULT_LENGTHS if context_limit is None or L + prefix_len <= context_limit]
    if len(lengths) < 2 or len(set(lengths)) < 2:
        raise UserError(f"give at least two different lengths to fit a decay, got {lengths}")
    bad = [L for L in lengths if L < 2 or L > MAX_LENGTH]
    if bad:
        raise UserError(f"length {bad[0]} is out of range; lengths must be 2..{MAX_LENGTH} tokens (BOS included)")
    if context_limit is not None:
        over = [L for L in lengths if L + prefix_len > context_limit]
        if over:
            raise UserError(f"length {over[0]} plus the {prefix_len}-slot prefix exceeds the model's context limit of "
                            f"{context_limit} positions; use lengths <= {context_limit - prefix_len}")
    return sorted(set(lengths))


def parse_heads(spec: str, n_heads: int) -> tuple[str, list[int]]:
    """'mean' | 'max' | 'all' | '0,2,5' -> (aggregation name, head indices)."""
    spec = (spec or "mean").strip()
    if spec in ("mean", "max", "all"):
        return spec, list(range(n_heads))
    try:
        idx = sorted({int(t) for t in spec.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"--heads must be mean, max, all or comma-separated head indices, got {spec!r}") from None
    if not idx:
        raise UserError("--heads names no head; give mean, max, all or head indices")
    bad = [h for h in idx if not 0 <= h < n_heads]
    if bad:
        raise UserError(f"head {bad[0]} is out of range; the model has heads 0..{n_heads - 1}")
    return ",".join(map(str, idx)), idx


def long_text_ids(tokenizer, bos: int | None, n_tokens: int, seed: int = 0, text: str | None = None) -> torch.Tensor:
    """BOS + at least n_tokens − 1 content tokens: `text`, or the shipped DART-style lines, each
    pass through them in a fresh seeded order, repeated until long enough."""
    lines = [text] if text is not None else dart_lines()
    if text is not None and not text.strip():
        raise UserError("text is empty; give some text to measure on")
    rng = random.Random(seed)
    ids: list[int] = [bos] if bos is not None else []
    while len(ids) < n_tokens:
        order = list(lines)
        if len(order) > 1:
            rng.shuffle(order)
        piece = tokenizer(" " + " ".join(order) if len(ids) > 1 else " ".join(order), add_special_tokens=False).input_ids
        if not piece:
            raise UserError("the text tokenizes to nothing; give some text to measure on")
        ids.extend(piece)
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def loglog_fit(lengths: list[int], values: list[float]) -> dict:
    """Least-squares slope of log(value) on log(length); exponent = −slope. None where undefined."""
    pts = [(math.log(L), math.log(v)) for L, v in zip(lengths, values) if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return {"slope": None, "intercept": None, "r2": None, "exponent": None, "points": len(pts)}
    xs, ys = zip(*pts)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2, "exponent": -slope, "points": len(pts)}


def _reduce_hook(store: dict, layer: int, P: int, L: int, with_prefix: bool):
    """A hook on blocks.{layer}.attn.hook_pattern keeping only per-head means over the window."""
    w = max(1, math.ceil(L / WINDOW_FRACTION))

    def hook(x, hook):
        pat = x[0]  # [H, L, P + L] with a prefix, [H, L, L] without
        win = pat[:, L - w:, :].double()
        if with_prefix:
            alpha = win[..., :P].sum(-1)  # [H, w]: the mass over the P slots, summed
            store[(layer, "alpha")] = alpha.mean(-1)
            store[(layer, "visible")] = (alpha > 0).double().mean(-1)
            store[(layer, "alpha_all")] = pat[:, :, :P].double().sum(-1).mean(-1)
            store[(layer, "sink")] = win[..., P].mean(-1)
        else:
            store[(layer, "sink")] = win[..., 0].mean(-1)
        return x

    return hook


def _aggregate(per_head: torch.Tensor, how: str, idx: list[int]) -> torch.Tensor:
    """[H, n_lengths] -> [n_lengths]."""
    sel = per_head[idx]
    return sel.max(0).values if how == "max" else sel.mean(0)


def run_dilution(
    model: str, prefix: str = "random", adapter: str | None = None, lengths: list[int] | None = None,
    heads: str = "mean", prefix_len: int = 1, dtype: str = "float32", seed: int = 0, text: str | None = None,
    progress: Callable[[str], None] | None = None, on_loaded: Callable[[LoadedModel], None] | None = None,
    identities: bool = False,
) -> DilutionResult:
    """Load `model` and measure prefix dilution (see the module docstring). on_loaded: called with
    the loaded model, so that a caller that checks the same model (the CLI's --out page) loads it once.
    identities: also the per-layer identity residuals at every length (inputs patched)."""
    say = progress or (lambda m: None)
    torch_dtype = resolve_dtype(dtype)
    if prefix_len < 1:
        raise UserError(f"prefix_len must be >= 1, got {prefix_len}")
    if adapter is not None and prefix != "random":
        raise UserError("give either --prefix or --adapter, not both")
    if adapter is not None:
        adapter_kind(adapter)  # a wrong adapter fails before the model loads
    if lengths is not None:
        check_lengths(lengths, None, prefix_len)
    t0 = time.perf_counter()
    say(f"loading {model}")
    loaded = load_model(model, torch_dtype, seed=seed, progress=say)
    if on_loaded is not None:
        on_loaded(loaded)
    result = dilution_loaded(loaded, prefix, adapter, lengths, heads, prefix_len, seed, text, say, t0=t0,
                             identities=identities)
    if adapter is not None:  # an adapter made for another model: one line, once the measurement ran
        warn_if_other_base(adapter, model)
    return result


def context_limit(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_prefix(loaded: LoadedModel, prefix: str, adapter: str | None, prefix_len: int, seed: int,
                 say: Callable[[str], None] = lambda m: None, train_steps: int = 30) -> CachePrefix:
    """The prefix cache of the dilution probe from its source (random/train/file/PEFT adapter of
    either kind: a prompt-tuning adapter enters as its per-layer keys/values, `soft_prompt_prefix`)."""
    n_layers, n_heads, kv_heads, d_head = model_dims(loaded.config)
    if adapter is not None:
        if adapter_kind(adapter) == "soft_prompt":
            prompt = load_peft_prompt(adapter, loaded.config.hidden_size, n_layers, n_heads)
            return soft_prompt_prefix(loaded.model, prompt)
        return load_peft_prefix(adapter, n_layers, kv_heads, d_head)
    if prefix == "train":
        start = loaded.bos_token_id if loaded.bos_token_id is not None else 0
        init = hard_prompt_prefix(loaded.model, torch.full((prefix_len,), start, dtype=torch.long))
        pre, _ = train_prefix(loaded.model, loaded.tokenizer, init, loaded.bos_token_id, steps=train_steps, seed=seed,
                              progress=say)
        return pre
    if prefix == "random":
        # scaled to the content keys/values of a fixed 64-token reference input (the same for every length)
        ref = long_text_ids(loaded.tokenizer, loaded.bos_token_id, 64, seed)
        store = capture(loaded.bridged(), ref.unsqueeze(0), kv_hook_names(n_layers))
        return prefix_from_source("random", None, n_layers, kv_heads, d_head, prefix_len, seed,
                                  lambda l: content_kv(store, l, len(ref), kv_heads, d_head))
    return prefix_from_source(prefix, None, n_layers, kv_heads, d_head, prefix_len, seed, None)


def dilution_loaded(
    loaded: LoadedModel, prefix: str | CachePrefix = "random", adapter: str | None = None, lengths: list[int] | None = None,
    heads: str = "mean", prefix_len: int = 1, seed: int = 0, text: str | None = None,
    say: Callable[[str], None] = lambda m: None, t0: float | None = None, identities: bool = False,
) -> DilutionResult:
    """The dilution probe on an already-loaded model. `prefix` may be a ready `CachePrefix` (tests)."""
    t0 = t0 if t0 is not None else time.perf_counter()
    config = loaded.config
    torch_dtype = next(loaded.model.parameters()).dtype
    n_layers, n_heads, kv_heads, d_head = model_dims(config)
    how, idx = parse_heads(heads, n_heads)
    limit = context_limit(config)
    if isinstance(prefix, CachePrefix):
        pre = prefix
        source = pre.meta.get("source", "given")
    else:
        pre = build_prefix(loaded, prefix, adapter, prefix_len, seed, say)
        source = f"peft:{adapter}" if adapter is not None else prefix
    pre.check_matches(n_layers, kv_heads, d_head, "prefix")
    pre = pre.to(torch_dtype)
    P = pre.prefix_len
    check_prefix_fits(config, P)
    lengths = check_lengths(lengths, limit, P)
    ids = long_text_ids(loaded.tokenizer, loaded.bos_token_id, max(lengths), seed, text)
    bridge = loaded.bridged()
    t_setup = time.perf_counter() - t0
    per = {key: [] for key in ("alpha", "alpha_all", "sink_base", "sink_prefix", "visible")}  # each: list over lengths of [L, H]
    resid: dict = {"rescale": [], "bias": []}  # each: list over lengths of [layers]
    for n, L in enumerate(lengths):
        inp = ids[:L].unsqueeze(0)
        for with_prefix in (False, True):
            say(f"length {L} ({n + 1}/{len(lengths)}), {'with' if with_prefix else 'without'} prefix")
            store: dict = {}
            hooks = [(f"blocks.{l}.attn.hook_pattern", _reduce_hook(store, l, P, L, with_prefix)) for l in range(n_layers)]
            kwargs = {"past_key_values": prefix_cache(pre, config)} if with_prefix else {}
            with torch.no_grad():
                bridge.run_with_hooks(inp, fwd_hooks=hooks, return_type=None, **kwargs)
            if len(store) != (4 if with_prefix else 1) * n_layers:
                raise RuntimeError("attention hooks did not fire on every layer")
            if with_prefix:
                per["alpha"].append(torch.stack([store[(l, "alpha")] for l in range(n_layers)]))
                per["alpha_all"].append(torch.stack([store[(l, "alpha_all")] for l in range(n_layers)]))
                per["sink_prefix"].append(torch.stack([store[(l, "sink")] for l in range(n_layers)]))
                per["visible"].append(torch.stack([store[(l, "visible")] for l in range(n_layers)]))
            else:
                per["sink_base"].append(torch.stack([store[(l, "sink")] for l in range(n_layers)]))
        if identities:
            say(f"length {L} ({n + 1}/{len(lengths)}): identities, every layer's input patched")
            rescale, bias = patched_identities(bridge, inp, pre, config)
            resid["rescale"].append(rescale)
            resid["bias"].append(bias)
    stacked = {k: torch.stack(v, -1) for k, v in per.items()}  # [layers, H, n_lengths]
    out_layers = []
    for l in range(n_layers):
        a = stacked["alpha"][l]
        alpha = _aggregate(a, how, idx).tolist()
        out_layers.append(LayerDilution(
            layer=l, alpha=alpha, alpha_per_head=a.tolist(),
            alpha_all=_aggregate(stacked["alpha_all"][l], how, idx).tolist(),
            sink_base=_aggregate(stacked["sink_base"][l], how, idx).tolist(),
            sink_prefix=_aggregate(stacked["sink_prefix"][l], how, idx).tolist(),
            sink_base_per_head=stacked["sink_base"][l].tolist(), sink_prefix_per_head=stacked["sink_prefix"][l].tolist(),
            fit=loglog_fit(lengths, alpha), fit_per_head=[loglog_fit(lengths, row) for row in a.tolist()],
            layer_type=layer_attention(config, l).layer_type, window=layer_attention(config, l).window,
            prefix_visible=stacked["visible"][l].max(0).values.tolist(),
            rescale_err=[r[l] for r in resid["rescale"]] if identities else None,
            bias_rel=[b[l] for b in resid["bias"]] if identities else None,
        ))
    has_bos = loaded.bos_token_id is not None and int(ids[0]) == loaded.bos_token_id
    total = time.perf_counter() - t0
    return DilutionResult(
        model=loaded.name, model_type=config.model_type, dtype=str(torch_dtype).removeprefix("torch."),
        n_layers=n_layers, n_heads=n_heads, prefix_source=source, prefix_len=P, lengths=lengths, heads=how,
        head_indices=idx, sink="content position 0 (BOS)" if has_bos else "content position 0 (first token; no BOS)",
        window=f"queries in the last ceil(L/{WINDOW_FRACTION}) positions",
        text="given text, repeated" if text is not None else "model_checks/data/dart_style.txt lines, seeded order, repeated",
        seed=seed, context_limit=limit, layers=out_layers,
        timings={"setup_s": t_setup, "forwards_s": total - t_setup, "total_s": total},
        identities=("max over heads and queries, every layer's input patched to the base forward's (hook_resid_pre), "
                    "float64 from the hooked tensors") if identities else None,
    )


def patched_identities(bridge, inp: torch.Tensor, pre: CachePrefix, config) -> tuple[list[float], list[float]]:
    """Per layer, the §4 rescale error and relative bias residual (every head and query) of `pre` on
    `inp`, with every layer's input in the with-prefix forward replaced by the base forward's, so the
    identities are exact on every layer (module docstring). Returns (rescale errors, bias residuals)."""
    n_layers, n_heads, kv_heads, _ = model_dims(config)
    P = pre.prefix_len
    names = [n for l in range(n_layers) for n in (f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_z")]
    base = capture(bridge, inp, names + [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)])

    def patch(l):
        def hook(x, hook):
            return base[f"blocks.{l}.hook_resid_pre"].unsqueeze(0).to(x.dtype)
        return hook

    pt = capture(bridge, inp, names, cache=prefix_cache(pre, config),
                 extra_hooks=[(f"blocks.{l}.hook_resid_pre", patch(l)) for l in range(n_layers)])
    dtype_name = str(pre.keys[0].dtype).removeprefix("torch.")
    rescale, bias = [], []
    for l in range(n_layers):
        check, _ = layer_check(l, list(range(n_heads)), P, base[f"blocks.{l}.attn.hook_pattern"],
                               pt[f"blocks.{l}.attn.hook_pattern"], base[f"blocks.{l}.attn.hook_z"],
                               pt[f"blocks.{l}.attn.hook_z"], pre.values[l], n_heads // kv_heads, dtype_name)
        rescale.append(check.rescale_max_err)
        bias.append(check.bias_rel_residual)
    return rescale, bias
