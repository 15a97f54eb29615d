"""What differs between the supported families' attention, read from a Hugging Face config.

The identities of docs/papers.md §4 are computed from hooked patterns and head outputs, so they hold
for any softmax attention; what a family changes is *which* pattern a prefix gets. Per layer
(`layer_attention`):

- ``scale``: what multiplies q·k. LLaMA, Mistral, Qwen: ``d_head**-0.5``. Gemma 3:
  ``query_pre_attn_scalar**-0.5`` (the scaled query; 256 on Gemma 3 270M, where d_head is 256 too,
  but the two differ on other sizes and on the tests' tiny model).
- ``softcap``: ``attn_logit_softcapping`` (scores → cap·tanh(scores/cap) before the mask); None on
  Gemma 3 (Gemma 2 had 50), honoured when a config sets it.
- ``qk_norm``: Gemma 3 and Qwen 3 RMS-normalize each head's query and key *before* the rotary map.
  A prefix key is a cache entry, i.e. already normalized and rotated: it is used as given, never
  normalized or rotated again (PEFT's prefix tuning injects it the same way).
- ``rope_theta``: the rotary base of the layer. Gemma 3 has two: ``rope_local_base_freq`` (10,000)
  on sliding layers, ``rope_theta`` (1,000,000) on global ones (transformers 5 keeps them in
  ``rope_parameters[layer_type]``).
- ``layer_type`` / ``window``: ``sliding_attention`` layers let a query at position q see keys at
  positions k with q − k < window (``transformers.masking_utils.sliding_window_overlay``);
  ``full_attention`` layers see every earlier key. A prefix occupies positions 0..P−1 of every
  layer's cache, so on a sliding layer content query i (position P + i) sees prefix slot s only
  while P + i − s < window: past the window the prefix is masked out (`visible_prefix_slots`).
  transformers' sliding cache layer also keeps only the last window − 1 entries, so a prefix of
  window slots or more loses its first slots when the cache is built (`check_prefix_fits`).
- ``embed_scale`` (model-wide): Gemma multiplies the token embeddings by sqrt(d_model) inside its
  embedding module. A soft prompt is given *after* that scale: it enters as ``inputs_embeds``,
  which the model does not rescale, exactly as PEFT's prompt tuning concatenates its prompt rows to
  ``word_embeddings(input_ids)`` (the scaled module output). So a soft prompt's rows live on the
  scale of the *scaled* embeddings (`model_checks.soft_prompt.random_soft_prompt`), and the content
  part of a soft-prompt forward is the embedding module's output, not the raw weight rows.

Key/value heads: every family maps query head h to key/value head ``h // (heads / kv_heads)``
(`repeat_kv`); Gemma 3 270M has one key/value head (multi-query), so a prefix is
``[1, P, d_head]`` per layer and a PEFT prefix adapter records ``num_attention_heads = 1``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from prefixlab_common.errors import UserError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class LayerAttention:
    """How one layer turns queries and cached keys into a pattern."""

    layer: int
    layer_type: str  # FULL or SLIDING
    window: int | None  # keys a query sees on a sliding layer, itself included (None: full)
    scale: float  # multiplies q·k
    softcap: float | None  # attn_logit_softcapping
    rope_theta: float | None  # this layer's rotary base
    qk_norm: bool  # per-head RMSNorm of q and k before the rotary map

    def to_json(self) -> dict:
        return asdict(self)


def _d_head(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_type(config, layer: int) -> str:
    """FULL or SLIDING for `layer` (`layer_types` when the config has it; Mistral: sliding everywhere
    when `sliding_window` is set)."""
    types = getattr(config, "layer_types", None)
    if types:
        return SLIDING if types[layer] == SLIDING else FULL
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return SLIDING
    return FULL


def _rope_theta(config, kind: str) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(kind), dict):
        params = params[kind]
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(config, "rope_local_base_freq" if kind == SLIDING else "rope_theta", None)
    return None if theta is None else float(theta)


def layer_attention(config, layer: int) -> LayerAttention:
    """The attention of `layer` of a supported config (module docstring)."""
    kind = layer_type(config, layer)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    scale = float(scalar) ** -0.5 if scalar is not None else _d_head(config) ** -0.5
    softcap = getattr(config, "attn_logit_softcapping", None)
    qk_norm = config.model_type in ("gemma3_text", "qwen3")
    window = getattr(config, "sliding_window", None) if kind == SLIDING else None
    return LayerAttention(layer, kind, window, scale, None if softcap is None else float(softcap),
                          _rope_theta(config, kind), qk_norm)


def embed_scale(config) -> float:
    """What the embedding module multiplies its rows by: sqrt(d_model) on Gemma, 1 elsewhere."""
    return math.sqrt(config.hidden_size) if config.model_type.startswith("gemma") else 1.0


def visible_prefix_slots(spec: LayerAttention, P: int, i: int) -> int:
    """How many of the P prefix slots content query i (at position P + i) sees on this layer."""
    if spec.window is None:
        return P
    first = P + i - spec.window + 1  # the lowest position still inside the window
    return max(0, P - max(0, first))


def prefix_visible_upto(spec: LayerAttention, P: int, T: int) -> int:
    """The last content query (0-based) that sees at least one prefix slot; −1 when none does."""
    if spec.window is None:
        return T - 1
    return min(T - 1, spec.window - 2)  # slot P − 1 is visible while P + i − (P − 1) < window


def check_prefix_fits(config, P: int, what: str = "prefix") -> None:
    """UserError when a sliding layer's cache cannot hold P slots (it keeps the last window − 1)."""
    for l in range(config.num_hidden_layers):
        spec = layer_attention(config, l)
        if spec.window is not None and P > spec.window - 1:
            raise UserError(f"a {what} of {P} slots does not fit layer {l}'s sliding window of {spec.window}: "
                            f"transformers' sliding cache keeps only the last {spec.window - 1} entries; use P <= {spec.window - 1}")


def pattern_by_hand(spec: LayerAttention, q: torch.Tensor, keys: torch.Tensor, P: int) -> torch.Tensor:
    """The with-prefix pattern recomputed from the post-rotary queries and the cached keys.

    q [T, H, d] (content queries at positions P..P+T−1), keys [kv, P+T, d] (the prefix's cache keys,
    then the content's) -> [H, T, P+T], float64: scale, soft-cap, causal and window mask, softmax.
    """
    T, H, _ = q.shape
    group = H // keys.shape[0]
    k = keys.double()[torch.arange(H) // group]  # [H, P+T, d]
    scores = torch.einsum("thd,hkd->htk", q.double(), k) * spec.scale
    if spec.softcap is not None:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    qpos = (torch.arange(T) + P).unsqueeze(1)
    kpos = torch.arange(P + T).unsqueeze(0)
    allowed = kpos <= qpos
    if spec.window is not None:
        allowed &= qpos - kpos < spec.window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """The rotary map (HF's half-split convention, default rope type) of x [..., T, d] at `positions` [T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.double().unsqueeze(-1) * inv_freq  # [T, d/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x.double() * cos + torch.cat([-x2, x1], -1).double() * sin


def cache_entry(model, layer: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value cache entries layer `layer` of an HF model writes for residual-stream inputs
    x [T, d_model] at `positions` [T], by hand: keys = rotary_θ(k_norm(W_k · ln(x))) with the layer's
    own base θ (k_norm only where the family has q/k norms), values = W_v · ln(x).
    Returns ([kv, T, d_head], [kv, T, d_head]) in float64: what a prefix built from residual vectors
    must put in the cache (rope types other than the default are refused)."""
    spec = layer_attention(model.config, layer)
    params = getattr(model.config, "rope_parameters", None) or {}
    rope_type = (params.get(spec.layer_type) or params).get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise UserError(f"layer {layer} uses rope type {rope_type!r}; cache_entry computes the default rotary map only")
    block = model.model.layers[layer]
    attn = block.self_attn
    with torch.no_grad():
        h = block.input_layernorm(x.unsqueeze(0))[0]
        d_head = attn.head_dim
        k = attn.k_proj(h).view(len(x), -1, d_head).transpose(0, 1)  # [kv, T, d]
        v = attn.v_proj(h).view(len(x), -1, d_head).transpose(0, 1)
        if spec.qk_norm:
            k = attn.k_norm(k)
    return rotate(k, positions, spec.rope_theta), v.double()
