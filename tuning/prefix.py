"""Prefix-tuning in the three parameterizations of docs/papers.md §1 ([L]):

- `none`   (No-share):     free keys and values per layer and slot.
- `simple` (Simple-share): one residual-space vector per slot per layer, through the layer's
                           frozen LayerNorm and key/value maps. This is [P]'s prefix.
- `deep`   (Deep-share):   vectors p' through an MLP g = Linear(d -> h) -> Tanh -> Linear(h -> 2d)
                           (Li & Liang 2021), one MLP per layer or one shared across layers;
                           `fold()` turns it into explicit keys and values after training.
`depth="shallow"` puts the prefix in layer 0 only. Every variant exports the per-layer layout
of docs/architecture.md: keys and values `[n_heads, P, d_head]`.
"""

from __future__ import annotations

import einops
import torch
from torch import nn

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from tuning.base import Method, positive
from tuning.options import Option

SHARES = ("none", "simple", "deep")
INITS = ("normal", "slot")


@torch.no_grad()
def slot_residuals(model, n_layers: int, length: int) -> torch.Tensor:
    """[n_layers, P, d_model]: each layer's residual input at slots 0..P-1 of the base forward
    (`token` protocol). A Simple-share prefix set to them reproduces the base exactly."""
    names = {f"blocks.{l}.hook_resid_pre" for l in range(n_layers)}
    dummy = torch.zeros(1, 1, dtype=torch.long)  # slots precede the content: it does not matter
    _, cache = model.run_with_cache(dummy, names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{l}.hook_resid_pre"][0, :length] for l in range(n_layers)]).clone()
DEPTHS = ("deep", "shallow")


class Prefix(Method):
    name = "prefix"
    summary = "prefix-tuning: per-layer prefix keys/values, No-, Simple- or Deep-share ([L])"
    options = (
        Option("length", int, 1, "prompt/prefix length P", "[P] E1/E2 (docs/papers.md §3)", short="-P"),
        Option("share", str, "simple", "prefix: none, simple or deep",
               "[P]'s prefix is Simple-share (docs/papers.md §1)"),
        Option("depth", str, "deep", "prefix: deep (all layers) or shallow (layer 0)", "[P]: all layers"),
        Option("hidden", int, None, "prefix --share deep: MLP hidden width",
               "the lab's choice; Li & Liang used 512, [L]'s vision code 48", default_text="2·d_model"),
        Option("mlp", str, None, "prefix --share deep: one MLP shared by the layers (shared) or one per layer (per_layer)",
               "Li & Liang 2021 share one MLP across layers", default_text="shared"),
        Option("init_scale", float, 1.0, "prefix: std of the N(0, s²) init", "[P]: N(0, 1)"),
        Option("init", str, "normal", "prefix init: normal ([P]) or slot (start from the base's SLOT positions)",
               "[P]: N(0, 1)"),
    )
    examples = ({"length": 2, "share": "none"}, {"length": 2, "share": "simple"},
                {"length": 2, "share": "deep", "hidden": 8}, {"length": 2, "share": "deep", "hidden": 8, "mlp": "per_layer"},
                {"length": 2, "share": "simple", "depth": "shallow"}, {"length": 2, "share": "simple", "init": "slot"})
    budget_option = "length"
    # Prefixes need a far larger lr than weights (Adam 1e-2..3e-2 worked here; [P]'s 5e-5 needs
    # 20k-500k steps); as in [P]: constant lr, no warmup, no weight decay, model in eval mode.
    defaults = dict(lr=1e-2, weight_decay=0.0, train_mode=False, schedule="constant", warmup=0)

    def __init__(self, model, length: int = 1, share: str = "simple", depth: str = "deep",
                 hidden: int | None = None, mlp: str | None = None, init_scale: float = 1.0,
                 init: str = "normal", generator: torch.Generator | None = None):
        length = positive("prefix length P", length)
        if share not in SHARES:
            raise UserError(f"unknown prefix share {share!r}; use one of {', '.join(SHARES)}")
        if depth not in DEPTHS:
            raise UserError(f"unknown prefix depth {depth!r}; use deep (all layers) or shallow (layer 0)")
        mlp = mlp or "shared"  # None: the default (also how non-deep runs record it)
        if mlp not in ("shared", "per_layer"):
            raise UserError(f"unknown deep-share mlp {mlp!r}; use shared or per_layer")
        cfg = model.cfg
        hidden = positive("deep-share hidden width", hidden if hidden is not None else 2 * cfg.d_model)
        if length > cfg.n_prompt:  # a prefix takes the place of the prompt slots, as in [P]
            raise UserError(f"a prefix of length {length} does not fit the model's {cfg.n_prompt} "
                            f"prompt slots (pretrain with a larger --prompt-len)")
        if init not in INITS:
            raise UserError(f"unknown prefix init {init!r}; use one of {', '.join(INITS)}")
        if init == "slot" and cfg.slots != "token":
            raise UserError("prefix init 'slot' starts from the base's own SLOT positions: it needs a base "
                            "pretrained with --slots token")
        super().__init__(model, length=length, share=share, depth=depth,
                         hidden=hidden if share == "deep" else None,
                         mlp=mlp if share == "deep" else None, init_scale=init_scale,
                         **({"init": init} if init != "normal" else {}))
        L = cfg.n_layers if depth == "deep" else 1
        self.n_prefix_layers = L
        D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
        # [P]'s init: residual vectors ~ N(0, 1) (scaled by init_scale); or the base's own
        # attention inputs at the slots it replaces, so training starts from the base model
        slot = slot_residuals(model, L, length) if init == "slot" else None
        p = slot if slot is not None and share != "deep" else torch.randn(L, length, D, generator=generator) * init_scale
        if share == "simple":
            self.p = nn.Parameter(p)
        elif share == "none":
            # start from the keys/values simple-share would give, then free them
            with torch.no_grad():
                kv = [model.blocks[l].prefix_from_residual(p[l]) for l in range(L)]
            self.k = nn.Parameter(torch.stack([k for k, _ in kv]))  # [L, H, P, Dh]
            self.v = nn.Parameter(torch.stack([v for _, v in kv]))
        else:
            n_mlp = 1 if mlp == "shared" else L
            out = 2 * D * (L if mlp == "shared" else 1)
            self.p = nn.Parameter(p[0] if mlp == "shared" else p)  # [P, D] or [L, P, D]
            self.mlps = nn.ModuleList(
                nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, out)) for _ in range(n_mlp))
            if generator is not None:
                for m in self.mlps:
                    for lin in (m[0], m[2]):
                        nn.init.normal_(lin.weight, std=lin.in_features ** -0.5, generator=generator)
                        nn.init.zeros_(lin.bias)
            if slot is not None:
                # start at the base: g(p') = MLP(p') + the SLOT keys/values, output layer zero
                # (as LoRA's B = 0); the offset is a fixed part of the reparameterization
                for m in self.mlps:
                    nn.init.zeros_(m[2].weight)
                    nn.init.zeros_(m[2].bias)
                with torch.no_grad():
                    kv = [model.blocks[l].prefix_from_residual(slot[l]) for l in range(L)]
                self.register_buffer("kv0", torch.stack([torch.stack(x) for x in kv]))  # [L, 2, H, P, Dh]
        self.shape = (H, Dh)

    @classmethod
    def param_count(cls, model, length: int = 1, share: str = "simple", depth: str = "deep", hidden=None,
                    mlp=None, **opts) -> int:
        cfg = model.cfg
        L, D, P = (cfg.n_layers if depth == "deep" else 1), cfg.d_model, length
        if share == "simple":
            return L * P * D
        if share == "none":
            return 2 * L * cfg.n_heads * P * cfg.d_head
        h = hidden if hidden is not None else 2 * D
        if (mlp or "shared") == "shared":
            return P * D + D * h + h + h * 2 * D * L + 2 * D * L
        return L * (P * D + D * h + h + h * 2 * D + 2 * D)

    @classmethod
    def describe(cls, opts: dict) -> str:
        return (f"prefix ({opts.get('share')}, P={opts.get('length')}"
                + (", shallow" if opts.get("depth") == "shallow" else "") + ")")

    def keys_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per prefixed layer: keys, values [n_heads, P, d_head]."""
        share, L = self.opts["share"], self.n_prefix_layers
        H, Dh = self.shape
        if share == "none":
            return list(self.k.unbind(0)), list(self.v.unbind(0))
        if share == "simple":
            kv = [self.base.blocks[l].prefix_from_residual(self.p[l]) for l in range(L)]
            return [k for k, _ in kv], [v for _, v in kv]
        if self.opts["mlp"] == "shared":
            out = self.mlps[0](self.p)  # [P, L*2*D]
            out = einops.rearrange(out, "p (l two h e) -> l two h p e", l=L, two=2, h=H)
        else:
            out = torch.stack([m(self.p[l]) for l, m in enumerate(self.mlps)])  # [L, P, 2D]
            out = einops.rearrange(out, "l p (two h e) -> l two h p e", two=2, h=H)
        if hasattr(self, "kv0"):
            out = out + self.kv0
        return list(out[:, 0].unbind(0)), list(out[:, 1].unbind(0))

    def state(self) -> MethodState:
        ks, vs = self.keys_values()
        n = self.base.cfg.n_layers
        pad = [None] * (n - len(ks))
        return MethodState(prefix_k=ks + pad, prefix_v=vs + pad)

    def fold(self) -> "Prefix":
        """Explicit keys/values (a No-share prefix with the same outputs): Deep-share after training."""
        ks, vs = self.keys_values()
        folded = Prefix(self.base, length=self.opts["length"], share="none", depth=self.opts["depth"])
        with torch.no_grad():
            folded.k.copy_(torch.stack(ks))
            folded.v.copy_(torch.stack(vs))
        return folded

    def export_layout(self) -> dict[str, torch.Tensor]:
        """docs/architecture.md's layout: `blocks.{l}.prefix_k` / `prefix_v`, each [n_heads, P, d_head]."""
        ks, vs = self.keys_values()
        out = {}
        for l, (k, v) in enumerate(zip(ks, vs)):
            out[f"blocks.{l}.prefix_k"] = k.detach().clone()
            out[f"blocks.{l}.prefix_v"] = v.detach().clone()
        return out
