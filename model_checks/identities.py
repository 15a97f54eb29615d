"""[P]'s §4 identities at one layer, computed from hooked tensors, and the result of a LLaMA check.

For one head, query i, content keys j and prefix slots k = 1..P, with A the pattern without prefix
and A^pt the pattern with it (docs/papers.md §4): prefix mass ``α_i = Σ_k A^pt_ik``; rescaling
``A^pt_ij = (1 − α_i)·A_ij`` on content; bias ``t^pt_i = Σ_k A^pt_ik·v_k + (1 − α_i)·t_i``;
renormalized-pattern drift ``A^pt_ij / (1 − α_i)`` vs ``A_ij``; attention-sink mass on content
position 0. How the tensors are produced (prefix cache, soft prompt, streamed layers) is the
business of `model_checks.check` and `model_checks.soft_check`; the tolerances are explained there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from model_checks.bridge import model_dims
from model_checks.family import FULL, LayerAttention, pattern_by_hand, prefix_visible_upto
from prefixlab_common.attention import js_divergence
from prefixlab_common.jsonsafe import finite_json

TEST_SAMPLE = "TABLE: Fourth Round Qualifying : NEW_ENTRIES_THIS_ROUND : 24 TEXT: Fourth round qualifying had 24 new entries."
RENORM_MIN_CONTENT_MASS = 1e-3
TOLERANCES = {
    "float32": {"rescale": 1e-5, "bias_rel": 1e-4},
    "bfloat16": {"rescale": 4e-2, "bias_rel": 5e-2},
    "float16": {"rescale": 5e-3, "bias_rel": 8e-3},
}


@dataclass
class LayerCheck:
    """The identities of docs/papers.md §4 at one layer, over the requested heads."""

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
    # the layer's attention (`model_checks.family.LayerAttention`) and what of the prefix its queries saw:
    layer_type: str = "full_attention"  # or "sliding_attention"
    window: int | None = None  # sliding layers: keys a query sees, itself included
    prefix_visible: bool = True  # some content query put mass on the prefix (α_i > 0)
    prefix_visible_queries: int = 0  # content queries with α_i > 0 (any head)
    prefix_visible_upto: int = -1  # the last content query with α_i > 0 (−1: none)
    prefix_visible_upto_expected: int = -1  # the same from the causal and window mask alone
    # max |A^pt − softmax(mask(cap(scale·q·k)))| with the prefix's keys as given (`family.pattern_by_hand`);
    # None where the queries were not hooked
    pattern_recon_err: float | None = None


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
        out = finite_json(out)
        json.dumps(out, allow_nan=False)  # fail here, not in the caller, if something is not serializable
        return out

    def table_rows(self) -> list[list[str]]:
        """Rows for a text table; the first row is the header."""
        rows = [["layer", "attention", "prefix seen by", "prefix mass", "sink base", "sink w/ prefix", "rescale err",
                 "bias resid (rel)", "renorm drift", "JS (nats)", "exact?", "ok"]]
        T = len(self.tokens)
        for c in self.checks:
            rows.append([
                str(c.layer), "full" if c.window is None else f"sliding {c.window}",
                f"{c.prefix_visible_queries}/{T} queries", f"{c.prefix_mass_mean:.4f}", f"{c.sink_mass_base:.4f}", f"{c.sink_mass_prefix:.4f}",
                f"{c.rescale_max_err:.2e}", f"{c.bias_rel_residual:.2e}", f"{c.renorm_max_diff:.2e}",
                f"{c.renorm_mean_js:.2e}", "yes" if c.exact_expected else "no",
                "-" if c.passed is None else ("PASS" if c.passed else "FAIL"),
            ])
        return rows


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
                dtype_name: str, rope_shift_error: float = 0.0, pattern_dtype=torch.float32,
                spec: LayerAttention | None = None) -> tuple[LayerCheck, dict]:
    """The §4 identities at one layer from hook activations (batch dim removed).

    pattern_base [H, T, T], pattern_pt [H, T, P+T], z_* [T, H, d], prefix_values [kv, P, d];
    spec: the layer's attention (`model_checks.family.layer_attention`; None: a full layer), for
    the prefix's expected visibility.
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
    js = js_divergence(renorm, A)[usable]
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
        **visibility(alpha, spec, P),
    )
    pats = {(layer, hd): {"with_prefix": Apt[n].to(pattern_dtype).numpy(), "without_prefix": A[n].to(pattern_dtype).numpy()}
            for n, hd in enumerate(heads)}
    return check, pats


def visibility(alpha: torch.Tensor, spec: LayerAttention | None, P: int) -> dict:
    """What of the prefix the content queries saw: `alpha` [heads, T] (a masked slot has exactly 0
    mass after the softmax), against what the layer's causal and window mask allows."""
    T = alpha.shape[-1]
    seen = (alpha > 0).any(0)  # [T]
    where = torch.nonzero(seen).flatten()
    spec = spec or LayerAttention(0, FULL, None, 1.0, None, None, False)
    return {"layer_type": spec.layer_type, "window": spec.window, "prefix_visible": bool(seen.any()),
            "prefix_visible_queries": int(seen.sum()), "prefix_visible_upto": int(where.max()) if len(where) else -1,
            "prefix_visible_upto_expected": prefix_visible_upto(spec, P, T)}


def pattern_recon_error(spec: LayerAttention, pattern_pt: torch.Tensor, q: torch.Tensor, content_keys: torch.Tensor,
                        prefix_keys: torch.Tensor) -> float:
    """max |A^pt − `family.pattern_by_hand`| over the layer's heads: the with-prefix pattern recomputed
    from the hooked post-rotary queries q [T, H, d], the prefix's cache keys as given [kv, P, d] and the
    content's post-rotary keys [T, kv, d] with the family's scale, soft-cap and window."""
    P = prefix_keys.shape[1]
    keys = torch.cat([prefix_keys.double(), content_keys.double().permute(1, 0, 2)], 1)
    return float((pattern_by_hand(spec, q, keys, P) - pattern_pt.double()).abs().max())


def check_result(name, config, dtype_name, pre, prefix, adapter, text, tokens, layers, heads, seed, stream, rope_err,
                 checks, losses, patterns, timings) -> LlamaCheckResult:
    """The result of a prefix check (`pre`: the `CachePrefix` checked); the soft-prompt check adjusts its source fields."""
    n_layers, n_heads, kv, d_head = model_dims(config)
    source = f"peft:{adapter}" if adapter is not None else prefix
    P = pre.prefix_len
    return LlamaCheckResult(
        model=name, model_type=config.model_type, n_layers=n_layers, n_heads=n_heads, n_kv_heads=kv, d_head=d_head,
        dtype=dtype_name, prefix_source=source, prefix_len=P, text=text, tokens=tokens, layers=layers, heads=heads,
        seed=seed, stream=stream, positions=f"prefix = cache slots 0..{P - 1}; content at positions {P}..{P + len(tokens) - 1} (HF cache convention)",
        rope_shift_error=rope_err, tolerance=dict(TOLERANCES[dtype_name]), checks=checks, train_losses=losses,
        timings=timings, patterns=patterns,
    )
