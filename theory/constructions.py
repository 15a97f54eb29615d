"""The single-virtual-token constructions of [P] §3 (docs/papers.md §5), built as the lab's own
(One file: Theorems 1 and 2 and the capacity count share one `Layout` and the same generation
helpers; apart, each file would re-derive them.)

`ToyTransformer` with hand-set weights, so hooks, caches and probes work on them unchanged.

**Theorem 1.** One attention layer with two heads and a three-layer MLP generates *any*
Y ∈ [V]^N from one virtual token (a soft prompt of length 1), whereas a hard token selects at
most V continuations. Layout: the virtual token sits in the single prompt slot (position 0), the
content is the start token `START_TOKEN` followed by what was generated; content position
1 + j predicts Y_{j+1}. Tokens are 0-based, so the virtual token carries y_j / V.

Residual stream (one block of coordinates per role; `Layout` holds the offsets):
  content  V   one-hot of the content token (W_E); Theorem 1 reads nothing of it and drops it by
               default (tokens embed to 0; `content_onehot=True` keeps [P]'s content ⊕ position)
  coords   K   the virtual token's payload u = (y_1/V, ..., y_K/V)   (K = N, or V for Thm 2)
  flag     1   1 on the virtual token only: the key of the copying head
  pos      C   one-hot position (W_pos)                               (C = n_ctx)
  one      1   constant 1 at every position (W_pos): the query of the copying head, MLP "biases"
  copy     K   head 0's output: the payload, copied from the slot to every position
  read     R   head 1's output: the one-hot position (Thm 1) or content token (Thm 2) it reads
  z, c     2   MLP output: the extracted coordinate z and a constant c
  null     1   written by nothing; LayerNorm readers put their mean-compensation weight here

Mapping [P]'s architecture onto the class:
- **Heads** (`ln_before_attn=False`, so attention reads the raw residual): head 0 scores β on the
  flag (query = `one`) and copies `coords`; head 1 scores β on its own position (query and key
  = `pos`) and copies `pos` (Thm 1) or `content` (Thm 2). β is the inverse temperature.
- **Three-layer MLP** = W_in → GELU → W_out → (ln_final) → W_U. Unit i computes
  GELU(λ (copy_i + 1 + M (read_{g(i)} − 1))), which is λ (u_i + 1) on the unit whose gate g(i)
  matches (position 1 + i, or the token i) and far below 0 elsewhere; a constant unit computes
  λ·1. W_out sums z = Σ_i unit_i/λ − const/λ = u_{g⁻¹} and c = const/λ = 1. W_U decodes
  logit_v = 2·V·v·z − v²·c = V²·(2 z v/V − (v/V)²), i.e. argmax_v −(z − v/V)².
- **LayerNorms** (ln2, ln_final, left at weight 1, bias 0): every column of W_in and W_U sums to
  zero (its compensation weight sits on `null`, which is always 0), so the mean subtraction is
  invisible to them; what is left is division by the position's RMS, a positive scalar s. The
  MLP has no biases (its constants come from `one`) and the decode compares z against the
  constant c computed by the same MLP, so s multiplies z and c alike and cancels from the argmax.
- **GELU instead of ReLU**: the units are offset by +1 and scaled by λ (`GELU_SCALE`), so every
  pre-activation is ≥ ~λ/2 or ≤ −λ: there GELU(x) equals ReLU(x) to below fp32 resolution
  (x·Φ(−x) < 1e-300 at |x| ≥ 40), and GELU is positively homogeneous like ReLU.
- What is left approximate is the softness of the heads: the copy carries weight a < 1 and the
  gate leaks M·(1 − b); z = a·u − M(1 − b), which is why β must be large. `min_beta` measures how
  large. Worst case (y = V − 1 at the last position p = N): greedy rounds z·V down to y − 1
  once N(u + M)/(e^β + N) > 1/(2V), i.e. β < ln(N(2V(M + 1) − 3)) (`predicted_min_beta`).

**Theorem 2.** Context 2 (slot + one input token): the virtual token carries (m(0)/V, ...,
m(V−1)/V) and head 1 reads the input token instead of the position, so the same MLP extracts
m(x). Embedding size here is 3V + 7 (rounded to even) rather than [P]'s V, because the class adds
the residual instead of concatenating and we keep one-hot content next to the payload.

Greedy generation from the virtual token reproduces Y iff, teacher-forced on Y, every position's
argmax is the next y (the prefix the model sees is the same): `min_beta`'s bisection uses that
single forward per β, and confirms the result with real `generate`.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyConfig, ToyTransformer

DEFAULT_BETA = 50.0  # [P]: "large inverse temperature (≈50) makes the heads hard"
GELU_SCALE = 100.0  # λ: keeps every MLP pre-activation far from GELU's curved region
GATE_MARGIN = 4.0  # M: an unmatched gate pushes its unit to ≤ λ·(2 − M) < 0
START_TOKEN = 0  # content starts with it; Theorem 1's output does not depend on content
ASCII_FIRST, ASCII_LAST = 32, 126  # text alphabet: the 95 printable ASCII characters, space included
TEXT_V = ASCII_LAST - ASCII_FIRST + 1
MAX_V, MAX_N = 4096, 4096  # guards against accidental giant models


# ----------------------------------------------------------------------------------------------
# the layout and the builder


@dataclass(frozen=True)
class Layout:
    """Where each role lives in the residual stream of a construction (see module docstring)."""

    theorem: int  # 1: gate by position; 2: gate by content token
    V: int  # vocabulary (output alphabet) size
    K: int  # number of payload coordinates the virtual token carries (N, or V for Theorem 2)
    n_ctx: int
    beta: float
    gelu_scale: float = GELU_SCALE
    gate_margin: float = GATE_MARGIN
    content_onehot: bool = True  # False: W_E = 0 (Theorem 1 never reads the content)

    @property
    def R(self) -> int:  # width of head 1's read-out
        return self.n_ctx if self.theorem == 1 else self.V

    @property
    def offsets(self) -> dict[str, int]:
        sizes = [("content", self.V if self.content_onehot else 0), ("coords", self.K), ("flag", 1), ("pos", self.n_ctx),
                 ("one", 1), ("copy", self.K), ("read", self.R), ("z", 1), ("c", 1), ("null", 1)]
        out, at = {}, 0
        for name, size in sizes:
            out[name] = at
            at += size
        out["_end"] = at
        return out

    @property
    def d_model(self) -> int:
        need = max(self.offsets["_end"], 2 * max(self.K, self.R))  # d_head holds each head's values
        return need + need % 2  # two heads

    def gate(self, i: int) -> int:
        """Index in `read` that opens unit i: position 1 + i (Thm 1) or token i (Thm 2)."""
        return 1 + i if self.theorem == 1 else i

    def config(self) -> ToyConfig:
        return ToyConfig(n_layers=1, n_heads=2, d_model=self.d_model, d_vocab=self.V, n_ctx=self.n_ctx,
                         n_prompt=1, d_mlp=self.K + 1, dropout=0.0, ln_before_attn=False)

    def to_json(self) -> dict:
        return {**asdict(self), "d_model": self.d_model, "d_mlp": self.K + 1}


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise UserError(f"beta must be a finite number >= 0, got {beta!r}")
    return float(beta)


def _check_V(V: int) -> None:
    if not isinstance(V, int) or not 2 <= V <= MAX_V:
        raise UserError(f"V must be an integer in 2..{MAX_V}, got {V!r}")


@torch.no_grad()
def _build(layout: Layout) -> ToyTransformer:
    o, L = layout.offsets, layout
    model = ToyTransformer(layout.config()).eval()
    for p in model.parameters():
        p.zero_()
    D, Dh = layout.d_model, model.cfg.d_head
    q_scale = L.beta * math.sqrt(Dh)  # the model divides scores by sqrt(d_head)

    if L.content_onehot:
        model.embed.W_E[torch.arange(L.V), o["content"] + torch.arange(L.V)] = 1.0
    model.pos_embed.W_pos[torch.arange(L.n_ctx), o["pos"] + torch.arange(L.n_ctx)] = 1.0
    model.pos_embed.W_pos[:, o["one"]] = 1.0

    attn = model.blocks[0].attn
    # head 0: every query scores beta on the flagged slot and copies its payload
    attn.W_Q[0, o["one"], 0] = q_scale
    attn.W_K[0, o["flag"], 0] = 1.0
    attn.W_V[0, o["coords"] + torch.arange(L.K), torch.arange(L.K)] = 1.0
    attn.W_O[0, torch.arange(L.K), o["copy"] + torch.arange(L.K)] = 1.0
    # head 1: every query scores beta on its own position and reads the position or the token
    attn.W_Q[1, o["pos"] + torch.arange(L.n_ctx), torch.arange(L.n_ctx)] = q_scale
    attn.W_K[1, o["pos"] + torch.arange(L.n_ctx), torch.arange(L.n_ctx)] = 1.0
    src = o["pos"] if L.theorem == 1 else o["content"]
    attn.W_V[1, src + torch.arange(L.R), torch.arange(L.R)] = 1.0
    attn.W_O[1, torch.arange(L.R), o["read"] + torch.arange(L.R)] = 1.0

    mlp, lam, M = model.blocks[0].mlp, L.gelu_scale, L.gate_margin
    for i in range(L.K):  # unit i: lam * (copy_i + 1 + M * (read_gate - 1))
        mlp.W_in[o["copy"] + i, i] = lam
        mlp.W_in[o["read"] + L.gate(i), i] = lam * M
        mlp.W_in[o["one"], i] = lam * (1.0 - M)
    mlp.W_in[o["one"], L.K] = lam  # the constant unit
    mlp.W_in[o["null"]] = -mlp.W_in.sum(0)  # columns orthogonal to all-ones: LN's mean is invisible
    mlp.W_out[: L.K, o["z"]] = 1.0 / lam
    mlp.W_out[L.K, o["z"]] = -1.0 / lam  # remove the +1 offset
    mlp.W_out[L.K, o["c"]] = 1.0 / lam

    v = torch.arange(L.V, dtype=torch.float32)
    model.unembed.W_U[o["z"]] = 2.0 * L.V * v  # logit_v = V^2 (2 z v/V - (v/V)^2)
    model.unembed.W_U[o["c"]] = -v * v
    model.unembed.W_U[o["null"]] = -model.unembed.W_U.sum(0)
    for ln in (model.blocks[0].ln2, model.ln_final):
        ln.w.fill_(1.0)
        ln.b.zero_()
    model.construction = layout  # what thm1_virtual_token / thm2_virtual_token read
    return model


def build_thm1_model(V: int, N: int, beta: float = DEFAULT_BETA, n_ctx: int | None = None,
                     content_onehot: bool = False) -> ToyTransformer:
    """[P] Theorem 1's transformer for targets in [V]^N, as a `ToyTransformer` (eval mode).
    n_ctx defaults to N + 1 (slot + start token + N − 1 fed-back tokens). The output never
    depends on the content, so by default tokens embed to 0 (d_model ≈ 4N + 7 instead of
    V + 4N + 7, ~4x fewer FLOPs at V=94, N=20); `content_onehot=True` adds [P]'s one-hot content."""
    _check_V(V)
    if not isinstance(N, int) or not 1 <= N <= MAX_N:
        raise UserError(f"N must be an integer in 1..{MAX_N}, got {N!r}")
    n_ctx = N + 1 if n_ctx is None else n_ctx
    if not isinstance(n_ctx, int) or n_ctx < 2:
        raise UserError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
    if N > n_ctx - 1:
        raise UserError(f"N={N} is larger than the context allows: generating N tokens needs "
                        f"n_ctx >= N + 1 = {N + 1}, got n_ctx={n_ctx}")
    return _build(Layout(theorem=1, V=V, K=N, n_ctx=n_ctx, beta=_check_beta(beta),
                         content_onehot=content_onehot))


def build_thm2_model(V: int, beta: float = DEFAULT_BETA) -> ToyTransformer:
    """[P] Theorem 2's transformer: context 2 (slot + input token), realises any m: [V] -> [V]."""
    _check_V(V)
    return _build(Layout(theorem=2, V=V, K=V, n_ctx=2, beta=_check_beta(beta)))


def _layout_of(model_or_layout, theorem: int) -> Layout:
    layout = model_or_layout if isinstance(model_or_layout, Layout) \
        else getattr(model_or_layout, "construction", None)
    if not isinstance(layout, Layout) or layout.theorem != theorem:
        raise UserError(f"expected a Theorem {theorem} model from build_thm{theorem}_model "
                        f"(or its Layout), got {type(model_or_layout).__name__}")
    return layout


def _payload_token(layout: Layout, values: Tensor) -> Tensor:
    """Virtual token(s) [..., 1, d_model] carrying values [..., K] (integers in [V])."""
    o = layout.offsets
    tok = torch.zeros(*values.shape[:-1], 1, layout.d_model)
    tok[..., 0, o["coords"]:o["coords"] + values.shape[-1]] = values.float() / layout.V
    tok[..., 0, o["flag"]] = 1.0
    return tok


def _as_targets(Y, V: int, max_len: int, what: str) -> Tensor:
    t = torch.as_tensor(Y)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise UserError(f"{what} must hold integers, got dtype {t.dtype}")
    if t.ndim not in (1, 2) or t.shape[-1] == 0:
        raise UserError(f"{what} must be a non-empty sequence (or a batch of them), got shape {tuple(t.shape)}")
    if t.shape[-1] > max_len:
        raise UserError(f"{what} has length {t.shape[-1]}, larger than the model's N={max_len} "
                        f"(build the model with N >= {t.shape[-1]})")
    if t.numel() and (t.min() < 0 or t.max() >= V):
        bad = t[(t < 0) | (t >= V)][0].item()
        raise UserError(f"{what} holds {bad}, outside the vocabulary 0..{V - 1}")
    return t.long()


def thm1_virtual_token(model_or_layout: ToyTransformer | Layout, Y) -> Tensor:
    """The single virtual token for target(s) Y ([L] or [batch, L], L <= N, values in [V]):
    [1, d_model] or [batch, 1, d_model], ready for `MethodState(prompt=...)`. Coordinates beyond
    L stay 0 (they would generate token 0)."""
    layout = _layout_of(model_or_layout, 1)
    return _payload_token(layout, _as_targets(Y, layout.V, layout.K, "target Y"))


def thm2_virtual_token(model_or_layout: ToyTransformer | Layout, mapping) -> Tensor:
    """The single virtual token realising m ([V] or [batch, V] with m[x] in [V]): [.., 1, d_model]."""
    layout = _layout_of(model_or_layout, 2)
    m = _as_targets(mapping, layout.V, layout.V, "map")
    if m.shape[-1] != layout.V:
        raise UserError(f"a map over V={layout.V} tokens needs {layout.V} values, got {m.shape[-1]}")
    return _payload_token(layout, m)


# ----------------------------------------------------------------------------------------------
# Theorem 1 checks


def _random_targets(V: int, N: int, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, N), generator=g)


@torch.no_grad()
def _generate_targets(model: ToyTransformer, targets: Tensor, batch_size: int = 2000) -> Tensor:
    """Greedy generation of len(Y) tokens from each target's virtual token: [n, L]."""
    out = []
    for i in range(0, targets.shape[0], batch_size):
        Y = targets[i:i + batch_size]
        start = torch.full((Y.shape[0], 1), START_TOKEN, dtype=torch.long)
        out.append(model.generate(start, Y.shape[1], MethodState(prompt=thm1_virtual_token(model, Y))))
    return torch.cat(out)


@torch.no_grad()
def _teacher_forced_ok(model: ToyTransformer, targets: Tensor, batch_size: int = 4000) -> Tensor:
    """Per target, whether every teacher-forced argmax equals the next y (<=> greedy reproduces Y)."""
    ok = []
    for i in range(0, targets.shape[0], batch_size):
        Y = targets[i:i + batch_size]
        start = torch.full((Y.shape[0], 1), START_TOKEN, dtype=torch.long)
        content = torch.cat([start, Y[:, :-1]], dim=1)
        logits = model.content_logits(content, MethodState(prompt=thm1_virtual_token(model, Y)))
        ok.append((logits.argmax(-1) == Y).all(-1))
    return torch.cat(ok)


def _bisect_beta(all_ok, lo: float, hi: float, tol: float) -> float | None:
    """Smallest beta in [lo, hi] (to tol) with all_ok(beta), assuming success is monotone in beta."""
    if not all_ok(hi):
        return None
    if all_ok(lo):
        return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if all_ok(mid) else (mid, hi)
    return hi


def predicted_min_beta(V: int, N: int, gate_margin: float = GATE_MARGIN) -> float:
    """Closed-form threshold of this construction for the worst target (y_N = V − 1): at query
    position p the copy weight misses p/(e^β + p) and the gate leaks M·p/(e^β + p), so z·V falls
    short of y by p(y + MV)/(e^β + p), which must stay below 1/2."""
    return math.log(N * (2 * (V - 1 + gate_margin * V) - 1))


def min_beta(V: int, N: int, n_targets: int = 1000, seed: int = 0, lo: float = 0.0,
             hi: float = 64.0, tol: float = 0.01, targets: Tensor | None = None) -> float | None:
    """Smallest inverse temperature (bisection on [lo, hi] to `tol`) at which greedy generation
    reproduces every one of `n_targets` random targets in [V]^N (or the given `targets`); None
    if even `hi` fails. Found with teacher forcing, then confirmed with real generation."""
    _check_V(V)
    targets = _random_targets(V, N, _check_count(n_targets, "n_targets"), seed) if targets is None else targets
    found = _bisect_beta(lambda b: bool(_teacher_forced_ok(build_thm1_model(V, N, b), targets).all()),
                         _check_beta(lo), _check_beta(hi), tol)
    # confirm with the real decoding loop; step up if its rounding disagrees with teacher forcing
    while found is not None and not bool(
            (_generate_targets(build_thm1_model(V, N, found), targets) == targets).all()):
        found = found + tol if found + tol <= hi else None
    return found


def _check_count(n: int, name: str) -> int:
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{name} must be a positive integer, got {n!r}")
    return n


@dataclass
class Thm1Check:
    V: int
    N: int
    beta: float
    n_targets: int
    n_success: int
    failures: list[dict]  # up to 5: {"target": [...], "generated": [...]}
    min_beta: float | None  # None when not searched (or even the search's top failed)
    seconds: float  # the generation check only
    min_beta_seconds: float = 0.0
    layout: dict = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.n_success / self.n_targets

    def to_json(self) -> dict:
        return {"theorem": 1, "V": self.V, "N": self.N, "beta": self.beta, "n_targets": self.n_targets,
                "n_success": self.n_success, "success_rate": self.success_rate,
                "all_exact": self.n_success == self.n_targets, "failures": self.failures,
                "min_beta": self.min_beta, "predicted_min_beta_worst_case": predicted_min_beta(self.V, self.N),
                "seconds": round(self.seconds, 4),
                "min_beta_seconds": round(self.min_beta_seconds, 4), "model": self.layout}


def thm1_check(V: int, N: int, n_targets: int = 1000, seed: int = 0, beta: float = DEFAULT_BETA,
               search_beta: bool = True) -> Thm1Check:
    """Build Theorem 1's model, draw `n_targets` uniform targets in [V]^N (seeded), greedily
    generate each from its virtual token and count exact reproductions; with `search_beta`, also
    the smallest beta at which all of these targets succeed (`min_beta`)."""
    model = build_thm1_model(V, N, beta)
    targets = _random_targets(V, N, _check_count(n_targets, "n_targets"), seed)
    t0 = time.perf_counter()
    generated = _generate_targets(model, targets)
    seconds = time.perf_counter() - t0
    ok = (generated == targets).all(-1)
    bad = (~ok).nonzero().flatten()[:5].tolist()
    failures = [{"target": targets[i].tolist(), "generated": generated[i].tolist()} for i in bad]
    t1 = time.perf_counter()
    mb = min_beta(V, N, targets=targets) if search_beta else None
    return Thm1Check(V, N, float(beta), n_targets, int(ok.sum()), failures, mb, seconds,
                     time.perf_counter() - t1 if search_beta else 0.0, model.construction.to_json())


# ----------------------------------------------------------------------------------------------
# text over printable ASCII


def encode_text(text: str) -> list[int]:
    """Printable ASCII (32 ' ' .. 126 '~', V = 95) -> tokens 0..94. Anything else is a UserError."""
    if not isinstance(text, str) or not text:
        raise UserError("text must be a non-empty string of printable ASCII characters")
    for i, ch in enumerate(text):
        if not ASCII_FIRST <= ord(ch) <= ASCII_LAST:
            raise UserError(f"character {ch!r} (U+{ord(ch):04X}) at index {i} is outside the alphabet: "
                            f"only printable ASCII ' '..'~' (codes 32-126) can be encoded")
    return [ord(ch) - ASCII_FIRST for ch in text]


def decode_text(tokens: list[int]) -> str:
    return "".join(chr(t + ASCII_FIRST) for t in tokens)


@dataclass
class Thm1Text:
    text: str
    generated: str
    exact: bool
    beta: float
    V: int
    N: int
    virtual_token: Tensor  # [1, d_model]

    def to_json(self) -> dict:
        return {"theorem": 1, "text": self.text, "generated": self.generated, "exact": self.exact,
                "verdict": "exact" if self.exact else "mismatch", "beta": self.beta, "V": self.V,
                "N": self.N, "alphabet": "printable ASCII 32..126 (space included), token = code - 32",
                "virtual_token_nonzero": {str(i): round(v, 6) for i, v in
                                          enumerate(self.virtual_token[0].tolist()) if v}}


def thm1_text(text: str, beta: float | None = None) -> Thm1Text:
    """Encode `text` over the 95 printable ASCII characters (V = 95, space included, since
    [P]'s "94 printable" would reject "I love transformers!"), compute its single virtual token
    for a Theorem 1 model with N = len(text), generate greedily and decode."""
    Y = encode_text(text)
    beta = DEFAULT_BETA if beta is None else beta
    model = build_thm1_model(TEXT_V, len(Y), beta)
    token = thm1_virtual_token(model, Y)
    start = torch.full((1, 1), START_TOKEN, dtype=torch.long)
    out = model.generate(start, len(Y), MethodState(prompt=token))[0].tolist()
    generated = decode_text(out)
    return Thm1Text(text, generated, generated == text, float(beta), TEXT_V, len(Y), token)


# ----------------------------------------------------------------------------------------------
# Theorem 2


def parse_map(text: str, V: int | None = None) -> list[int]:
    """A map m: [V] -> [V] from the command line, in one of two forms:
    - values in input order: "1,0,2" means m(0)=1, m(1)=0, m(2)=2;
    - explicit pairs "x:m(x)": "0:1,1:0,2:2", in any order, every input 0..V-1 exactly once.
    V defaults to the number of entries. Spaces are ignored."""
    if not isinstance(text, str) or not text.strip():
        raise UserError('empty map: give values like "1,0,2" or pairs like "0:1,1:0,2:2"')
    items = [s.strip() for s in text.replace(" ", "").split(",")]
    pairs = [":" in s for s in items]
    if any(pairs) and not all(pairs):
        raise UserError(f'map {text!r} mixes "x:y" pairs and plain values; use one form')
    num = re.compile(r"^\d+$")
    if all(pairs):
        out: dict[int, int] = {}
        for s in items:
            a, _, b = s.partition(":")
            if not (num.match(a) and num.match(b)):
                raise UserError(f'bad map entry {s!r}: expected "input:output" with non-negative integers')
            if int(a) in out:
                raise UserError(f"map gives input {int(a)} twice")
            out[int(a)] = int(b)
        n = len(out) if V is None else V
        missing = sorted(set(range(n)) - set(out))
        extra = sorted(set(out) - set(range(n)))
        if extra:
            raise UserError(f"map input {extra[0]} is outside 0..{n - 1}")
        if missing:
            raise UserError(f"map has no output for input {missing[0]} (every input 0..{n - 1} needs one)")
        values = [out[i] for i in range(n)]
    else:
        for s in items:
            if not num.match(s):
                raise UserError(f'bad map value {s!r}: expected non-negative integers like "1,0,2"')
        values = [int(s) for s in items]
    return check_map(values, len(values) if V is None else V)


def check_map(mapping: list[int], V: int) -> list[int]:
    _check_V(V)
    if len(mapping) != V:
        raise UserError(f"a map over V={V} tokens needs {V} values, got {len(mapping)}")
    for x, y in enumerate(mapping):
        if not isinstance(y, int) or not 0 <= y < V:
            raise UserError(f"map sends {x} to {y!r}, outside 0..{V - 1}")
    return list(mapping)


@dataclass
class Thm2Check:
    V: int
    beta: float
    n_maps: int
    n_exact_maps: int
    n_correct_outputs: int  # over n_maps * V inputs
    failures: list[dict]  # up to 5: {"map": [...], "outputs": [...]}
    seconds: float

    def to_json(self) -> dict:
        return {"theorem": 2, "V": self.V, "beta": self.beta, "n_maps": self.n_maps,
                "n_exact_maps": self.n_exact_maps, "success_rate": self.n_exact_maps / self.n_maps,
                "all_exact": self.n_exact_maps == self.n_maps,
                "output_accuracy": self.n_correct_outputs / (self.n_maps * self.V),
                "failures": self.failures, "seconds": round(self.seconds, 4)}


@torch.no_grad()
def thm2_check(V: int, mapping: list[int] | None = None, n_maps: int = 100, seed: int = 0,
               beta: float = DEFAULT_BETA) -> Thm2Check:
    """For the given map (or `n_maps` uniformly random maps [V] -> [V], seeded), feed every input
    x after the map's virtual token and check that the greedy output is m(x)."""
    model = build_thm2_model(V, beta)
    if mapping is not None:
        maps = torch.tensor([check_map(list(mapping), V)])
    else:
        g = torch.Generator().manual_seed(seed)
        maps = torch.randint(0, V, (_check_count(n_maps, "n_maps"), V), generator=g)
    t0 = time.perf_counter()
    outs = []
    chunk = max(1, 20000 // V)
    for i in range(0, maps.shape[0], chunk):
        m = maps[i:i + chunk]  # [B, V]
        prompt = thm2_virtual_token(model, m).repeat_interleave(V, dim=0)  # [B*V, 1, d]
        x = torch.arange(V).repeat(m.shape[0]).unsqueeze(1)  # [B*V, 1]
        outs.append(model.generate(x, 1, MethodState(prompt=prompt)).view(m.shape[0], V))
    out = torch.cat(outs)
    seconds = time.perf_counter() - t0
    exact = (out == maps).all(-1)
    bad = (~exact).nonzero().flatten()[:5].tolist()
    return Thm2Check(V, float(beta), maps.shape[0], int(exact.sum()), int((out == maps).sum()),
                     [{"map": maps[i].tolist(), "outputs": out[i].tolist()} for i in bad], seconds)


# ----------------------------------------------------------------------------------------------
# capacity: distinct completions from hard vs virtual first tokens


def capacity_model(seed: int = 0, d_vocab: int = 32, d_model: int = 64, n_layers: int = 2,
                   n_heads: int = 4, n_ctx: int = 16, init_std: float = 0.3) -> ToyTransformer:
    """A small random ToyTransformer (weights N(0, init_std²): at the default 0.02 a random model
    is nearly constant, which would make any count trivially 1)."""
    cfg = ToyConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_vocab=d_vocab,
                    n_ctx=n_ctx, n_prompt=1, dropout=0.0, init_std=init_std)
    model = ToyTransformer(cfg)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return model.eval()


@dataclass
class CapacityCount:
    k: int
    n_hard: int
    hard_distinct: int  # distinct completions from the V hard first tokens (<= V)
    n_virtual: int
    virtual_distinct: int  # distinct completions from the n_virtual random virtual tokens
    prompt_scale: float
    model: dict

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def capacity_count(model: ToyTransformer | None = None, k: int = 10, n_virtual: int = 10000,
                   seed: int = 0, prompt_scale: float = 1.0, batch_size: int = 5000) -> CapacityCount:
    """[P] §3's count on a small model: distinct greedy k-token completions (after START_TOKEN)
    from each of the V hard first tokens (the slot holds W_E[t]) against from `n_virtual` random
    virtual tokens N(0, (prompt_scale · std(W_E))²) per coordinate."""
    model = capacity_model(seed) if model is None else model.eval()
    cfg = model.cfg
    _check_count(k, "k")
    if cfg.n_prompt < 1 or cfg.n_prompt + 1 + k - 1 > cfg.n_ctx:
        raise UserError(f"k={k} does not fit the model's context (n_ctx={cfg.n_ctx}, "
                        f"{cfg.n_prompt} prompt slots): need k <= {cfg.n_ctx - cfg.n_prompt}")

    def completions(prompts: Tensor) -> set[tuple[int, ...]]:
        seen = set()
        for i in range(0, prompts.shape[0], batch_size):
            p = prompts[i:i + batch_size]
            start = torch.full((p.shape[0], 1), START_TOKEN, dtype=torch.long)
            seen.update(map(tuple, model.generate(start, k, MethodState(prompt=p)).tolist()))
        return seen

    W_E = model.embed.W_E
    hard = completions(W_E.unsqueeze(1))
    g = torch.Generator().manual_seed(seed + 1)
    virtual = torch.randn(_check_count(n_virtual, "n_virtual"), 1, cfg.d_model, generator=g) \
        * (prompt_scale * W_E.std().item())
    soft = completions(virtual)
    return CapacityCount(k, cfg.d_vocab, len(hard), n_virtual, len(soft), prompt_scale, cfg.to_dict())
