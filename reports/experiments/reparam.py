"""[L]'s reparameterization study's report section: its figure and its slopes."""

from __future__ import annotations

from reports.html import Table
from reports.theory_figures import reparam_study_figure
from theory.reparam import ReparamResult


def section(r: dict, records: dict) -> tuple:
    items = []
    try:
        items.append(reparam_study_figure(ReparamResult.from_json(r)))
    except Exception as e:  # the table below still says what was measured
        items.append(f"(figure unavailable: {e})")
    fmt = lambda x: "n/a" if not x else (f"{x.get('slope', x.get('per_decade')):+.2f} "
                                         f"[{x['ci_low']:+.2f}, {x['ci_high']:+.2f}]")
    last = lambda s, k: (lambda p: f"{p['k']}/{p['m']}")(s[k]["per_n"][-1]) if s.get(k) else "n/a"
    rows = [[m, fmt((s.get("mean_D_multi") or s.get("mean_D") or {}).get("slope")), last(s, "share_D_multi"),
             last(s, "nonidentified"), fmt((s.get("D_max") or {}).get("slope")), fmt(s["mean_L2"].get("slope")),
             f"{sum(r['certified'][m])}" if m in r.get("certified", {}) else "control"]
            for m, s in r.get("stats", {}).get("pooled", {}).items()]
    items.append(Table(["model", "slope of mean split-cell D (control: mean D)", "far at largest n",
                        "non-identified at largest n", "slope of median D_max", "‖f̂ − f*‖",
                        "certified fits"], rows))
    return ("Reparameterization study ([L] §6)", items,
            "log-log slopes of arithmetic means against n, 95 % bootstrap CIs; far: split-cell D above the "
            "threshold; non-identified: D_max (over starts the data cannot tell apart) above it. Theory: "
            "f at −1/2 for every model; the risk at −1/2 and identified with a known shared map; without "
            "sharing a flat valley in the split cell (docs/reparam.md).")
