"""Reparameterization and sample efficiency: the prefix-as-MoE regression study (docs/papers.md §6, [L]).
The regression model, the Voronoi cells, the certified fits and the study loop are one study whose
parts are only used together; its statistics and verdict rule are in theory/reparam_stats.py, its
figures in reports/theory_figures.py.

What [L]'s theorems say, and how this study tests it (docs/papers.md §6, §6b)
---------------------------------------------------------------------------
One attention row is a softmax-gated mixture of experts. Over-specified least squares (more
fitted prompts than true ones) estimates the regression function f at ~n^{-1/2} with any
parameterization, but the *parameters*, measured by the Voronoi loss D, behave differently:
with a known shared map (p^K = W_1 p, p^V = W_2 p, or σ(W_1 p), σ(W_2 p)) D ~ n^{-1/2} in every
cell (atoms in a multi-atom cell at distance ~n^{-1/4}, and D squares those distances); without
sharing, a cell holding two fitted atoms has a flat direction and no polynomial rate. The flat
direction is a valley of exact fits: No-share's expert is constant and linear in p^V, so two atoms
on the true key with values v* ± t e and half the true mass each give f = f* for every t, while
D = e^{c*} t² grows; a shared map ties the value to the key and forbids it. So the study
(i) fixes the maps to the true ones, (ii) starts every fit near the truth with one true atom split
into two fitted atoms, so a multi-atom cell exists, (iii) also starts on the valley at two spreads
t, (iv) uses small noise so that n = 10³…10⁵ is asymptotic, (v) certifies every fit (training
loss <= the loss at the true parameters), (vi) measures the risk E[D] (arithmetic mean), the share
of replicates far from the truth, and identifiability (D_max over the starts that the data cannot
tell apart), per cell type, over two truths, and (vii) fits a control with exactly as many atoms
as the truth (no multi-atom cell, no valley), where No-share should recover n^{-1/2}.

The model (one attention row read as a mixture of experts)
------------------------------------------------------------
An input X holds N content tokens x_1..x_N in R^d; the query is x_1. The content positions are
pretrained experts with known parameters, f_j(X) = W_V x_j with gate s_j = x_1ᵀ W_Q W_Kᵀ x_j/√d,
and each of the L prefix slots is a prompt expert with constant output p^V_l and linear gate
g_l = x_1ᵀ W_Q W_Kᵀ p^K_l/√d + c_l (c_l: the gate bias, mass e^{c_l} of [L]'s mixing measure
G = Σ_l e^{c_l} δ_{(p^K_l, p^V_l)}). With u = W_K W_Qᵀ x_1/√d, log Z = logsumexp_j s_j and the
content mean m = Σ_j softmax(s)_j W_V x_j (`gate_features`, computed once per sample),

    f_G(X) = (m + Σ_l e^{h_l} p^V_l) / (1 + Σ_l e^{h_l}),   h_l = uᵀp^K_l + c_l − log Z,

and Y = f_{G*}(X) + N(0, noise_sd² I). W_Q W_Kᵀ, W_1, W_2 are random orthogonal matrices
(well conditioned, so the shared maps are injective), W_V ~ N(0, 1/d), the L* true vectors
p* ~ N(0, I) are redrawn until the true atoms are >= 0.5 apart, c* ~ U(0, 1). Everything is drawn
once from a truth's base seed and shared by every n and replicate of that truth.

The fitted parameterizations (L = L* + extra atoms, over-specified; the maps are known)
------------------------------------------------------------------------------------------
- "shared-linear": p^K_l = W_1 p_l, p^V_l = W_2 p_l, free p_l and c_l; data from the linear truth;
- "shared-tanh":   p^K_l = tanh(W_1 p_l), p^V_l = tanh(W_2 p_l); data from the tanh truth;
- "no-share":      p^K_l, p^V_l and c_l free; data from the linear truth (same data as
  shared-linear, and the same effective split start, so the map is the only difference);
- control "no-share-exact": No-share with L = L* atoms on the same data.

Atoms and cells
---------------
Every model is compared in the space of effective pairs, θ_l = (p^K_l, p^V_l) ∈ R^{2d}, mass
e^{c_l} (with orthogonal W's, distances in p and in θ agree up to the map's conditioning). Cells
A_j = {l : θ_l nearest to θ*_j}; [L]'s loss (docs/papers.md §6) is D = Σ_j D_j with

    D_j = Σ_{l∈A_j} e^{c_l}‖θ_l − θ*_j‖^{2 if |A_j|>1 else 1} + |Σ_{l∈A_j} e^{c_l} − e^{c*_j}|.

D is split per fit into the multi-atom cells (|A_j| > 1, "split-cell D") and the singleton cells;
`dist_multi` is the largest ‖θ_l − θ*_j‖ in a multi-atom cell (theory: ~n^{-1/4} when shared).

Fitting (certified), and the valley starts
------------------------------------------
Start s = 0..restarts−2 is the truth with true atom 0 split: fitted atom l < L* starts at p*_l,
the extra atoms at p*_0, each p perturbed by init_scale·N(0, I) (no-share starts from
shared-linear's effective pairs), masses of a split atom shared equally; the last start is random.
Each fit is Levenberg–Marquardt (Gauss–Newton with Marquardt damping, per replicate) on the mean
squared error, with the Jacobian written by hand; replicates are a batch dimension, independent
problems. A fit is certified when its training loss <= (1 + cert_rtol)·(loss at the true
parameters); a replicate that is not is refitted from the next start, and one that no start
certifies is counted as failed, reported, and left out of every statistic. The split-start fit is
the estimate whose D, share and risk are reported. Each replicate is also fitted from one valley
start per spread t in `valley_spreads` (`valley_start`): No-share exactly on the valley (the copies
of true atom 0 on its key, values v*_0 ± t e, e a seeded unit vector); the shared models at
p*_0 ± t W_2ᵀe (their values spread the same way, the keys move with them). D_max of a replicate
is the largest split-cell D among its certified endpoints whose residual sum of squares is within
`near_best`·σ² of the best endpoint's; a replicate is non-identified when D_max > `threshold`.

Statistics, checks, verdict
---------------------------
theory/reparam_stats.py: arithmetic means with log-log slopes, shares with Wilson intervals and
trends per decade, medians of D_max, each with a bootstrap interval, pooled over the truths; the
geometric-mean slopes stay in `slopes` as a description only (they weight every replicate's
logarithm alike and hide a minority that stays far). Seeds come from
numpy's SeedSequence over (base seed, purpose, n, replicate[, start]). Every fit's masses,
parameters, cells and endpoints go to the JSON, with D after 1/4 and 1/2 of the iteration budget
(`diagnostics`: the drift of D_multi shows a fit still sliding along a flat direction).
`table_row` turns a result into the paper-vs-lab row with `reparam_stats.judge`; docs/reparam.md
has the rule and the measured numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from prefixlab_common.errors import UserError
from prefixlab_common.jsonsafe import finite_json
from prefixlab_common.progress import Progress
from theory.reparam_stats import RULE, judge, mean_summary, median_summary, near_best_max, share_summary

MODELS = ("shared-linear", "shared-tanh", "no-share")
METRICS = ("D", "D_multi", "D_single", "dist_multi", "L2")
CONTROL = "no-share-exact"  # the control: No-share with exactly as many atoms as the truth
_PURPOSE_DATA, _PURPOSE_INIT, _PURPOSE_TRUTH, _PURPOSE_HELDOUT, _PURPOSE_BOOT, _PURPOSE_VALLEY = range(6)
DT = torch.float64  # certification compares losses to ~1e-8 relative: float32 cannot
_CERT_ATOL = 1e-20  # float64 round-off of a split truth on noiseless data is ~1e-32



FULL_REPLICATES = 24  # per truth and n: the full preset takes about 27 minutes of one core


@dataclass
class ReparamConfig:
    """Every knob of the study; `quick()` and `full()` are the two presets."""

    ns: tuple[int, ...] = field(default=(1000, 3162, 10000, 31623, 100000),
                                metadata={"help": "sample sizes n (log-spaced)"})
    replicates: int = field(default=30, metadata={"help": "independent data sets per n (>= 2)"})
    models: tuple[str, ...] = field(default=MODELS, metadata={"help": "parameterizations to fit"})
    d: int = field(default=2, metadata={"help": "token dimension d (= key, value, p dimension)"})
    n_tokens: int = field(default=2, metadata={"help": "content tokens N per input"})
    n_true_prompts: int = field(default=2, metadata={"help": "L*, prompts of the truth"})
    n_fit_prompts: int = field(default=3, metadata={"help": "L > L*, prompts fitted"})
    noise_sd: float = field(default=0.01, metadata={
        "help": "sd of the Gaussian noise on Y (0.1 leaves split atoms ~0.3 from the truth at n=10⁴)"})
    init_scale: float = field(default=0.1, metadata={"help": "sd of the start's perturbation of p*"})
    restarts: int = field(default=3, metadata={
        "help": "starts per fit: split starts, then one random start; uncertified -> next start"})
    steps: int = field(default=200, metadata={
        "help": "Levenberg-Marquardt iterations per start (shared fits' D_multi moves < 2% in the second half)"})
    tol: float = field(default=1e-12, metadata={"help": "relative loss decrease that ends a fit"})
    cert_rtol: float = field(default=1e-8, metadata={
        "help": "certified: train loss <= (1 + cert_rtol) * loss at the true parameters"})
    heldout: int = field(default=4096, metadata={"help": "held-out inputs for the L2 error"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for slope CIs"})
    seed: int = field(default=0, metadata={"help": "base seed of truth, data, starts (when truth_seeds is empty)"})
    truth_seeds: tuple[int, ...] = field(default=(), metadata={
        "help": "base seeds of the truths fitted, each with its own data and starts (empty: just seed)"})
    valley_spreads: tuple[float, ...] = field(default=(0.3, 1.0), metadata={
        "help": "spreads t of the valley starts (values v* ± t e), one extra fit per replicate each"})
    threshold: float = field(default=RULE["threshold"], metadata={
        "help": "split-cell D above this is 'far' (its share; D_max above it: non-identified)"})
    near_best: float = field(default=RULE["near_best"], metadata={
        "help": "endpoints within this many σ² of residual sum of squares of the best one enter D_max"})
    control: bool = field(default=True, metadata={
        "help": "also fit No-share with exactly L* atoms on the same data (no multi-atom cell)"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads during the study (restored after)"})

    @classmethod
    def _make(cls, base: dict, overrides: dict) -> "ReparamConfig":
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise UserError(f"unknown reparam knob(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")
        return cls(**{**base, **overrides})

    @classmethod
    def quick(cls, **overrides) -> "ReparamConfig":
        """One truth, n = 10³…10⁴, 8 replicates, every start and the control: the whole design
        in under 2 minutes of one core. It shows the valley and the identifiability contrast, not
        rates (one decade of n: `table_row` gives no verdict below two decades)."""
        return cls._make(dict(ns=(1000, 3162, 10000), replicates=8, bootstrap=1000), overrides)

    @classmethod
    def full(cls, **overrides) -> "ReparamConfig":
        """Two truths (seeds 2 and 3), n log-spaced over 10³…10⁵, FULL_REPLICATES per truth and n
        (about 30 minutes of one core)."""
        return cls._make(dict(truth_seeds=(2, 3), replicates=FULL_REPLICATES), overrides)

    def seeds(self) -> tuple[int, ...]:
        """The base seeds of the truths: truth_seeds, or (seed,) when it is empty."""
        return tuple(self.truth_seeds) or (self.seed,)

    def validate(self) -> None:
        """Raise UserError (one line) for a knob that cannot work."""
        if len(self.ns) < 2 or len(set(self.ns)) < 2:
            raise UserError(f"ns={self.ns!r}: need at least two sample sizes to fit a slope")
        if any(int(n) != n or n <= 0 for n in self.ns):
            raise UserError(f"ns={self.ns!r}: every sample size must be a positive integer")
        if self.replicates < 2:
            raise UserError(f"replicates={self.replicates}: need at least 2 for a bootstrap CI")
        if self.n_true_prompts < 1:
            raise UserError(f"n_true_prompts={self.n_true_prompts}: need at least 1 true prompt")
        if self.n_fit_prompts <= self.n_true_prompts:
            raise UserError(f"n_fit_prompts={self.n_fit_prompts} <= n_true_prompts="
                            f"{self.n_true_prompts}: over-specify (fit more prompts than the truth has)")
        for name in ("d", "n_tokens", "restarts", "steps", "heldout", "bootstrap", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be a positive integer")
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise UserError(f"models={self.models!r}: choose from {', '.join(MODELS)}")
        if self.noise_sd < 0 or self.init_scale < 0 or self.tol <= 0 or self.cert_rtol < 0:
            raise UserError("noise_sd, init_scale, cert_rtol must be >= 0 and tol > 0")
        if any(t <= 0 for t in self.valley_spreads) or self.threshold <= 0 or self.near_best < 0:
            raise UserError("valley_spreads and threshold must be > 0 and near_best >= 0")
        if len(set(self.seeds())) != len(self.seeds()):
            raise UserError(f"truth_seeds={self.truth_seeds!r}: the truths must differ")


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (base seed, purpose, n, replicate, ...); stable across runs."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


# ----------------------------------------------------------------------------- truth and data


@dataclass
class Truth:
    """Pretrained experts, the known maps and the true prompts."""

    qk: Tensor  # (d, d) W_Q W_Kᵀ
    w_v: Tensor  # (d, d) W_V
    w1: Tensor  # (d, d) W_1 (known to the shared fits)
    w2: Tensor  # (d, d) W_2
    p: Tensor  # (L*, d) true shared prompt vectors
    bias: Tensor  # (L*,) true gate biases c*

    def prompts(self, reparam: str) -> tuple[Tensor, Tensor]:
        """True effective (p^K, p^V), each (L*, d), under the 'linear' or 'tanh' map."""
        return effective_map(self.p, self.w1, self.w2, reparam)


def effective_map(p: Tensor, w1: Tensor, w2: Tensor, reparam: str) -> tuple[Tensor, Tensor]:
    """(p^K, p^V) = (W_1 p, W_2 p) or their tanh, for p (..., L, d)."""
    key, value = p @ w1.T, p @ w2.T
    return (key, value) if reparam == "linear" else (torch.tanh(key), torch.tanh(value))


def _orthogonal(d: int, g: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return q


def make_truth(cfg: ReparamConfig) -> Truth:
    """Draw W_Q W_Kᵀ, W_V, W_1, W_2 and the L* true prompts from the base seed."""
    g = _generator(cfg.seed, _PURPOSE_TRUTH)
    d, ls = cfg.d, cfg.n_true_prompts
    # orthogonal W_Q W_Kᵀ gives content logits unit variance; orthogonal W_1, W_2 keep the maps
    # injective and well conditioned, as the theorems assume of a known map
    qk, w1, w2 = _orthogonal(d, g), _orthogonal(d, g), _orthogonal(d, g)
    w_v = torch.randn(d, d, generator=g, dtype=DT) / math.sqrt(d)
    bias = torch.rand(ls, generator=g, dtype=DT)
    for _ in range(1000):  # true atoms well separated under both maps, so cells are meaningful
        p = torch.randn(ls, d, generator=g, dtype=DT)
        truth = Truth(qk, w_v, w1, w2, p, bias)
        gaps = [torch.pdist(torch.cat(truth.prompts(r), -1)).min() if ls > 1 else torch.tensor(1.0)
                for r in ("linear", "tanh")]
        if min(gaps) >= 0.5:
            return truth
    raise UserError("could not draw well-separated true prompts; lower n_true_prompts or raise d")


def truth_reparam(model: str) -> str:
    """Which map generated the data a model is fitted to (no-share: the linear truth)."""
    return "tanh" if model == "shared-tanh" else "linear"


def sample_inputs(cfg: ReparamConfig, n: int, replicates: int, *keys: int) -> tuple[Tensor, Tensor]:
    """Inputs X (R, n, N, d) and unit noise (R, n, d), one seeded generator per replicate."""
    xs, eps = [], []
    for r in range(replicates):
        g = _generator(*keys, n, r)
        xs.append(torch.randn(n, cfg.n_tokens, cfg.d, generator=g, dtype=DT))
        eps.append(torch.randn(n, cfg.d, generator=g, dtype=DT))
    return torch.stack(xs), torch.stack(eps)


def gate_features(x: Tensor, truth: Truth) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce X (..., N, d) to u (..., d), log Z (...), content mean m (..., d); query = x_1."""
    d = x.shape[-1]
    u = x[..., 0, :] @ truth.qk / math.sqrt(d)  # (..., d): prompt gate is u·p^K
    content_logits = (x @ u.unsqueeze(-1)).squeeze(-1)  # (..., N): x_1ᵀ W_Q W_Kᵀ x_j/√d
    log_z = torch.logsumexp(content_logits, -1)
    experts = x @ truth.w_v.T  # (..., N, d): f_j = W_V x_j
    mean = (torch.softmax(content_logits, -1).unsqueeze(-1) * experts).sum(-2)
    return u, log_z, mean


def regression(u: Tensor, log_z: Tensor, mean: Tensor, key: Tensor, value: Tensor,
               bias: Tensor) -> Tensor:
    """f_G on features: u (..., n, d), log_z (..., n), mean (..., n, d); prompts key/value
    (..., L, d), bias (..., L); leading dims broadcast. Returns (..., n, d)."""
    h = u @ key.transpose(-1, -2) + bias.unsqueeze(-2) - log_z.unsqueeze(-1)  # (..., n, L)
    log_norm = torch.logsumexp(torch.cat([torch.zeros_like(h[..., :1]), h], -1), -1)
    prompt_weight = torch.exp(h - log_norm.unsqueeze(-1))  # (..., n, L)
    return torch.exp(-log_norm).unsqueeze(-1) * mean + prompt_weight @ value


@dataclass
class Dataset:
    """Features and unit noise of R replicates at one n (Y depends on the truth's map)."""

    u: Tensor  # (R, n, d)
    log_z: Tensor  # (R, n)
    mean: Tensor  # (R, n, d)
    noise: Tensor  # (R, n, d) unit Gaussian

    def responses(self, truth: Truth, reparam: str, noise_sd: float) -> Tensor:
        key, value = truth.prompts(reparam)
        return regression(self.u, self.log_z, self.mean, key, value, truth.bias) \
            + noise_sd * self.noise  # (R, n, d)


def make_dataset(cfg: ReparamConfig, truth: Truth, n: int, replicates: int) -> Dataset:
    """The R data sets at sample size n; replicate r is seeded by (seed, n, r) only."""
    x, noise = sample_inputs(cfg, n, replicates, cfg.seed, _PURPOSE_DATA)
    return Dataset(*gate_features(x, truth), noise)


# ----------------------------------------------------------------------------- Voronoi loss


def voronoi_cells(atoms: Tensor, log_mass: Tensor, true_atoms: Tensor,
                  true_log_mass: Tensor) -> dict[str, Tensor]:
    """[L]'s Voronoi loss per cell. atoms (..., L, q), log_mass (..., L) are θ_l and c_l;
    true_atoms (L*, q), true_log_mass (L*). Returns cell (..., L) (index j of the cell holding
    atom l), size (..., L*) = |A_j|, per_cell (..., L*) = D_j, dist (..., L) = ‖θ_l − θ*_cell‖."""
    dist = torch.cdist(atoms, true_atoms.expand(*atoms.shape[:-2], *true_atoms.shape[-2:]))
    cell = dist.argmin(-1)
    member = torch.nn.functional.one_hot(cell, true_atoms.shape[-2]).to(atoms.dtype)  # (..., L, L*)
    size = member.sum(-2)
    own = dist.gather(-1, cell.unsqueeze(-1)).squeeze(-1)
    multi = size.gather(-1, cell) > 1
    mass = log_mass.exp()
    atom_term = mass * torch.where(multi, own ** 2, own)  # squared distances in multi-atom cells
    per_cell = (member * atom_term.unsqueeze(-1)).sum(-2) \
        + ((member * mass.unsqueeze(-1)).sum(-2) - true_log_mass.exp()).abs()
    return {"cell": cell, "size": size, "per_cell": per_cell, "dist": own}


def voronoi_loss(atoms: Tensor, log_mass: Tensor, true_atoms: Tensor,
                 true_log_mass: Tensor) -> Tensor:
    """[L]'s Voronoi loss D(G, G*) = Σ_j D_j (docs/papers.md §6). Shapes as `voronoi_cells`; (...)."""
    return voronoi_cells(atoms, log_mass, true_atoms, true_log_mass)["per_cell"].sum(-1)


def cell_metrics(cells: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per fit (...): D, D over multi-atom cells, D over singleton cells, and the largest atom
    distance in a multi-atom cell; NaN where a fit has no cell of that type."""
    size, per_cell = cells["size"], cells["per_cell"]
    nan = torch.full_like(per_cell[..., 0], float("nan"))

    def part(mask: Tensor) -> Tensor:
        return torch.where(mask.any(-1), (per_cell * mask).sum(-1), nan)

    in_multi = cells["size"].gather(-1, cells["cell"]) > 1
    dist = torch.where(in_multi, cells["dist"], torch.full_like(cells["dist"], -1.0)).amax(-1)
    return {"D": per_cell.sum(-1), "D_multi": part(size > 1), "D_single": part(size == 1),
            "dist_multi": torch.where(in_multi.any(-1), dist, nan)}


# ----------------------------------------------------------------------------- the fit


def _map_jacobian(model: str, q: Tensor, truth: Truth) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Effective (key, value, bias) of parameters q (R, L, k) and A = ∂(key, value, c)/∂q
    (R, L, 2d+1, k). Shared models: q = (p, c); no-share: q = (p^K, p^V, c)."""
    d = truth.qk.shape[0]
    if model == "no-share":
        eye = torch.eye(2 * d + 1, dtype=q.dtype).expand(*q.shape[:-1], -1, -1)
        return q[..., :d], q[..., d:2 * d], q[..., -1], eye
    p, bias = q[..., :d], q[..., -1]
    key, value = effective_map(p, truth.w1, truth.w2, truth_reparam(model))
    jk = truth.w1.expand(*p.shape[:-1], d, d)
    jv = truth.w2.expand(*p.shape[:-1], d, d)
    if model == "shared-tanh":
        jk, jv = (1 - key ** 2).unsqueeze(-1) * jk, (1 - value ** 2).unsqueeze(-1) * jv
    a = torch.zeros(*q.shape[:-1], 2 * d + 1, d + 1, dtype=q.dtype)
    a[..., :d, :d], a[..., d:2 * d, :d], a[..., -1, -1] = jk, jv, 1.0
    return key, value, bias, a


def _softmax_fit(u: Tensor, log_z: Tensor, mean: Tensor, key: Tensor, value: Tensor,
                 bias: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt weights π (R, L, n) and f_G (R, d, n) on samples-last features u, mean (R, d, n),
    log_z (R, n): the hot loop keeps n contiguous (tiny trailing dims are slow on the CPU)."""
    h = key @ u + (bias.unsqueeze(-1) - log_z.unsqueeze(-2))  # (R, L, n)
    shift = h.amax(-2, keepdim=True).clamp(min=0)  # the content slot has logit 0 after -log Z
    w = (h - shift).exp()
    w0 = (-shift).exp()
    norm = w0 + w.sum(-2, keepdim=True)
    w, w0 = w / norm, w0 / norm
    return w, w0 * mean + value.transpose(-1, -2) @ w


def normal_equations(u: Tensor, log_z: Tensor, mean: Tensor, y: Tensor, key: Tensor,
                     value: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gauss–Newton JᵀJ (R, L(2d+1), L(2d+1)), Jᵀr (R, L(2d+1)) and the loss (R,) of the residual
    r = f_G − y w.r.t. each atom's (p^K, p^V, c), on samples-last features (u, mean, y (R, d, n),
    log_z (R, n)), without forming J. With π the prompt weights and x_lo = π_l(p^V_l − f)_o:
    ∂f_o/∂(p^K_l, c_l) = x_lo (u, 1) (the gate columns G_o) and ∂f_o/∂p^V_lb = π_l δ_ob, so
    JᵀJ = [Σ_o G_o G_oᵀ, (G_b πᵀ)_b; ·, (ππᵀ) ⊗ I] in (gate, value) blocks."""
    w, f = _softmax_fit(u, log_z, mean, key, value, bias)
    r = f - y  # (R, d, n)
    x = w.unsqueeze(-2) * (value.unsqueeze(-1) - f.unsqueeze(-3))  # (R, L, d, n)
    nr, ll, d, n = x.shape
    a = torch.cat([u, torch.ones_like(u[:, :1])], 1)  # (R, d+1, n): the gate's (u, 1)
    gates = [(x[:, :, o, None] * a[:, None]).view(nr, ll * (d + 1), n) for o in range(d)]
    gg = sum(g @ g.transpose(-1, -2) for g in gates)  # (R, L(d+1), L(d+1))
    wt = w.transpose(-1, -2)
    gv = torch.stack([g @ wt for g in gates], -1)  # (R, L(d+1), L, d): column (m, p^V_b)
    ww = w @ wt  # (R, L, L)
    vv = ww[:, :, None, :, None] * torch.eye(d, dtype=w.dtype)[:, None, :]  # (R, L, d, L, d)
    g_r = sum(g @ r[:, o, :, None] for o, g in enumerate(gates)).squeeze(-1)  # (R, L(d+1))
    v_r = w @ r.transpose(-1, -2)  # (R, L, d)
    k = 2 * d + 1  # reorder into each atom's (p^K, p^V, c)
    gi = (torch.arange(ll)[:, None] * k + torch.tensor([*range(d), 2 * d])).flatten()
    vi = (torch.arange(ll)[:, None] * k + torch.arange(d, 2 * d)).flatten()
    jtj = torch.zeros(nr, ll * k, ll * k, dtype=w.dtype)
    jtj[:, gi[:, None], gi] = gg
    jtj[:, gi[:, None], vi] = gv.flatten(-2)
    jtj[:, vi[:, None], gi] = gv.flatten(-2).transpose(-1, -2)
    jtj[:, vi[:, None], vi] = vv.reshape(nr, ll * d, ll * d)
    jtr = torch.zeros(nr, ll * k, dtype=w.dtype)
    jtr[:, gi], jtr[:, vi] = g_r, v_r.flatten(-2)
    return jtj, jtr, (r * r).sum((-1, -2)) / n


def _samples_last(features: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.transpose(-1, -2).contiguous() if t.dim() == 3 else t for t in features)


def _mse_t(features_t: tuple, key: Tensor, value: Tensor, bias: Tensor) -> Tensor:
    u, log_z, mean, y = features_t
    r = _softmax_fit(u, log_z, mean, key, value, bias)[1] - y
    return (r * r).sum((-1, -2)) / y.shape[-1]


def mse(features: tuple[Tensor, Tensor, Tensor, Tensor], key: Tensor, value: Tensor,
        bias: Tensor) -> Tensor:
    """Per-replicate mean over samples of ‖f_G − y‖²; features (u, log_z, mean, y) (R, n, ...)."""
    u, log_z, mean, y = features
    return ((regression(u, log_z, mean, key, value, bias) - y) ** 2).sum(-1).mean(-1)


def _normal_equations(model: str, q: Tensor, features_t: tuple, truth: Truth,
                      chunk: int) -> tuple[Tensor, Tensor]:
    """Gauss–Newton matrix JᵀJ (R, P, P) and Jᵀr (R, P) of the model's own parameters, in
    chunks of replicates (memory); the chain rule through the map is the small Aᵀ(JᵀJ)A."""
    jtj, jtr = [], []
    for s in range(0, q.shape[0], chunk):
        key, value, bias, a = _map_jacobian(model, q[s:s + chunk], truth)
        m, v, _ = normal_equations(*(t[s:s + chunk] for t in features_t), key, value, bias)
        a = torch.stack([torch.block_diag(*a_r) for a_r in a])  # (c, L(2d+1), P)
        jtj.append(a.transpose(-1, -2) @ m @ a)
        jtr.append((a.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1))
    return torch.cat(jtj), torch.cat(jtr)


def levenberg_marquardt(model: str, q: Tensor, features: tuple, truth: Truth, steps: int,
                        tol: float, record: tuple[int, ...] = (),
                        tick: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """Minimize `mse` over q (R, L, k) per replicate by Levenberg–Marquardt (Marquardt's diagonal
    scaling, damping ÷3 on success, ×4 on failure). A replicate stops when an accepted step lowers
    its loss by less than tol relative, or its damping exceeds 1e12. Returns q, loss (R,),
    iters (R,), the mse's gradient norm (R,) at the last iteration, and q_at (R, len(record),
    L, k): q after each iteration count in `record` (the final q where a fit stopped earlier).
    q is updated in place. tick(r), when given, is called after each iteration with the number r
    of replicates that iteration advanced."""
    n = features[0].shape[1]
    chunk = max(1, int(2e7 // (n * q.shape[1] ** 2 * truth.qk.shape[0])))
    features = _samples_last(features)
    loss = _mse_t(features, *_map_jacobian(model, q, truth)[:3])
    lam = torch.full_like(loss, 1e-3)
    active = torch.ones_like(loss, dtype=torch.bool)
    iters = torch.zeros_like(loss, dtype=torch.long)
    grad = torch.zeros_like(loss)
    snaps: dict[int, Tensor] = {}
    for it in range(steps):
        if not active.any():
            break
        idx = active.nonzero().squeeze(-1)
        sub = tuple(t[idx] for t in features)
        jtj, jtr = _normal_equations(model, q[idx], sub, truth, chunk)
        grad[idx] = 2 * jtr.norm(dim=-1) / n
        diag = jtj.diagonal(dim1=-2, dim2=-1).clamp(min=1e-12)
        step = torch.linalg.solve(jtj + lam[idx, None, None] * torch.diag_embed(diag), -jtr)
        trial = q[idx] + step.view_as(q[idx])
        new = _mse_t(sub, *_map_jacobian(model, trial, truth)[:3])
        ok = torch.isfinite(new) & (new < loss[idx])
        small = ok & (loss[idx] - new <= tol * loss[idx])
        q[idx] = torch.where(ok[:, None, None], trial, q[idx])
        loss[idx] = torch.where(ok, new, loss[idx])
        lam[idx] = torch.where(ok, lam[idx] / 3, lam[idx] * 4)
        iters[idx] += 1
        active[idx] = ~small & (lam[idx] < 1e12)
        if it + 1 in record:
            snaps[it + 1] = q.clone()
        if tick is not None:
            tick(len(idx))
    q_at = torch.stack([snaps.get(t, q) for t in record], 1) if record else q[:, None, :0]
    return {"q": q, "loss": loss, "iters": iters, "grad_norm": grad, "q_at": q_at}


def start_params(cfg: ReparamConfig, model: str, n: int, replicates: int, start: int,
                 truth: Truth) -> Tensor:
    """Start `start` of each replicate as q (R, L, k): split starts near the truth (true atom 0
    covered by the extra atoms, masses shared equally, p perturbed by init_scale) for
    start < restarts − 1, a random start (p ~ N(0, I), c = 0) for the last; seeded by
    (seed, n, replicate, start) and shared by every model."""
    d, ls, ll = cfg.d, cfg.n_true_prompts, cfg.n_fit_prompts
    random = start == cfg.restarts - 1 and cfg.restarts > 1
    owner = torch.tensor([l if l < ls else 0 for l in range(ll)])  # fitted atom -> true atom
    copies = torch.bincount(owner, minlength=ls).to(DT)
    ps = []
    for r in range(replicates):
        g = _generator(cfg.seed, _PURPOSE_INIT, n, r, start)
        ps.append(torch.randn(ll, d, generator=g, dtype=DT))
    noise = torch.stack(ps)  # (R, L, d)
    if random:
        p, bias = noise, torch.zeros(replicates, ll, dtype=DT)
    else:
        p = truth.p[owner] + cfg.init_scale * noise
        bias = (truth.bias - copies.log())[owner].expand(replicates, -1)
    if model == "no-share":  # the same effective start as shared-linear
        key, value = effective_map(p, truth.w1, truth.w2, "linear")
        return torch.cat([key, value, bias.unsqueeze(-1)], -1)
    return torch.cat([p, bias.unsqueeze(-1)], -1)


def certification_limit(cfg: ReparamConfig, model: str, features: tuple, truth: Truth) -> tuple[Tensor, Tensor]:
    """The truth's training loss (R,) on features (u, log_z, mean, y) and the largest loss a
    certified fit may have: (1 + cert_rtol)·truth loss + round-off."""
    true_key, true_value = truth.prompts(truth_reparam(model))
    truth_loss = mse(features, true_key, true_value, truth.bias)
    return truth_loss, truth_loss * (1 + cfg.cert_rtol) + _CERT_ATOL


def valley_direction(cfg: ReparamConfig, n: int, replicates: int) -> Tensor:
    """A seeded unit vector e (R, d) per replicate, seeded by (seed, n, replicate): the direction
    in which the valley starts spread the values of the split copies."""
    e = torch.stack([torch.randn(cfg.d, generator=_generator(cfg.seed, _PURPOSE_VALLEY, n, r), dtype=DT)
                     for r in range(replicates)])
    return e / e.norm(dim=-1, keepdim=True)


def valley_start(cfg: ReparamConfig, model: str, n: int, replicates: int, spread: float,
                 truth: Truth, direction: Tensor | None = None) -> Tensor:
    """The start on No-share's valley at spread t, as q (R, L, k). Fitted atom l < L* sits on true
    atom l; the copies of true atom 0 (atom 0 and the extra atoms) share its mass equally and get
    offsets s from linspace(−1, 1) (mass-weighted mean 0). No-share: keys k*_0, values
    v*_0 + t·s·e, so f = f* exactly for every t while D = e^{c*_0}·t²·mean(s²). Shared models:
    p = p*_0 + t·s·W_2ᵀe (values spread as No-share's under the linear map; keys move with them).
    direction: e (R, d), default `valley_direction`."""
    ls, ll = cfg.n_true_prompts, cfg.n_fit_prompts
    owner = torch.tensor([l if l < ls else 0 for l in range(ll)])
    copies = torch.bincount(owner, minlength=ls).to(DT)
    offset = torch.zeros(ll, dtype=DT)
    first = (owner == 0).nonzero().squeeze(-1)
    if len(first) > 1:
        offset[first] = torch.linspace(-1.0, 1.0, len(first), dtype=DT)
    e = valley_direction(cfg, n, replicates) if direction is None else direction
    bias = (truth.bias - copies.log())[owner].expand(replicates, -1).unsqueeze(-1)
    shift = spread * offset[:, None] * e[:, None, :]  # (R, L, d)
    if model == "no-share":
        key, value = truth.prompts("linear")
        return torch.cat([key[owner].expand(replicates, -1, -1), value[owner] + shift, bias], -1)
    p = truth.p[owner] + shift @ truth.w2  # row form of p* + t s W_2ᵀ e
    return torch.cat([p, bias], -1)


def fit_certified(cfg: ReparamConfig, model: str, data: Dataset, y: Tensor, n: int,
                  truth: Truth, tick: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """Fit R replicates from start 0; refit the uncertified ones from the next start, up to
    `restarts` starts. Returns q (R, L, k), effective key/value (R, L, d), bias (R, L),
    train_loss, truth_loss, iters, grad_norm (R,), start (R,) (the start kept), certified (R,).
    tick: as `levenberg_marquardt`'s."""
    features = (data.u, data.log_z, data.mean, y)
    truth_loss, limit = certification_limit(cfg, model, features, truth)
    out: dict[str, Tensor] = {}
    todo = torch.arange(y.shape[0])
    for start in range(cfg.restarts):
        q0 = start_params(cfg, model, n, y.shape[0], start, truth)[todo]
        fit = levenberg_marquardt(model, q0, tuple(t[todo] for t in features), truth, cfg.steps,
                                  cfg.tol, checkpoints(cfg), tick)
        fit["start"] = torch.full_like(todo, start)
        if not out:
            out = fit
        else:  # a refit replaces the old fit when it certifies or at least lowers the loss
            better = fit["loss"] < out["loss"][todo]
            for k, v in fit.items():
                out[k][todo[better]] = v[better]
        todo = (out["loss"] > limit).nonzero().squeeze(-1)
        if len(todo) == 0:
            break
    key, value, bias, _ = _map_jacobian(model, out["q"], truth)
    return {"q": out["q"], "key": key, "value": value, "bias": bias, "train_loss": out["loss"],
            "truth_loss": truth_loss, "iters": out["iters"], "grad_norm": out["grad_norm"],
            "start": out["start"], "certified": out["loss"] <= limit,
            "at": _map_jacobian(model, out["q_at"], truth)[:3]}


def checkpoints(cfg: ReparamConfig) -> tuple[int, ...]:
    """Iteration counts at which each fit's cells are also recorded: the drift of D_multi
    between them and the end shows whether a fit still moves along a flat direction."""
    return tuple(sorted({max(1, cfg.steps // 4), max(1, cfg.steps // 2)}))


def evaluate_fit(fit: dict[str, Tensor], truth: Truth, reparam: str,
                 heldout: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    """Per replicate: the cell metrics (`cell_metrics`), the cells, and the held-out L2 error."""
    true_key, true_value = truth.prompts(reparam)
    cells = voronoi_cells(torch.cat([fit["key"], fit["value"]], -1), fit["bias"],
                          torch.cat([true_key, true_value], -1), truth.bias)
    at = cell_metrics(voronoi_cells(torch.cat(fit["at"][:2], -1), fit["at"][2],
                                    torch.cat([true_key, true_value], -1), truth.bias))
    u, log_z, mean = heldout
    f_hat = regression(u, log_z, mean, fit["key"][:, None], fit["value"][:, None],
                       fit["bias"][:, None]).squeeze(1)  # (R, m, d)
    f_star = regression(u, log_z, mean, true_key, true_value, truth.bias)
    l2 = ((f_hat - f_star) ** 2).sum(-1).mean(-1).sqrt()
    return {**cell_metrics(cells), "L2": l2, "cell": cells["cell"], "size": cells["size"],
            "D_at": at["D"], "D_multi_at": at["D_multi"]}  # (R, len(checkpoints))


# ----------------------------------------------------------------------------- slopes


def loglog_slope(ns, values: np.ndarray, n_boot: int, seed: int) -> dict[str, float] | None:
    """Slope of the mean ln(value) against ln n over the finite values of each row
    (values (len(ns), R), NaN = no value), with a 95% percentile-bootstrap CI that resamples
    values within each n. None when fewer than two n have a value."""
    x_all = np.log(np.asarray(ns, dtype=float))
    rows = [np.log(np.maximum(v[np.isfinite(v)], np.finfo(float).tiny)) for v in values]
    keep = [i for i, r in enumerate(rows) if len(r)]
    if len(keep) < 2:
        return None
    x = x_all[keep]
    xc = x - x.mean()
    rng = np.random.default_rng(seed)
    means = np.array([rows[i].mean() for i in keep])
    boot = np.stack([rng.choice(rows[i], size=(n_boot, len(rows[i]))).mean(-1) for i in keep], -1)
    slope = lambda m: (m * xc).sum(-1) / (xc ** 2).sum()  # noqa: E731
    point = float(slope(means))
    lo, hi = np.percentile(slope(boot), [2.5, 97.5])
    return {"slope": point, "ci_low": float(lo), "ci_high": float(hi),
            "intercept": float(means.mean() - point * x.mean())}


# ----------------------------------------------------------------------------- the study


@dataclass
class ReparamResult:
    """Per (model, n, replicate) metrics, the fits themselves, slopes with CIs, and timings.
    Replicate columns run over the truths: column t·R + r is replicate r of truth t."""

    config: dict
    ns: list[int]
    voronoi: dict[str, np.ndarray]  # model -> (len(ns), T·R): D of every fit (certified or not)
    l2_error: dict[str, np.ndarray]  # model -> (len(ns), T·R)
    train_loss: dict[str, np.ndarray]  # model -> (len(ns), T·R)
    slopes: dict[str, dict[str, dict | None]]  # model -> metric -> geometric-mean slope (description)
    fit_seconds: dict[str, list[float]]  # model -> per n
    total_seconds: float
    metrics: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> metric -> (len(ns), T·R)
    fits: dict[str, list[list[dict]]] = field(default_factory=dict)  # model -> per n -> per replicate
    truth: dict = field(default_factory=dict)  # the first truth
    certified: dict[str, list[int]] = field(default_factory=dict)  # model -> certified fits per n
    checkpoints: list[int] = field(default_factory=list)  # iterations of each fit's D_at
    diagnostics: dict[str, dict] = field(default_factory=dict)  # model -> per-n checks (`_diagnostics`)
    stats: dict = field(default_factory=dict)  # {"pooled": model -> summaries, "by_truth": seed -> ...}
    valley: dict = field(default_factory=dict)  # one replicate's valley path (`valley_path`)
    truths: list[dict] = field(default_factory=list)  # every truth, with its seed

    def to_json(self) -> dict:
        """A JSON-serializable dict (non-finite numbers become None)."""
        def clean(a) -> list:
            return [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(a, dtype=float)]
        return {"config": self.config, "ns": list(self.ns), "truth": self.truth, "truths": self.truths,
                "voronoi": {m: clean(v) for m, v in self.voronoi.items()},
                "l2_error": {m: clean(v) for m, v in self.l2_error.items()},
                "train_loss": {m: clean(v) for m, v in self.train_loss.items()},
                "metrics": {m: {k: clean(v) for k, v in mm.items()} for m, mm in self.metrics.items()},
                "slopes": self.slopes, "certified": self.certified, "checkpoints": self.checkpoints,
                "diagnostics": self.diagnostics, "stats": finite_json(self.stats),
                "valley": finite_json(self.valley),
                "fits": self.fits, "fit_seconds": self.fit_seconds,
                "total_seconds": self.total_seconds}

    @classmethod
    def from_json(cls, data: dict) -> "ReparamResult":
        def arr(d: dict) -> dict[str, np.ndarray]:
            return {m: np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
                    for m, rows in d.items()}
        return cls(data["config"], list(data["ns"]), arr(data["voronoi"]), arr(data["l2_error"]),
                   arr(data["train_loss"]), data["slopes"], data["fit_seconds"],
                   data["total_seconds"], {m: arr(mm) for m, mm in data.get("metrics", {}).items()},
                   data.get("fits", {}), data.get("truth", {}), data.get("certified", {}),
                   data.get("checkpoints", []), data.get("diagnostics", {}), data.get("stats", {}),
                   data.get("valley", {}), data.get("truths", []))


def run_reparam_study(cfg: ReparamConfig, progress: Progress | None = None) -> ReparamResult:
    """Fit every model at every n on R batched replicates of each truth, from the split start and
    the valley starts, and the control; measure D per cell type, L2, D_max; summarize."""
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_study(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def fit_endpoints(cfg: ReparamConfig, model: str, data: Dataset, y: Tensor, n: int, truth: Truth,
                  tick: Callable[[int], None] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The certified split-start fit (`fit_certified`) and one fit from each valley start.
    Returns (fit, ends): ends holds per replicate and start (R, S), S = 1 + len(valley_spreads),
    the split start first: train_loss, D_multi, D, certified, iters; and D_max (R,), the largest
    split-cell D among certified endpoints within near_best·σ² of the best (`near_best_max`)."""
    fit = fit_certified(cfg, model, data, y, n, truth, tick)
    features = (data.u, data.log_z, data.mean, y)
    _, limit = certification_limit(cfg, model, features, truth)
    true_key, true_value = truth.prompts(truth_reparam(model))
    true_atoms = torch.cat([true_key, true_value], -1)
    cols = {"train_loss": [fit["train_loss"]], "certified": [fit["certified"]], "iters": [fit["iters"]]}
    atoms = [(fit["key"], fit["value"], fit["bias"])]
    for spread in cfg.valley_spreads:
        q0 = valley_start(cfg, model, n, y.shape[0], spread, truth)
        v = levenberg_marquardt(model, q0, features, truth, cfg.steps, cfg.tol, tick=tick)
        key, value, bias, _ = _map_jacobian(model, v["q"], truth)
        atoms.append((key, value, bias))
        cols["train_loss"].append(v["loss"])
        cols["certified"].append(v["loss"] <= limit)
        cols["iters"].append(v["iters"])
    ends = {k: torch.stack(v, -1) for k, v in cols.items()}
    cm = [cell_metrics(voronoi_cells(torch.cat([k, v], -1), b, true_atoms, truth.bias)) for k, v, b in atoms]
    ends["D_multi"] = torch.stack([c["D_multi"] for c in cm], -1)
    ends["D"] = torch.stack([c["D"] for c in cm], -1)
    ends["D_max"] = torch.from_numpy(near_best_max(ends["train_loss"].numpy(), ends["D_multi"].numpy(),
                                                   ends["certified"].numpy(), n, cfg.noise_sd, cfg.near_best))
    return fit, ends


def valley_path(cfg: ReparamConfig, truth: Truth, data: Dataset, n: int, spreads,
                models=MODELS) -> dict:
    """Replicate 0 of `data` walked along the valley starts' path: for each model and spread t,
    the training loss over the truth's (in units of σ²/n when σ > 0: the excess residual sum of
    squares in σ²) and the split-cell D. No-share's loss stays flat while D grows as t²."""
    out = {"n": int(n), "truth_seed": int(cfg.seed), "t": [float(t) for t in spreads], "models": {}}
    scale = n / cfg.noise_sd ** 2 if cfg.noise_sd > 0 else 1.0
    one = Dataset(data.u[:1], data.log_z[:1], data.mean[:1], data.noise[:1])
    e = valley_direction(cfg, n, 1)
    for model in models:
        y = one.responses(truth, truth_reparam(model), cfg.noise_sd)
        features = (one.u, one.log_z, one.mean, y)
        truth_loss, _ = certification_limit(cfg, model, features, truth)
        q = torch.cat([valley_start(cfg, model, n, 1, float(t), truth, e) for t in spreads])  # (G, L, k)
        key, value, bias, _ = _map_jacobian(model, q, truth)
        loss = mse(features, key, value, bias)  # (G,)
        true_key, true_value = truth.prompts(truth_reparam(model))
        cm = cell_metrics(voronoi_cells(torch.cat([key, value], -1), bias,
                                        torch.cat([true_key, true_value], -1), truth.bias))
        out["models"][model] = {"loss_gain": ((loss - truth_loss) * scale).tolist(),
                                "D_multi": cm["D_multi"].tolist()}
    return out


class _Meter:
    """Progress in units of (sample × replicate × iteration) budgets: a fit's share of the work is
    n·R·steps however early it stops; ticks inside a fit move the count within that share."""

    def __init__(self, cfg: ReparamConfig, ns: list[int], progress: Progress | None):
        fits_per_n = len(cfg.models) * (1 + len(cfg.valley_spreads)) + int(_has_control(cfg))
        self.total = len(cfg.seeds()) * sum(ns) * cfg.replicates * cfg.steps * fits_per_n
        self.base, self.inside, self.budget, self.progress, self.what = 0, 0, 0, progress, ""

    def start(self, n: int, replicates: int, steps: int, what: str) -> Callable[[int], None]:
        self.base += self.budget
        self.inside, self.budget, self.what, self.n = 0, n * replicates * steps, what, n
        return self.tick

    def tick(self, replicates: int) -> None:
        self.inside = min(self.budget, self.inside + replicates * self.n)
        if self.progress is not None:
            self.progress(self.base + self.inside, self.total, {"what": self.what})

    def finish(self) -> None:
        self.base += self.budget
        self.budget = 0
        if self.progress is not None:
            self.progress(self.total, self.total, {"what": "done"})


def _has_control(cfg: ReparamConfig) -> bool:
    return cfg.control and "no-share" in cfg.models


def _fit_records(fit: dict[str, Tensor], ev: dict[str, Tensor], ends: dict[str, Tensor],
                 cfg: ReparamConfig) -> list[dict]:
    """One JSON record per replicate: masses, parameters, cells and certification of the split-start
    fit, its truth's seed, and every start's endpoint (loss, split-cell D, certified) with D_max."""
    out = []
    labels = [None, *cfg.valley_spreads]
    for r in range(fit["q"].shape[0]):
        out.append({"mass": fit["bias"][r].exp().tolist(), "params": fit["q"][r].tolist(),
                    "key": fit["key"][r].tolist(), "value": fit["value"][r].tolist(),
                    "cell": ev["cell"][r].tolist(), "cell_size": ev["size"][r].long().tolist(),
                    "train_loss": float(fit["train_loss"][r]), "truth_loss": float(fit["truth_loss"][r]),
                    "certified": bool(fit["certified"][r]), "start": int(fit["start"][r]),
                    "iters": int(fit["iters"][r]), "grad_norm": float(fit["grad_norm"][r]),
                    "D_at": finite_json(ev["D_at"][r]), "D_multi_at": finite_json(ev["D_multi_at"][r]),
                    **{k: finite_json(ev[k][r:r + 1])[0] for k in METRICS},
                    "truth_seed": int(cfg.seed), "D_max": finite_json(ends["D_max"][r:r + 1])[0],
                    "endpoints": [{"spread": t, "train_loss": float(ends["train_loss"][r, s]),
                                   "D_multi": finite_json(ends["D_multi"][r, s:s + 1])[0],
                                   "D": finite_json(ends["D"][r, s:s + 1])[0],
                                   "certified": bool(ends["certified"][r, s]), "iters": int(ends["iters"][r, s])}
                                  for s, t in enumerate(labels)]})
    return out


def _diagnostics(cfg: ReparamConfig, ns: list[int], fits: list[list[dict]],
                 metrics: dict[str, np.ndarray]) -> dict:
    """Per n: fits used by each slope (certified, cell type present), fits with a multi-atom cell,
    fits stopped by the iteration cap, the median drift of D_multi over the budget's second half,
    and the median loss gain over the truth in units of σ² (≈ −(effective parameters fitted))."""
    ok = np.array([[f["certified"] for f in row] for row in fits])
    return {"n_used": {k: [int(c) for c in (ok & np.isfinite(metrics[k])).sum(1)] for k in METRICS},
            "with_multi_cell": [sum(max(f["cell_size"]) > 1 for f in row) for row in fits],
            "at_step_cap": [sum(f["iters"] >= cfg.steps for f in row) for row in fits],
            "drift_D_multi": [_median_drift(row) for row in fits],
            "excess_dof": [float(np.median([(f["train_loss"] / f["truth_loss"] - 1) * n * cfg.d
                                            for f in row])) for n, row in zip(ns, fits)]}


def _median_drift(row: list[dict]) -> float | None:
    """Median over a row of fits of |D_multi(end) − D_multi(half budget)| / D_multi(end)."""
    v = [abs(f["D_multi_at"][-1] - end) / end for f in row if f["certified"]
         and f["D_multi_at"] and f["D_multi_at"][-1] is not None
         and (end := f["D_multi"]) is not None and end > 0]
    return float(np.median(v)) if v else None


def _fit_truth(cfg: ReparamConfig, ti: int, meter: _Meter, acc: dict) -> None:
    """Every model (and the control) at every n on the R replicates of truth `cfg.seed`; fills
    acc's arrays in columns ti·R … ti·R + R − 1 and appends the fit records."""
    truth = make_truth(cfg)
    acc["truths"].append({"seed": int(cfg.seed), **_truth_json(truth)})
    x_held, _ = sample_inputs(cfg, cfg.heldout, 1, cfg.seed, _PURPOSE_HELDOUT)
    heldout = gate_features(x_held[0], truth)
    cols = slice(ti * cfg.replicates, (ti + 1) * cfg.replicates)
    ns = acc["ns"]
    for i, n in enumerate(ns):
        data = make_dataset(cfg, truth, n, cfg.replicates)
        for model in cfg.models:
            t0 = time.perf_counter()
            reparam = truth_reparam(model)
            tick = meter.start(n, cfg.replicates, cfg.steps * (1 + len(cfg.valley_spreads)),
                               f"truth {cfg.seed} n={n} {model}")
            fit, ends = fit_endpoints(cfg, model, data, data.responses(truth, reparam, cfg.noise_sd), n,
                                      truth, tick)
            ev = evaluate_fit(fit, truth, reparam, heldout)
            for k in METRICS:
                acc["metrics"][model][k][i, cols] = ev[k].numpy()
            acc["metrics"][model]["D_max"][i, cols] = ends["D_max"].numpy()
            acc["train"][model][i, cols] = fit["train_loss"].numpy()
            acc["fits"][model][i].extend(_fit_records(fit, ev, ends, cfg))
            acc["seconds"][model][i] += time.perf_counter() - t0
        if _has_control(cfg):
            tick = meter.start(n, cfg.replicates, cfg.steps, f"truth {cfg.seed} n={n} {CONTROL}")
            exact = replace(cfg, n_fit_prompts=cfg.n_true_prompts)
            fit = fit_certified(exact, "no-share", data, data.responses(truth, "linear", cfg.noise_sd), n,
                                truth, tick)
            ev = evaluate_fit(fit, truth, "linear", heldout)
            for k in ("D", "D_single", "L2"):
                acc["control"][k][i, cols] = np.where(fit["certified"].numpy(), ev[k].numpy(), np.nan)
        if ti == 0 and i == len(ns) - 1:
            acc["valley"] = valley_path(cfg, truth, data, n, np.linspace(0.0, 1.2, 25).tolist(), cfg.models)


def _truth_json(truth: Truth) -> dict:
    out = {r: {"key": truth.prompts(r)[0].tolist(), "value": truth.prompts(r)[1].tolist()}
           for r in ("linear", "tanh")}
    out.update(p=truth.p.tolist(), mass=truth.bias.exp().tolist(), w1=truth.w1.tolist(), w2=truth.w2.tolist())
    return out


def _run_study(cfg: ReparamConfig, progress: Progress | None) -> ReparamResult:
    begin = time.perf_counter()
    ns = [int(n) for n in cfg.ns]
    seeds = cfg.seeds()
    shape = (len(ns), len(seeds) * cfg.replicates)
    acc = {"ns": ns, "truths": [], "valley": {},
           "metrics": {m: {k: np.full(shape, np.nan) for k in (*METRICS, "D_max")} for m in cfg.models},
           "control": {k: np.full(shape, np.nan) for k in ("D", "D_single", "L2")},
           "train": {m: np.zeros(shape) for m in cfg.models},
           "fits": {m: [[] for _ in ns] for m in cfg.models},
           "seconds": {m: [0.0] * len(ns) for m in cfg.models}}
    meter = _Meter(cfg, ns, progress)
    for ti, seed in enumerate(seeds):
        _fit_truth(replace(cfg, seed=seed), ti, meter, acc)
    meter.finish()
    metrics, fits = acc["metrics"], acc["fits"]
    slopes, certified = {}, {}
    for k, m in enumerate(cfg.models):
        ok = np.array([[f["certified"] for f in row] for row in fits[m]])
        slopes[m] = {name: loglog_slope(ns, np.where(ok, metrics[m][name], np.nan), cfg.bootstrap,
                                        derived_seed(cfg.seed, _PURPOSE_BOOT, k, j))
                     for j, name in enumerate(METRICS)}
        certified[m] = [int(c) for c in ok.sum(1)]
    if _has_control(cfg):
        metrics[CONTROL] = acc["control"]
    diagnostics = {m: _diagnostics(cfg, ns, fits[m], metrics[m]) for m in cfg.models}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    stats = study_statistics(cfg, ns, metrics, {m: np.array([[f["certified"] for f in row] for row in fits[m]])
                                                for m in cfg.models})
    return ReparamResult(config, ns, {m: metrics[m]["D"] for m in cfg.models},
                         {m: metrics[m]["L2"] for m in cfg.models}, acc["train"], slopes, acc["seconds"],
                         time.perf_counter() - begin, metrics, fits, acc["truths"][0], certified,
                         list(checkpoints(cfg)), diagnostics, stats, acc["valley"], acc["truths"])


def _by_truth(a: np.ndarray, n_truths: int) -> np.ndarray:
    """(N, T·R) -> (T, N, R)."""
    n_levels, cols = a.shape
    return a.reshape(n_levels, n_truths, cols // n_truths).transpose(1, 0, 2)


def _flags(v: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.isfinite(v), (v > threshold).astype(float), np.nan)


def model_statistics(cfg: ReparamConfig, ns: list[int], m: dict[str, np.ndarray], ok: np.ndarray | None,
                     n_truths: int, seed: int) -> dict:
    """The summaries of one model (theory/reparam_stats.py) over certified fits: arithmetic means
    of split-cell D, singleton D and ‖f̂ − f*‖ with log-log slopes; the share of split-cell D above
    threshold; median D_max and the non-identified share. ok: certified flags (None: all kept)."""
    keep = (lambda a: a) if ok is None else (lambda a: np.where(ok, a, np.nan))  # noqa: E731
    t = lambda k: _by_truth(keep(m[k]), n_truths)  # noqa: E731
    b = cfg.bootstrap
    if "D_max" not in m:  # the control: singleton cells only
        return {"mean_D": mean_summary(ns, t("D"), b, seed), "mean_L2": mean_summary(ns, t("L2"), b, seed + 1)}
    return {"mean_D_multi": mean_summary(ns, t("D_multi"), b, seed),
            "mean_D_single": mean_summary(ns, t("D_single"), b, seed + 1),
            "mean_L2": mean_summary(ns, t("L2"), b, seed + 2),
            "share_D_multi": share_summary(ns, _flags(t("D_multi"), cfg.threshold), b, seed + 3),
            "D_max": median_summary(ns, t("D_max"), b, seed + 4),
            "nonidentified": share_summary(ns, _flags(t("D_max"), cfg.threshold), b, seed + 5)}


def study_statistics(cfg: ReparamConfig, ns: list[int], metrics: dict[str, dict[str, np.ndarray]],
                     certified: dict[str, np.ndarray]) -> dict:
    """{"pooled": model -> `model_statistics` over all truths, "by_truth": seed -> model -> the
    same for that truth alone}; the control appears as CONTROL."""
    seeds = cfg.seeds()
    r = cfg.replicates
    out: dict = {"pooled": {}, "by_truth": {str(s): {} for s in seeds}}
    for k, (model, m) in enumerate(metrics.items()):
        ok = certified.get(model)
        base = derived_seed(cfg.seed, _PURPOSE_BOOT, 100 + k) % 2 ** 31
        out["pooled"][model] = model_statistics(cfg, ns, m, ok, len(seeds), base)
        for ti, s in enumerate(seeds):
            cols = slice(ti * r, (ti + 1) * r)
            sub = {key: a[:, cols] for key, a in m.items()}
            out["by_truth"][str(s)][model] = model_statistics(cfg, ns, sub, None if ok is None else ok[:, cols],
                                                              1, base + 10 * (ti + 1))
    return out


# ----------------------------------------------------------------------------- paper vs lab


SHARED_BAND = RULE["band"]  # the shared models' (and the control's) slope of ln(mean D) vs ln n


def _criterion() -> str:
    lo, hi = RULE["band"]
    return (f"over n spanning >= {RULE['min_span']:.0f}x, pooled over the truths, τ = {RULE['threshold']}: "
            f"each shared model's slope of ln(mean split-cell D) vs ln n in [{lo}, {hi}], its share of "
            f"split-cell D > τ and its share of non-identified replicates (D_max > τ over starts within "
            f"{RULE['near_best']}σ² of the best) <= {RULE['share_max']} at the largest n; no-share's "
            f"non-identified share at the largest n with Wilson lower bound >= {RULE['nonid_min']}, and "
            f"no decline: the 95 % CI of its mean split-cell D slope reaches {RULE['flat']}, or those of "
            f"its share trend and median-D_max slope both do; the exact-atom control's mean D slope "
            f"in [{lo}, {hi}]")


def _lab_text(result: dict) -> str:
    st = result.get("stats", {}).get("pooled", {})
    ns = result.get("ns", [])
    fmt = lambda s: "n/a" if not s else f"{s['slope']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]"  # noqa: E731
    parts = []
    for m, s in st.items():
        if m == CONTROL:
            parts.append(f"control (no-share, exact atoms): mean D {fmt((s.get('mean_D') or {}).get('slope'))}")
            continue
        last = ((s.get("nonidentified") or {}).get("per_n") or [{}])[-1]
        parts.append(f"{m}: mean split-cell D {fmt((s.get('mean_D_multi') or {}).get('slope'))}, "
                     f"non-identified {last.get('k', '?')}/{last.get('m', '?')} at n={ns[-1] if ns else '?'}")
    cert = result.get("certified", {})
    cfg = result.get("config", {})
    total = len(ns) * int(cfg.get("replicates", 0)) * max(1, len(cfg.get("truth_seeds") or [0]))
    return "; ".join(parts) + " (n = " + (f"{min(ns)}…{max(ns)}" if ns else "none") + "; certified fits " \
        + ", ".join(f"{m} {sum(c)}/{total}" for m, c in cert.items()) + ")"


def table_row(result: dict) -> dict:
    """The paper-vs-lab row "[L] §6" from a result JSON (`ReparamResult.to_json()`), decided by
    `reparam_stats.judge` on the pooled statistics: holds True (reproduced), False (differs, the
    gap names each failed check with its value), None (a statistic missing, or n spanning less
    than two decades: not judged)."""
    row = {"claim": "with a known shared map the risk E[D] falls ~n^-1/2 and the parameters are "
                    "identified; without sharing an over-specified cell has a flat valley: no "
                    "polynomial decline, replicates stay non-identified; exact atoms recover n^-1/2",
           "paper": "shared ≈ −1/2; no-share slower than any polynomial (Thms, docs/papers.md §6)",
           "lab": _lab_text(result), "criterion": _criterion(), "holds": None, "gap": ""}
    if not result.get("stats"):
        row["gap"] = "no statistics in the result (a model not run)"
        return row
    verdict = judge(result["stats"].get("pooled", {}), result.get("ns", []))
    row["holds"], row["gap"] = verdict["holds"], verdict["gap"]
    return row


def summary_lines(result: dict) -> list[str]:
    """The study's numbers as text lines (what `prefixlab reparam-sim` prints): a legend, then per
    model and n the mean split-cell D with its CI, the far and non-identified counts and the median
    D_max, then per model the slopes and trends, and the control's slope."""
    st = result.get("stats", {}).get("pooled", {})
    cfg = result.get("config", {})
    tau, tol = cfg.get("threshold", RULE["threshold"]), cfg.get("near_best", RULE["near_best"])
    e = lambda v: "n/a" if v is None else f"{v:.2e}"  # noqa: E731
    ci = lambda d: f"{e(d.get('value'))} [{e(d.get('ci_low'))}, {e(d.get('ci_high'))}]"  # noqa: E731
    def sl(d: dict | None) -> str:
        return "n/a" if not d else (f"{d.get('slope', d.get('per_decade')):+.2f} "
                                    f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]")
    lines = [f"legend: mean D = arithmetic mean of the split-cell D of certified split-start fits "
             f"[95 % bootstrap CI]; far = fits with split-cell D > {tau}; non-id = replicates whose "
             f"starts within {tol} σ² of the best reach D_max > {tau}; med D_max = median D_max; "
             f"slopes: ln(mean) vs ln n, trends: share per decade of n",
             f"{'model':14s} {'n':>7s}  {'mean D [95% CI]':32s} {'far':>7s} {'non-id':>7s} {'med D_max':>10s}"]
    for m, s in st.items():
        if m == CONTROL:
            continue
        for mean, far, nid, dmax in zip(s["mean_D_multi"]["per_n"], s["share_D_multi"]["per_n"],
                                        s["nonidentified"]["per_n"], s["D_max"]["per_n"]):
            lines.append(f"{m:14s} {mean['n']:>7d}  {ci(mean):32s} {far['k']:>3d}/{far['m']:<3d} "
                         f"{nid['k']:>3d}/{nid['m']:<3d} {e(dmax.get('value')):>10s}")
    for m, s in st.items():
        if m == CONTROL:
            lines.append(f"{m}: mean D slope {sl(s['mean_D']['slope'])}; ‖f̂−f*‖ {sl(s['mean_L2']['slope'])}")
        else:
            lines.append(f"{m}: mean split-cell D slope {sl(s['mean_D_multi']['slope'])}; far trend "
                         f"{sl(s['share_D_multi']['trend'])}; non-id trend {sl(s['nonidentified']['trend'])}; "
                         f"median D_max slope {sl(s['D_max']['slope'])}; ‖f̂−f*‖ {sl(s['mean_L2']['slope'])}")
    return lines
