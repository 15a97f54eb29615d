"""The statistics of the reparameterization study and its verdict rule (docs/papers.md §6, §6b;
docs/reparam.md). Pure numpy: every function takes plain arrays, so each can be checked by hand.

The arrays are (T, N, R): T truths (base seeds), N sample sizes, R replicates per truth and n;
NaN marks a value that does not exist (an uncertified fit, a fit without a multi-atom cell).

What is estimated, per model
----------------------------
- `mean_summary`: the arithmetic mean (the risk E[D] that [L]'s theorems bound), per n pooled over
  truths with a 95 % percentile-bootstrap interval, and the log-log slope of the mean against n.
- `median_summary`: the same for the median (used for D_max, which is heavy-tailed).
- `share_summary`: the share of replicates with an indicator set (D above a threshold), per n
  pooled over truths with a Wilson interval, and its trend per decade of n.
- Slopes and trends with several truths are the average of the per-truth least-squares slopes
  (a common slope with one intercept per truth, as the n-grids are equal). Their intervals come
  from one bootstrap that resamples replicates within each (truth, n) cell.

The verdict (`judge`) is a fixed rule on the pooled statistics; `RULE` holds its constants.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % normal quantile

# The rule's constants, fixed before the judged run (docs/reparam.md, "Verdict rule").
RULE = {
    "band": (-0.65, -0.35),  # shared: slope of ln(mean split-cell D) vs ln n; control: of ln(mean D)
    "threshold": 0.05,  # split-cell D above this counts as "far" (a share, and non-identified)
    "near_best": 0.05,  # endpoints within this many σ² of residual sum of squares of the best
    "share_max": 0.10,  # shared: shares at the largest n at most this ("falls to about 0")
    "nonid_min": 0.10,  # no-share: Wilson lower bound of the non-identified share at the largest n
    "flat": 0.0,  # no-share: an interval whose upper end is >= this shows no decline
    "min_span": 100.0,  # largest n / smallest n needed to judge a rate (two decades)
}


def wilson(k: int, m: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial share k/m; (nan, nan) when m = 0."""
    if m <= 0:
        return float("nan"), float("nan")
    p = k / m
    denom = 1 + z * z / m
    center = (p + z * z / (2 * m)) / denom
    half = z * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _cells(values: np.ndarray) -> list[list[np.ndarray]]:
    """values (T, N, R) -> [t][n] the finite values of that cell."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 3:
        raise ValueError(f"values must be (truths, ns, replicates), got shape {v.shape}")
    return [[row[np.isfinite(row)] for row in per_t] for per_t in v]


def _resample(cells: list[list[np.ndarray]], n_boot: int, seed: int) -> list[list[np.ndarray]]:
    """[t][n] (n_boot, m) resamples with replacement of each cell (empty cells stay empty)."""
    rng = np.random.default_rng(seed)
    return [[c[rng.integers(0, len(c), size=(n_boot, len(c)))] if len(c) else np.empty((n_boot, 0))
             for c in per_t] for per_t in cells]


def pooled_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Average over truths of the least-squares slope of y against x. y (..., T, N), NaN where a
    cell has no value; a truth with fewer than two finite cells is left out. Returns (...)."""
    y = np.asarray(y, dtype=float)
    x = np.broadcast_to(np.asarray(x, dtype=float), y.shape)
    ok = np.isfinite(y)
    cnt = ok.sum(-1)
    xm = np.where(ok, x, 0).sum(-1) / np.maximum(cnt, 1)
    ym = np.where(ok, y, 0).sum(-1) / np.maximum(cnt, 1)
    xc = np.where(ok, x - xm[..., None], 0)
    sxx = (xc ** 2).sum(-1)
    sxy = (xc * np.where(ok, y - ym[..., None], 0)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_truth = np.where((cnt >= 2) & (sxx > 0), sxy / sxx, np.nan)
    good = np.isfinite(per_truth)
    return np.where(good.any(-1), np.where(good, per_truth, 0).sum(-1) / np.maximum(good.sum(-1), 1),
                    np.nan)


def _stat(samples: np.ndarray, how: str) -> np.ndarray:
    """mean or median over the last axis; NaN for an empty axis."""
    if samples.shape[-1] == 0:
        return np.full(samples.shape[:-1], np.nan)
    return samples.mean(-1) if how == "mean" else np.median(samples, -1)


def _interval(point: float, boot: np.ndarray) -> dict:
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {"value": float(point), "ci_low": float(lo), "ci_high": float(hi)}


def _location_summary(ns, values, n_boot: int, seed: int, how: str) -> dict:
    cells = _cells(values)
    boot = _resample(cells, n_boot, seed)
    n_levels = len(ns)
    per_n = []
    for j in range(n_levels):
        pooled = np.concatenate([cells[t][j] for t in range(len(cells))])
        pooled_boot = np.concatenate([boot[t][j] for t in range(len(cells))], -1)
        d = _interval(_stat(pooled, how), _stat(pooled_boot, how))
        per_n.append({**d, "n": int(ns[j]), "count": int(len(pooled))})
    point_t = np.array([[_stat(cells[t][j], how) for j in range(n_levels)] for t in range(len(cells))])
    boot_t = np.stack([np.stack([_stat(boot[t][j], how) for j in range(n_levels)], -1)
                       for t in range(len(cells))], -2)  # (n_boot, T, N)
    x = np.log(np.asarray(ns, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = pooled_slope(x, np.log(point_t))
        boot_slope = pooled_slope(x, np.log(boot_t))
    out = {"per_n": per_n, "slope": None}
    if np.isfinite(slope):
        s = _interval(slope, boot_slope)
        out["slope"] = {"slope": s["value"], "ci_low": s["ci_low"], "ci_high": s["ci_high"]}
    return out


def mean_summary(ns, values, n_boot: int, seed: int) -> dict:
    """Per n: the arithmetic mean pooled over truths [95 % bootstrap CI]; the slope of ln(mean)
    against ln n (per-truth slopes averaged) [95 % bootstrap CI]; slope None below two n."""
    return _location_summary(ns, values, n_boot, seed, "mean")


def median_summary(ns, values, n_boot: int, seed: int) -> dict:
    """As `mean_summary`, for the median."""
    return _location_summary(ns, values, n_boot, seed, "median")


def share_summary(ns, flags, n_boot: int, seed: int) -> dict:
    """flags (T, N, R) of 0/1 (NaN: no value). Per n: count k of 1s among m values pooled over
    truths, the share k/m and its Wilson interval; the trend: slope of the per-truth share against
    log10 n (change of the share per decade of n, per-truth slopes averaged) [95 % bootstrap CI]."""
    cells = _cells(flags)
    boot = _resample(cells, n_boot, seed)
    per_n = []
    for j, n in enumerate(ns):
        pooled = np.concatenate([cells[t][j] for t in range(len(cells))])
        k, m = int(pooled.sum()), int(len(pooled))
        lo, hi = wilson(k, m)
        per_n.append({"n": int(n), "k": k, "m": m, "share": k / m if m else float("nan"),
                      "ci_low": lo, "ci_high": hi})
    point_t = np.array([[_stat(cells[t][j], "mean") for j in range(len(ns))] for t in range(len(cells))])
    boot_t = np.stack([np.stack([_stat(boot[t][j], "mean") for j in range(len(ns))], -1)
                       for t in range(len(cells))], -2)
    x = np.log10(np.asarray(ns, dtype=float))
    slope = pooled_slope(x, point_t)
    trend = None
    if np.isfinite(slope):
        s = _interval(slope, pooled_slope(x, boot_t))
        trend = {"per_decade": s["value"], "ci_low": s["ci_low"], "ci_high": s["ci_high"]}
    return {"per_n": per_n, "trend": trend}


def near_best_max(losses: np.ndarray, d_values: np.ndarray, certified: np.ndarray, n: int,
                  noise_sd: float, tol: float) -> np.ndarray:
    """D_max per replicate: the largest D among the certified endpoints whose training loss is
    within tol·σ²/n of the best certified endpoint's (a residual sum of squares within tol·σ²:
    the data cannot tell such endpoints apart). With σ = 0, within tol·(best loss) + 1e-30.
    losses, d_values, certified (..., S) over the S starts; NaN where no endpoint qualifies."""
    losses = np.asarray(losses, dtype=float)
    ok = np.asarray(certified, dtype=bool) & np.isfinite(losses)
    best = np.where(ok, losses, np.inf).min(-1, keepdims=True)
    slack = tol * noise_sd ** 2 / n if noise_sd > 0 else tol * np.abs(best) + 1e-30
    near = ok & (losses <= best + slack) & np.isfinite(np.asarray(d_values, dtype=float))
    return np.where(near.any(-1), np.where(near, d_values, -np.inf).max(-1), np.nan)


# ----------------------------------------------------------------------------- the verdict


def _check(name: str, value, bound: str, ok: bool | None) -> dict:
    return {"name": name, "value": value, "bound": bound, "ok": ok}


def _last(per_n: list[dict], key: str):
    return per_n[-1][key] if per_n else None


def judge(stats: dict, ns, shared=("shared-linear", "shared-tanh"), rule: dict = RULE) -> dict:
    """The verdict of the [L] §6 row from pooled statistics (`study_statistics` output's "pooled").

    reproduced (True) when, at n from min(ns) to max(ns) spanning >= rule["min_span"]:
      each shared model: (a) slope of ln(mean split-cell D) vs ln n inside rule["band"];
        (b) share of split-cell D > threshold at the largest n <= rule["share_max"];
        (c) share of non-identified replicates (D_max > threshold) at the largest n <= share_max;
      no-share: (d) Wilson lower bound of its non-identified share at the largest n >= nonid_min;
        (e) no decline: the 95 % CI of its mean split-cell D slope reaches rule["flat"] (0), or
            both the CI of the trend of its share above threshold and the CI of the slope of its
            median D_max reach it;
      control (no-share with as many atoms as the truth): (f) slope of ln(mean D) inside the band.
    differs (False) when any check fails; None (no verdict) when a statistic is missing or the
    range of n is too short to judge a rate. Returns {"holds", "checks", "gap"}."""
    lo, hi = rule["band"]
    flat = rule["flat"]
    checks: list[dict] = []
    ns = list(ns)
    if len(ns) < 2 or max(ns) / min(ns) < rule["min_span"]:
        return {"holds": None, "checks": checks,
                "gap": f"n spans {max(ns) / min(ns) if ns else 0:.0f}x, below the "
                       f"{rule['min_span']:.0f}x needed to judge a rate: not judged"}

    def get(model, *keys):
        node = stats.get(model)
        for k in keys:
            node = None if node is None else node.get(k)
        return node

    needed = [get(m, "mean_D_multi", "slope") for m in shared] + [
        get("no-share", "mean_D_multi", "slope"), get("no-share-exact", "mean_D", "slope")]
    if any(s is None for s in needed) or any(get(m, "nonidentified", "per_n") is None
                                             for m in (*shared, "no-share")):
        return {"holds": None, "checks": checks, "gap": "a statistic is missing (a model not run, "
                                                        "or too few certified fits at two n)"}
    for m in shared:
        s = get(m, "mean_D_multi", "slope")["slope"]
        checks.append(_check(f"{m}: mean split-cell D slope", s, f"in [{lo}, {hi}]", lo <= s <= hi))
        sh = _last(get(m, "share_D_multi", "per_n"), "share")
        checks.append(_check(f"{m}: share split-cell D > τ at n={ns[-1]}", sh,
                             f"<= {rule['share_max']}", sh is not None and sh <= rule["share_max"]))
        ni = _last(get(m, "nonidentified", "per_n"), "share")
        checks.append(_check(f"{m}: non-identified share at n={ns[-1]}", ni,
                             f"<= {rule['share_max']}", ni is not None and ni <= rule["share_max"]))
    low = _last(get("no-share", "nonidentified", "per_n"), "ci_low")
    checks.append(_check(f"no-share: non-identified share at n={ns[-1]}, Wilson lower bound", low,
                         f">= {rule['nonid_min']}", low is not None and low >= rule["nonid_min"]))
    mean_hi = get("no-share", "mean_D_multi", "slope")["ci_high"]
    trend = get("no-share", "share_D_multi", "trend")
    dmax = get("no-share", "D_max", "slope")
    e1 = mean_hi >= flat
    e2 = trend is not None and dmax is not None and trend["ci_high"] >= flat and dmax["ci_high"] >= flat
    checks.append(_check("no-share: no decline (mean split-cell D slope CI upper; or share-trend "
                         "and median D_max slope CI uppers)",
                         [mean_hi, trend and trend["ci_high"], dmax and dmax["ci_high"]],
                         f">= {flat}", bool(e1 or e2)))
    c = get("no-share-exact", "mean_D", "slope")["slope"]
    checks.append(_check("control (no-share, exact atoms): mean D slope", c, f"in [{lo}, {hi}]",
                         lo <= c <= hi))
    failed = [ch for ch in checks if not ch["ok"]]
    return {"holds": not failed, "checks": checks,
            "gap": "; ".join(f"{ch['name']} = {_fmt(ch['value'])}, needs {ch['bound']}" for ch in failed)}


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "n/a" if v is None else f"{v:+.3g}"
