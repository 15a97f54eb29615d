"""The hooked toy transformer: a GPT-style pre-LayerNorm model on TransformerLens's HookPoints.

A tuning method is *data* that `forward` accepts (a `MethodState`): soft-prompt embeddings placed
in the prompt slots, per-layer prefix keys/values, and/or overrides of base weights (full
fine-tuning, merged LoRA). The base module itself is never mutated by a method.

Positions (docs/papers.md §4): the model reserves `n_prompt` slot positions; content always sits at
positions n_prompt.., with or without a prompt or prefix, so the layer-0 identities are exact.
Prefix keys and values are prepended to every layer's keys, so patterns are
`[batch, head, query, key]` with the prefix first (`pattern[..., :P]`).

Two slot protocols (`ToyConfig.slots`), recorded by every base run:
- `token` ([P]'s pretraining with pads, docs/papers.md §3b): the slots hold the SLOT token (the last
  vocabulary entry) during pretraining and in every base forward. A method takes the *first*
  slots: a prefix of length P takes slots 0..P-1 in every layer (their keys/values are the
  prefix's), then a soft prompt of length P' takes the next P' slots (its embeddings replace the
  SLOT embeddings there); the remaining slots keep their SLOT tokens.
- `empty` (the lab's first protocol): with no method the slots are absent and the model is
  pretrained on content only; a soft prompt of length P' fills positions n_prompt-P'..n_prompt-1.
`base_view(state)` is the forward a method is compared with (probes): the same remaining SLOT
tokens at the same positions, without the method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from prefixlab_common.errors import UserError


SLOT_PROTOCOLS = ("token", "empty")


@dataclass(frozen=True)
class ToyConfig:
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_vocab: int = 12
    n_ctx: int = 20
    n_prompt: int = 1  # reserved prompt slots before the content
    d_mlp: int | None = None  # default 4 * d_model
    dropout: float = 0.1
    attn_only: bool = False
    ln_before_attn: bool = True  # False: E2's model (docs/papers.md §3), no LayerNorm before attention
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    slots: str = "empty"  # "token": SLOT tokens fill the prompt slots ([P]); "empty": no slot tokens

    def __post_init__(self) -> None:
        if self.slots not in SLOT_PROTOCOLS:
            raise UserError(f"unknown slot protocol {self.slots!r}; use one of {', '.join(SLOT_PROTOCOLS)}")
        for name in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.n_prompt < self.n_ctx:
            raise UserError(f"n_prompt={self.n_prompt} does not fit the context n_ctx={self.n_ctx}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_mlp is not None and self.d_mlp <= 0:
            raise UserError(f"d_mlp must be positive, got {self.d_mlp}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**d)


# Model sizes (layers/heads/d_model) of docs/papers.md §3, and a default sized for 2 CPU cores.
PRESETS: dict[str, dict] = {
    "micro": dict(n_layers=1, n_heads=2, d_model=16),
    "default": dict(n_layers=2, n_heads=4, d_model=64),
    "petrov-e1": dict(n_layers=1, n_heads=1, d_model=96),
    "petrov-e2": dict(n_layers=1, n_heads=4, d_model=256, ln_before_attn=False),
    "petrov-e3": dict(n_layers=4, n_heads=4, d_model=256),
    "petrov-large": dict(n_layers=12, n_heads=8, d_model=512),
}


def preset_config(name: str, **overrides) -> ToyConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ToyConfig(**{**PRESETS[name], **overrides})


@dataclass
class MethodState:
    """What a tuning method hands the forward. Every field is optional; empty means 'none'.

    prompt:   [P, d_model] or [batch, P, d_model] embeddings for the prompt slots
              (a hard prompt is `W_E[tokens]`, so it takes the very same path).
    prefix_k: per layer, None or keys   [n_heads, P, d_head] (or [batch, n_heads, P, d_head])
    prefix_v: per layer, None or values [n_heads, P, d_head]
    weights:  name -> tensor overrides of base parameters (full fine-tuning, merged LoRA).
    memory:   per layer, None or a Prefix-Tuning+ memory M [n_heads, r, d_head]: each head's output
              z gets φ(q)ᵀM added after its softmax, before W_O (docs/papers.md §7); patterns untouched.
    memory_proj: per layer, None (φ reads q itself, r = d_head) or φ's input map [n_heads, d_head, r].
    feature:  the positive feature map φ of the memory term (`FEATURES`).
              A memory may also come as weights named `memory.{feature}.{layer}.M` / `.proj`
              (`memory_weights`): so K runs of it stack and train under vmap as LoRA's do
              (fused runs); the forward moves them into these fields (`unpack_memory`).
    vacant:   slots taken with nothing in their place (the `token` protocol's base view of a
              method: its slots removed, the remaining SLOT tokens kept where they were).
    """

    prompt: Tensor | None = None
    prefix_k: list[Tensor | None] | None = None
    prefix_v: list[Tensor | None] | None = None
    weights: dict[str, Tensor] = field(default_factory=dict)
    vacant: int = 0
    memory: list[Tensor | None] | None = None
    memory_proj: list[Tensor | None] | None = None
    feature: str = "elu"

    def layer_memory(self, layer: int) -> tuple | None:
        """(M, φ's input map or None, feature) of `layer`, or None: what Attention.forward takes."""
        if self.memory is None or self.memory[layer] is None:
            return None
        proj = None if self.memory_proj is None else self.memory_proj[layer]
        return self.memory[layer], proj, self.feature

    @property
    def prompt_len(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[-2]

    def prefix_len(self, layer: int) -> int:
        if self.prefix_k is None or self.prefix_k[layer] is None:
            return 0
        return self.prefix_k[layer].shape[-2]

    @property
    def max_prefix_len(self) -> int:
        if self.prefix_k is None:
            return 0
        return max((k.shape[-2] for k in self.prefix_k if k is not None), default=0)

    @property
    def slots_taken(self) -> int:
        """Slots this state occupies under the `token` protocol: prefix, vacant, then prompt."""
        return self.max_prefix_len + self.vacant + self.prompt_len


MEMORY_PREFIX = "memory."


def memory_weights(memory: list, proj: list, feature: str) -> dict[str, Tensor]:
    """A Prefix-Tuning+ memory as reserved weight names (MethodState's docstring)."""
    out = {}
    for l, m in enumerate(memory):
        if m is not None:
            out[f"{MEMORY_PREFIX}{feature}.{l}.M"] = m
            if proj[l] is not None:
                out[f"{MEMORY_PREFIX}{feature}.{l}.proj"] = proj[l]
    return out


def unpack_memory(state: MethodState | None, n_layers: int) -> MethodState | None:
    """`state` with its `memory.*` weights moved into the memory fields (unchanged without any)."""
    if state is None or not any(k.startswith(MEMORY_PREFIX) for k in state.weights):
        return state
    memory, proj, feature = [None] * n_layers, [None] * n_layers, state.feature
    rest = {}
    for k, v in state.weights.items():
        if not k.startswith(MEMORY_PREFIX):
            rest[k] = v
            continue
        feature, layer, kind = k[len(MEMORY_PREFIX):].split(".")
        (memory if kind == "M" else proj)[int(layer)] = v
    return MethodState(state.prompt, state.prefix_k, state.prefix_v, rest, vacant=state.vacant,
                       memory=memory, memory_proj=proj, feature=feature)


def base_view(cfg: "ToyConfig", state: MethodState | None) -> MethodState | None:
    """The forward a method state is compared with: no method, and under the `token` protocol the
    method's slots left vacant, so the remaining SLOT tokens keep their positions (docs/papers.md §4)."""
    if cfg.slots == "token" and state is not None and state.slots_taken:
        return MethodState(vacant=state.slots_taken)
    return None


# Prefix-Tuning+'s positive feature maps φ (docs/papers.md §7): elu(x) + 1 is linear attention's
# (Katharopoulos et al. 2020), relu the non-negative alternative.
FEATURES = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu}


def memory_term(q: Tensor, memory: tuple) -> Tensor:
    """Prefix-Tuning+'s term φ(q)ᵀM per head: q [batch, pos, head, d_head], M [head, r, d_head]
    (proj [head, d_head, r] or None) -> [batch, pos, head, d_head]."""
    M, proj, feature = memory
    if proj is not None:
        q = torch.einsum("bqhe,her->bqhr", q, proj.to(q.dtype))
    return torch.einsum("bqhr,hre->bqhe", FEATURES[feature](q), M.to(q.dtype))


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        H, D, Dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(H, D, Dh))
        self.W_K = nn.Parameter(torch.empty(H, D, Dh))
        self.W_V = nn.Parameter(torch.empty(H, D, Dh))
        self.W_O = nn.Parameter(torch.empty(H, Dh, D))
        self.b_Q = nn.Parameter(torch.zeros(H, Dh))
        self.b_K = nn.Parameter(torch.zeros(H, Dh))
        self.b_V = nn.Parameter(torch.zeros(H, Dh))
        self.b_O = nn.Parameter(torch.zeros(D))
        self.hook_q = HookPoint()  # [batch, query_pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, prefix + key_pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, prefix + key_pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, prefix + key_pos], pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, prefix + key_pos]
        self.hook_z = HookPoint()  # [batch, query_pos, head, d_head]
        self.drop = nn.Dropout(cfg.dropout)

    def _project(self, x: Tensor, Ws: tuple[Tensor, ...], bs: tuple[Tensor, ...]) -> list[Tensor]:
        """x [..., pos, d_model] through several [head, d_model, d_head] maps in one matmul
        (fused QKV) -> one [..., pos, head, d_head] tensor per map."""
        H, D, Dh = Ws[0].shape
        w = torch.cat(Ws, dim=0).transpose(0, 1).reshape(D, len(Ws) * H * Dh)
        b = torch.cat(bs, dim=0).reshape(-1)
        out = torch.addmm(b, x.reshape(-1, D), w)
        return list(out.view(*x.shape[:-1], len(Ws), H, Dh).unbind(-3))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of residual-space inputs x [..., pos, d_model] -> [..., pos, head, d_head]."""
        k, v = self._project(x, (self.W_K, self.W_V), (self.b_K, self.b_V))
        return k, v

    def forward(self, x: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                fast: bool = False, last: int | None = None, memory: tuple | None = None) -> Tensor:
        """fast: scaled_dot_product_attention, which never forms the pattern, so hook_attn_scores
        and hook_pattern do not fire; the model asks for it only when no hook is attached.
        last: only the last `last` query positions (their keys/values still span everything).
        memory: Prefix-Tuning+'s (M, proj, feature): φ(q)ᵀM is added to each head's softmax
        output z (before hook_z and W_O); the scores and pattern never see it."""
        B, T, _ = x.shape
        q, k, v = self._project(x, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V))
        q = self.hook_q(q)
        if last is not None:
            q = q[:, T - last:]
        P = 0
        if prefix_k is not None:
            P = prefix_k.shape[-2]
            # [head, P, d_head] (or batched) -> [batch, P, head, d_head], prefix first
            pk = einops.rearrange(prefix_k, "... h p e -> ... p h e").expand(B, P, *k.shape[2:])
            pv = einops.rearrange(prefix_v, "... h p e -> ... p h e").expand(B, P, *v.shape[2:])
            k = torch.cat([pk.to(k.dtype), k], dim=1)
            v = torch.cat([pv.to(v.dtype), v], dim=1)
        k, v = self.hook_k(k), self.hook_v(v)
        Tq = q.shape[1]
        if fast:
            # the same attention without materialising the pattern (no hook reads it)
            square = not P and Tq == T
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=None if square else _causal_mask(T, P, x.device)[T - Tq:], is_causal=square,
                dropout_p=self.drop.p if self.training else 0.0).transpose(1, 2)
        else:
            scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.cfg.d_head)
            causal = _causal_mask(T, P, x.device)[T - Tq:]
            scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = torch.einsum("bhqk,bkhe->bqhe", self.drop(pattern), v)
        if memory is not None:
            z = z + memory_term(q, memory)
        z = self.hook_z(z)
        H, Dh, D = self.W_O.shape
        return torch.addmm(self.b_O, z.reshape(B * Tq, H * Dh), self.W_O.reshape(H * Dh, D)).view(B, Tq, D)


_MASKS: dict[tuple, Tensor] = {}


def _causal_mask(T: int, P: int, device) -> Tensor:
    """[T, P + T] bool, True where query i may attend: every prefix key, content keys j <= i."""
    key = (T, P, str(device))
    m = _MASKS.get(key)
    if m is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        m = torch.cat([causal.new_ones(T, P), causal], dim=1) if P else causal
        if len(_MASKS) < 256:
            _MASKS[key] = m
    return m


class MLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.mlp_width))
        self.b_in = nn.Parameter(torch.zeros(cfg.mlp_width))
        self.W_out = nn.Parameter(torch.empty(cfg.mlp_width, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        pre = self.hook_pre(torch.addmm(self.b_in, x.reshape(-1, x.shape[-1]), self.W_in).view(*shape, -1))
        post = self.hook_post(F.gelu(pre))
        return torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out).view(*shape, -1)


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps) if cfg.ln_before_attn else nn.Identity()
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
            self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                fast: bool = False, last: int | None = None, memory: tuple | None = None) -> Tensor:
        """last: compute only the last `last` positions' outputs (the model's final block, when
        only those logits are wanted and no hook reads the others). memory: Attention.forward's."""
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.drop(self.attn(self.ln1(x), prefix_k, prefix_v, fast, last, memory)))
        if last is not None:
            x = x[:, x.shape[1] - last:]
        x = self.hook_resid_mid(x + attn_out)
        if not self.cfg.attn_only:
            x = x + self.hook_mlp_out(self.drop(self.mlp(self.ln2(x))))
        return self.hook_resid_post(x)

    def prefix_from_residual(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Simple-share prefix (docs/papers.md §1): residual vectors p [..., P, d_model] through this
        layer's frozen LayerNorm and key/value maps -> keys, values [..., head, P, d_head]."""
        h = F.layer_norm(p, (p.shape[-1],), self.ln1.w, self.ln1.b, self.ln1.eps) \
            if self.cfg.ln_before_attn else p
        k, v = self.attn.keys_values(h)
        return (einops.rearrange(k, "... p h e -> ... h p e"),
                einops.rearrange(v, "... p h e -> ... h p e"))


class ToyTransformer(HookedRootModule):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Module()
        self.embed.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.pos_embed = nn.Module()
        self.pos_embed.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.unembed = nn.Module()
        self.unembed.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.unembed.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.reset_parameters()
        self.setup()
        # fast path (SDPA) when no hook is attached; False forces the explicit softmax everywhere
        self.fast_attention = True

    def has_hooks(self) -> bool:
        """Whether any hook point has a hook (run_with_hooks, run_with_cache, add_hook, or a
        plain torch hook): then the forward takes the explicit path, where every hook fires."""
        if torch.nn.modules.module._global_forward_hooks:
            return True
        for hp in self.hook_dict.values():
            if hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks or \
                    hp._backward_pre_hooks or hp.fwd_hooks or hp.bwd_hooks:
                return True
        return False

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for name, p in self.named_parameters():
            if name.endswith(("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_in", "W_U")):
                nn.init.normal_(p, std=self.cfg.init_std, generator=generator)
            elif name.endswith(("W_O", "W_out")):  # GPT-2's scaled init of residual writes
                nn.init.normal_(p, std=self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers),
                                generator=generator)

    def forward(self, tokens: Tensor, state: MethodState | None = None, last: int | None = None) -> Tensor:
        """tokens: content [batch, T] -> logits [batch, prompt + T, d_vocab].
        last: only the logits of the last `last` positions, [batch, last, d_vocab] (the loss and
        teacher-forced evaluation need no others); without hooks the final block then skips the
        other positions' queries, MLP and unembedding."""
        state = unpack_memory(state, self.cfg.n_layers)
        if state is not None and state.weights:
            inner = MethodState(state.prompt, state.prefix_k, state.prefix_v, vacant=state.vacant,
                                memory=state.memory, memory_proj=state.memory_proj, feature=state.feature)
            return torch.func.functional_call(self, state.weights, (tokens,), {"state": inner, "last": last},
                                              strict=False)
        cfg = self.cfg
        B, T = tokens.shape
        P = state.prompt_len if state is not None else 0
        if P > cfg.n_prompt:
            raise UserError(f"a prompt of length {P} does not fit the model's {cfg.n_prompt} slots")
        if cfg.n_prompt + T > cfg.n_ctx:
            raise UserError(f"{T} content tokens do not fit the context "
                            f"({cfg.n_ctx} positions, {cfg.n_prompt} of them prompt slots)")
        embed = self.embed.W_E[tokens]
        if cfg.slots == "token":
            # the method takes the first slots (prefix, vacant, prompt); SLOT tokens fill the rest
            taken = state.slots_taken if state is not None else 0
            if taken > cfg.n_prompt:
                raise UserError(f"the method takes {taken} slots, but the model has {cfg.n_prompt}")
            start = taken - P
            n_slot = cfg.n_prompt - taken
            if n_slot:
                slot = self.embed.W_E[cfg.d_vocab - 1].expand(B, n_slot, cfg.d_model)
                embed = torch.cat([slot, embed], dim=1)
        else:
            start = cfg.n_prompt - P
        if P:
            prompt = state.prompt.to(embed.dtype).expand(B, P, cfg.d_model)
            embed = torch.cat([prompt, embed], dim=1)
        embed = self.hook_embed(embed)
        pos = self.hook_pos_embed(self.pos_embed.W_pos[start:cfg.n_prompt + T].expand(B, -1, -1))
        x = self.drop(embed + pos)
        hooked = self.has_hooks()
        fast = self.fast_attention and not hooked
        if last is not None and not 0 < last <= x.shape[1]:
            raise ValueError(f"last={last} is not in 1..{x.shape[1]}")
        trim = None if hooked else last  # with hooks, every position runs (the hook contract)
        prefixes = [self._layer_prefix(state, layer) for layer in range(cfg.n_layers)]
        memories = [None if state is None else state.layer_memory(layer) for layer in range(cfg.n_layers)]
        S = self._shared_head(state, x, prefixes, T, last) if fast else 0
        if S:
            return self._forward_shared_head(x, prefixes, S, last, memories)
        for layer, block in enumerate(self.blocks):
            pk, pv = prefixes[layer]
            x = block(x, pk, pv, fast, trim if layer == len(self.blocks) - 1 else None, memories[layer])
        if last is not None and trim is None:
            x = x[:, x.shape[1] - last:]
        return self._unembed(x)

    @staticmethod
    def _layer_prefix(state: MethodState | None, layer: int) -> tuple[Tensor | None, Tensor | None]:
        if state is None or state.prefix_k is None or state.prefix_k[layer] is None:
            return None, None
        pk, pv = state.prefix_k[layer], state.prefix_v[layer]
        return (None, None) if pk.shape[-2] == 0 else (pk, pv)

    def _unembed(self, x: Tensor) -> Tensor:
        x = self.ln_final(x)
        return torch.addmm(self.unembed.b_U, x.reshape(-1, x.shape[-1]), self.unembed.W_U).view(*x.shape[:-1], -1)

    def _shared_head(self, state: MethodState | None, x: Tensor, prefixes, T: int, last: int | None) -> int:
        """How many leading positions (a soft prompt, SLOT tokens) are the same for every sequence
        of the batch: causal attention then makes their residual streams the same in every layer,
        so the fast path computes them once (0: the ordinary forward). They must be dropout-free,
        with a prompt and prefix shared by the batch (not per-sequence, as in fused runs)."""
        S = x.shape[1] - T
        if not S or x.shape[0] == 1 or (self.training and self.cfg.dropout > 0):
            return 0
        if last is None or last > T:
            return 0  # the head's own logits are wanted: the ordinary forward
        if state is not None and state.prompt is not None and state.prompt.dim() > 2:
            return 0
        if any(pk is not None and pk.dim() > 3 for pk, _ in prefixes):
            return 0
        return S

    def _forward_shared_head(self, x: Tensor, prefixes, S: int, last: int, memories=None) -> Tensor:
        """The forward with the first S positions computed once, at batch 1. In every layer their
        keys and values are exactly a prefix for the other positions (docs/papers.md §1: a prefix is
        the keys and values of earlier positions), so the content attends to [prefix, head,
        content] exactly as in the unshared forward. Only the last `last` logits are returned.
        memories: per layer, a Prefix-Tuning+ memory term both parts' queries get."""
        head, x = x[:1, :S], x[:, S:]
        n = len(self.blocks)
        memories = memories or [None] * n
        for layer, block in enumerate(self.blocks):
            pk, pv = prefixes[layer]
            mem = memories[layer]
            kh, vh = block.attn.keys_values(block.ln1(head))  # [1, S, head, d_head]
            kh = einops.rearrange(kh[0], "p h e -> h p e")
            vh = einops.rearrange(vh[0], "p h e -> h p e")
            tk = kh if pk is None else torch.cat([pk.to(kh.dtype), kh], dim=-2)
            tv = vh if pv is None else torch.cat([pv.to(vh.dtype), vh], dim=-2)
            x = block(x, tk, tv, True, last if layer == n - 1 else None, mem)
            if layer < n - 1:
                head = block(head, pk, pv, True, memory=mem)
        return self._unembed(x)

    def content_logits(self, tokens: Tensor, state: MethodState | None = None) -> Tensor:
        """Logits at the content positions only: [batch, T, d_vocab]."""
        return self(tokens, state, last=tokens.shape[1])

    @torch.no_grad()
    def generate(self, x: Tensor, n_new: int, state: MethodState | None = None) -> Tensor:
        """Greedy decoding of n_new tokens after x [batch, L] -> [batch, n_new]."""
        seq = x
        for _ in range(n_new):
            nxt = self(seq, state, last=1)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, x.shape[1]:]

    def base_params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())
