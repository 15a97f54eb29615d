"""Running a bridged LLaMA-family model and reading its hooks: what the prefix check, the
soft-prompt check and the dilution probe share.

The hook names are TransformerLens's (docs/architecture.md, "Hook names"); the bridge adds
``hook_rot_k``, the post-rotary keys, which is what a prefix cache holds. Activations come back
with the batch dimension removed.
"""

from __future__ import annotations

import torch

from prefixlab_common.errors import UserError


def model_dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, key/value heads, head dimension) of a HF LLaMA-family config."""
    n_heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, n_heads, kv, d_head


def select_indices(requested: list[int] | None, n: int, what: str) -> list[int]:
    """The sorted distinct indices asked for (all of 0..n−1 when None); UserError if out of range."""
    if requested is None:
        return list(range(n))
    if not requested:
        raise UserError(f"no {what}s requested; give at least one {what} index")
    bad = [i for i in requested if not 0 <= int(i) < n]
    if bad:
        raise UserError(f"{what} {bad[0]} is out of range; the model has {what}s 0..{n - 1}")
    return sorted({int(i) for i in requested})


def token_ids(tokenizer, bos: int | None, text: str) -> torch.Tensor:
    """BOS (when the model has one) followed by the tokens of `text`."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long)


def token_strings(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([i]) for i in ids.tolist()]


def hook_names(l: int, kv: bool = False, resid: bool = False, z: bool = True, qk: bool = False) -> list[str]:
    """Layer l's pattern and head outputs (z), optionally its keys/values, its post-rotary queries
    and keys (`qk`, for the pattern recomputed by hand) and residual output."""
    out = [f"blocks.{l}.attn.hook_pattern"] + ([f"blocks.{l}.attn.hook_z"] if z else [])
    if kv:
        out += [f"blocks.{l}.attn.hook_rot_k", f"blocks.{l}.attn.hook_v"]
    if qk:
        out += [f"blocks.{l}.attn.hook_rot_q", f"blocks.{l}.attn.hook_rot_k"]
    if resid:
        out.append(f"blocks.{l}.hook_resid_post")
    return out


def kv_hook_names(n_layers: int) -> list[str]:
    """The post-rotary key and value hooks of every layer."""
    return [n for l in range(n_layers) for n in (f"blocks.{l}.attn.hook_rot_k", f"blocks.{l}.attn.hook_v")]


def capture(bridge, inp, names: list[str], cache=None, position_ids=None, extra_hooks=(),
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


def content_kv(store: dict, l: int, T: int, kv_heads: int, d_head: int):
    """Content keys (post-rotary) and values as [T, kv, d] from hook_rot_k / hook_v."""
    k = store[f"blocks.{l}.attn.hook_rot_k"]
    v = store[f"blocks.{l}.attn.hook_v"]
    return k.reshape(T, kv_heads, d_head), v.reshape(T, kv_heads, d_head)


def rot_q(store: dict, l: int, T: int, n_heads: int, d_head: int) -> torch.Tensor:
    """Layer l's post-rotary queries as [T, heads, d] from hook_rot_q (either layout)."""
    q = store[f"blocks.{l}.attn.hook_rot_q"]
    if q.shape[0] != T and q.shape[1] == T:
        q = q.transpose(0, 1)
    return q.reshape(T, n_heads, d_head)


def rope_shift_error(bridge, inp, base_pattern: torch.Tensor, P: int) -> float:
    """Max abs change of the layer-0 pattern when the content moves from positions 0..T−1 to
    P..P+T−1, without any prefix: the rounding floor of the identities (see `model_checks.check`).

    base_pattern: ``blocks.0.attn.hook_pattern`` of the unshifted forward of `inp`, [H, T, T]."""
    T = base_pattern.shape[-1]
    shifted = capture(bridge, inp, ["blocks.0.attn.hook_pattern"], position_ids=(torch.arange(T) + P).unsqueeze(0))
    return float((shifted["blocks.0.attn.hook_pattern"].double() - base_pattern.double()).abs().max())
