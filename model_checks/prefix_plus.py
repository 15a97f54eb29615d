"""Prefix-Tuning+ (docs/papers.md §7) on LLaMA-family models and its two probes.

On a bridged HF model (`model_checks.models`) a [PT+] memory enters through two hooks per layer:
``blocks.{l}.attn.hook_rot_q`` keeps the head's query (post-rotary: the query the softmax reads)
and ``blocks.{l}.attn.hook_z`` returns z + φ(q)ᵀM, per query head (GQA: the memory is per query
head; the shared key/value heads are not involved). The pattern hooks never see it.

- `memory_identities`: patterns equal the base model's at every layer and position given the same
  layer input (at layer 0 the base model's own), and each head output moves by exactly φ(q)ᵀM.
- `dilution_curves`: a random prefix's attention mass α against input length beside a random
  [PT+]'s share of the head output, ‖φ(q)ᵀM‖ / (‖z‖ + ‖φ(q)ᵀM‖), over the same inputs.
- `query_bias_spread` (toy model): how much the bias direction of each head varies with the
  query: the mean pairwise cosine, over positions, of the method's part of the head output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_checks.bridge import capture, model_dims, token_ids
from model_checks.dilution import WINDOW_FRACTION, check_lengths, context_limit, dilution_loaded, long_text_ids, loglog_fit
from model_checks.models import LoadedModel
from toy_models.model import FEATURES, MethodState, memory_term, unpack_memory

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@dataclass
class LlamaMemory:
    """A [PT+] memory for a HF model: per layer M [n_heads, r, d_head] (None: layer untouched),
    φ's input map [n_heads, d_head, r] or None (φ reads q itself), and the feature map."""

    M: list[torch.Tensor | None]
    proj: list[torch.Tensor | None]
    feature: str = "elu"

    def term(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """φ(q)ᵀM of `layer`: q [batch, pos, head, d_head] -> the same shape."""
        x = q if self.proj[layer] is None else torch.einsum("bqhe,her->bqhr", q, self.proj[layer].to(q.dtype))
        return torch.einsum("bqhr,hre->bqhe", FEATURES[self.feature](x), self.M[layer].to(q.dtype))


def random_memory(config, seed: int = 0, width: int | None = None, feature: str = "elu") -> LlamaMemory:
    """N(0, 1) memories (and φ maps N(0, 1/d_head) with a width) for every layer; `calibrate` scales them."""
    n_layers, n_heads, _, d_head = model_dims(config)
    g = torch.Generator().manual_seed(seed)
    r = width or d_head
    M = [torch.randn(n_heads, r, d_head, generator=g) for _ in range(n_layers)]
    proj = [None if width is None else torch.randn(n_heads, d_head, r, generator=g) * d_head ** -0.5
            for _ in range(n_layers)]
    return LlamaMemory(M, proj, feature)


def memory_hooks(memory: LlamaMemory, store: dict | None = None) -> list:
    """The forward hooks that apply `memory`; store, if given, receives (layer, "term") and (layer, "z")."""
    qs: dict = {}

    def keep_q(layer):
        def hook(x, hook):
            qs[layer] = x
            return x
        return hook

    def add(layer):
        def hook(z, hook):
            t = memory.term(layer, qs[layer].to(z.dtype))
            if store is not None:
                store[(layer, "z")], store[(layer, "term")] = z.detach().clone(), t.detach().clone()
            return z + t
        return hook

    out = []
    for l, m in enumerate(memory.M):
        if m is not None:
            out += [(f"blocks.{l}.attn.hook_rot_q", keep_q(l)), (f"blocks.{l}.attn.hook_z", add(l))]
    return out


@torch.no_grad()
def calibrate(loaded: LoadedModel, memory: LlamaMemory, n_tokens: int = 64, seed: int = 0) -> LlamaMemory:
    """Scale each layer's M so that its term has the RMS of the head outputs z on a fixed reference
    input of `n_tokens` (the same for every length of the dilution probe)."""
    ref = long_text_ids(loaded.tokenizer, loaded.bos_token_id, n_tokens, seed).unsqueeze(0)
    store: dict = {}
    capture(loaded.bridged(), ref, [], extra_hooks=memory_hooks(memory, store))
    for l, m in enumerate(memory.M):
        if m is not None:
            rms = lambda t: t.double().pow(2).mean().sqrt().item()
            memory.M[l] = m * (rms(store[(l, "z")]) / max(rms(store[(l, "term")]), 1e-30))
    return memory


def _layer_names(l: int) -> list[str]:
    return [f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_rot_q", f"blocks.{l}.attn.hook_pattern",
            f"blocks.{l}.attn.hook_z", f"blocks.{l}.attn.hook_out"]


def _o_proj(loaded: LoadedModel, layer: int) -> torch.Tensor:
    """Layer `layer`'s output projection W_O [d_model, heads·d_head] (HF's o_proj)."""
    return loaded.model.model.layers[layer].self_attn.o_proj.weight


@torch.no_grad()
def memory_identities(loaded: LoadedModel, memory: LlamaMemory, text: str = DEFAULT_TEXT) -> dict:
    """Per layer, against the base forward given the same layer input (the [PT+] forward's residual
    stream put into the base forward at that layer): the max |pattern − base pattern|, the max |z −
    base z| of the softmax part (hook_z as the head computes it, before the [PT+] hook), and the max
    |Δ attention output − φ(q)ᵀM W_Oᵀ| (the head outputs moved by exactly the term, read after W_O);
    with the max |φ(q)ᵀM| (the size of what moved) and at layer 0 the max |pattern − the base's own|."""
    bridge = loaded.bridged()
    n_layers = model_dims(loaded.config)[0]
    inp = token_ids(loaded.tokenizer, loaded.bos_token_id, text).unsqueeze(0)
    names = [n for l in range(n_layers) for n in _layer_names(l)]
    plus = capture(bridge, inp, names, extra_hooks=memory_hooks(memory))
    own = capture(bridge, inp, ["blocks.0.attn.hook_pattern"])
    rows = []
    for l in range(n_layers):
        resid = plus[f"blocks.{l}.hook_resid_pre"].unsqueeze(0)
        same = capture(bridge, inp, _layer_names(l)[2:],
                       extra_hooks=[(f"blocks.{l}.hook_resid_pre", lambda x, hook, r=resid: r.to(x.dtype))])
        z = f"blocks.{l}.attn.hook_z"
        term = torch.zeros_like(plus[z]) if memory.M[l] is None else \
            memory.term(l, plus[f"blocks.{l}.attn.hook_rot_q"].unsqueeze(0))[0]
        moved = plus[f"blocks.{l}.attn.hook_out"] - same[f"blocks.{l}.attn.hook_out"]
        want = term.reshape(term.shape[0], -1).to(moved.dtype) @ _o_proj(loaded, l).T.to(moved.dtype)
        rows.append({
            "layer": l,
            "pattern_max_abs_diff": (plus[f"blocks.{l}.attn.hook_pattern"] - same[f"blocks.{l}.attn.hook_pattern"]).abs().max().item(),
            "z_softmax_part_max_abs_diff": (plus[z] - same[z]).abs().max().item(),
            "out_residual_max_abs": (moved - want).abs().max().item(),
            "term_max_abs": term.abs().max().item(),
            "out_moved_max_abs": moved.abs().max().item(),
        })
    layer0 = (plus["blocks.0.attn.hook_pattern"] - own["blocks.0.attn.hook_pattern"]).abs().max().item()
    return {"model": loaded.name, "tokens": inp.shape[1], "layers": rows, "layer0_pattern_vs_base": layer0}


@torch.no_grad()
def dilution_curves(loaded: LoadedModel, lengths: list[int], prefix_len: int = 1, seed: int = 0,
                    memory: LlamaMemory | None = None) -> dict:
    """Per layer, against input length: a random prefix's attention mass α (`model_checks.dilution`,
    queries in the last eighth) and a random [PT+]'s share ‖φ(q)ᵀM‖ / (‖z‖ + ‖φ(q)ᵀM‖) over the same
    queries and heads, each with its log-log decay exponent. Plain data (a figure is drawn elsewhere)."""
    lengths = check_lengths(lengths, context_limit(loaded.config), prefix_len)
    memory = memory or calibrate(loaded, random_memory(loaded.config, seed), seed=seed)
    pre = dilution_loaded(loaded, "random", None, lengths, "mean", prefix_len, seed)
    ids = long_text_ids(loaded.tokenizer, loaded.bos_token_id, max(lengths), seed)
    n_layers = model_dims(loaded.config)[0]
    share = [[] for _ in range(n_layers)]
    for L in lengths:
        store: dict = {}
        capture(loaded.bridged(), ids[:L].unsqueeze(0), [], extra_hooks=memory_hooks(memory, store))
        w = max(1, math.ceil(L / WINDOW_FRACTION))
        for l in range(n_layers):
            z, t = (store[(l, k)][0, L - w:].double().norm(dim=-1) for k in ("z", "term"))  # [w, heads]
            share[l].append((t / (z + t).clamp_min(1e-30)).mean().item())
    return {
        "model": loaded.name, "lengths": lengths, "prefix_len": prefix_len, "seed": seed,
        "window": f"queries in the last ceil(L/{WINDOW_FRACTION}) positions, mean over heads",
        "prefix_alpha": [l.alpha for l in pre.layers],
        "prefix_exponent": [l.fit["exponent"] for l in pre.layers],
        "memory_share": share,
        "memory_exponent": [loglog_fit(lengths, s)["exponent"] for s in share],
    }


@torch.no_grad()
def query_bias_spread(model, state: MethodState, tokens: torch.Tensor) -> dict:
    """How much each head's bias direction varies with the query on the toy model: per layer and
    head, the mean pairwise cosine over content positions (and the batch) of the method's part of
    the head output: φ(q_i)ᵀM for [PT+], Σ_p A_ip v_p (the prefix's share of z) for a prefix. A
    one-slot prefix has a single direction per head (cosine 1). Returns {"mean_cosine": [layers, heads]}."""
    L = model.cfg.n_layers
    state = unpack_memory(state, L)
    names = {f"blocks.{l}.attn.hook_{n}" for l in range(L) for n in ("q", "pattern", "v")}
    _, cache = model.run_with_cache(tokens, state, names_filter=lambda n: n in names)
    out = torch.zeros(L, model.cfg.n_heads)
    T = tokens.shape[1]
    for l in range(L):
        mem = state.layer_memory(l)
        if mem is not None:
            part = memory_term(cache[f"blocks.{l}.attn.hook_q"], mem)  # [B, pos, H, Dh]
        else:
            P = state.prefix_len(l)
            part = torch.einsum("bhqp,bphe->bqhe", cache[f"blocks.{l}.attn.hook_pattern"][..., :P],
                                cache[f"blocks.{l}.attn.hook_v"][:, :P])
        d = F.normalize(part[:, -T:].reshape(-1, *part.shape[2:]).transpose(0, 1).double(), dim=-1)  # [H, N, Dh]
        cos = d @ d.transpose(1, 2)
        n = cos.shape[-1]
        out[l] = ((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))).float()
    return {"mean_cosine": out.numpy()}
