"""Figures of the theory stages ([P] §3, docs/papers.md §5; [L], docs/papers.md §6): Theorem 1's
inverse temperature against its worst case, the generated text against its target, and the
capacity count. Each builder returns a `go.Figure` and never shows it."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports.figures import escape_token
from theory.reparam import ReparamResult


def beta_figure(checks: list[dict], title: str = "Theorem 1: inverse temperature β") -> go.Figure:
    """Per (V, N): the β the construction used, the smallest β that still generated every target,
    and the predicted worst-case threshold."""
    names = [f"V={c['V']}, N={c['N']}" for c in checks]
    fig = go.Figure()
    for key, label in (("beta", "β used"), ("min_beta", "smallest β that works (measured)"),
                       ("predicted_min_beta_worst_case", "worst-case threshold (closed form)")):
        fig.add_trace(go.Bar(x=names, y=[c.get(key) for c in checks], name=label))
    fig.update_layout(title=title, barmode="group", yaxis_title="β", template="plotly_white", height=360)
    return fig


def text_figure(target: str, generated: str, title: str = "Theorem 1: generated text against its target") -> go.Figure:
    """Two rows of characters, green where the generated character equals the target's."""
    n = max(len(target), len(generated))
    tgt, gen = target.ljust(n), generated.ljust(n)
    match = [[1 if a == b else 0 for a, b in zip(tgt, gen)]] * 2
    text = [[escape_token(ch) for ch in tgt], [escape_token(ch) for ch in gen]]
    fig = go.Figure(go.Heatmap(z=match, text=text, texttemplate="%{text}", showscale=False, zmin=0, zmax=1,
                               colorscale=[[0, "#f4b6b6"], [1, "#b8e0b8"]], y=["target", "generated"],
                               hovertemplate="position %{x}: %{text}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=200, xaxis_title="position",
                      yaxis_autorange="reversed", margin=dict(t=40, b=40))
    return fig


def capacity_figure(cap: dict, title: str = "Distinct greedy completions: hard vs virtual first tokens") -> go.Figure:
    fig = go.Figure(go.Bar(x=[f"{cap['n_hard']} hard tokens", f"{cap['n_virtual']:,} virtual tokens"],
                           y=[cap["hard_distinct"], cap["virtual_distinct"]],
                           text=[cap["hard_distinct"], cap["virtual_distinct"]], textposition="outside",
                           marker_color=["#7f7f7f", "#1f77b4"]))
    fig.update_layout(title=title, yaxis_type="log", yaxis_title="distinct completions", template="plotly_white",
                      height=340)
    return fig


_COLORS = {"shared-linear": "#1f77b4", "shared-tanh": "#2ca02c", "no-share": "#d62728"}


def reparam_study_figure(result: ReparamResult) -> go.Figure:
    """Three panels ([L], docs/papers.md §6; docs/reparam.md): (1) per model the arithmetic mean of
    the split-cell D against n with its 95 % bootstrap CI (and the exact-atom control's mean D),
    log-log; (2) per model the share of non-identified replicates (D_max above the threshold)
    with Wilson intervals; (3) for one replicate, the training loss along the valley starts' path
    (excess residual sum of squares over the truth's, in σ²) against the split-cell D there:
    No-share's stays flat while D grows, a shared model's rises at once."""
    stats = result.stats.get("pooled", {})
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "risk: mean split-cell D (control: mean D)", "share of non-identified replicates",
        "the valley: one replicate"))
    for model, s in stats.items():
        color = _COLORS.get(model, "#7f7f7f")
        control = "mean_D" in s
        mean = s["mean_D" if control else "mean_D_multi"]
        pts = [p for p in mean["per_n"] if p["value"] is not None]
        sl = mean.get("slope")
        label = f"{model}: slope {sl['slope']:+.2f} [{sl['ci_low']:+.2f}, {sl['ci_high']:+.2f}]" if sl else model
        fig.add_trace(go.Scatter(
            x=[p["n"] for p in pts], y=[p["value"] for p in pts], mode="lines+markers", name=label,
            legendgroup=model, line=dict(color=color, dash="dot" if control else "solid"),
            error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["value"] for p in pts],
                         arrayminus=[p["value"] - p["ci_low"] for p in pts])), row=1, col=1)
        if control:
            continue
        nid = s["nonidentified"]["per_n"]
        fig.add_trace(go.Scatter(
            x=[p["n"] for p in nid], y=[p["share"] for p in nid], mode="lines+markers", showlegend=False,
            legendgroup=model, line=dict(color=color), name=model,
            error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["share"] for p in nid],
                         arrayminus=[p["share"] - p["ci_low"] for p in nid])), row=1, col=2)
    valley = result.valley or {}
    for model, v in valley.get("models", {}).items():
        fig.add_trace(go.Scatter(
            x=v["D_multi"], y=v["loss_gain"], mode="lines+markers", showlegend=False, legendgroup=model,
            name=model, line=dict(color=_COLORS.get(model, "#7f7f7f")),
            text=[f"t = {t:.2f}" for t in valley["t"]],
            hovertemplate="%{text}: D %{x:.3g}, excess RSS %{y:.3g} σ²<extra>" + model + "</extra>"), row=1, col=3)
    fig.update_xaxes(type="log", title="n (samples)", row=1, col=1)
    fig.update_yaxes(type="log", title="mean D", row=1, col=1)
    fig.update_xaxes(type="log", title="n (samples)", row=1, col=2)
    fig.update_yaxes(title="share with D_max > threshold", range=[-0.05, 1.05], row=1, col=2)
    fig.update_xaxes(title=f"split-cell D along the path (n = {valley.get('n', '?')})", row=1, col=3)
    fig.update_yaxes(title="training RSS − truth's, in σ²", range=[-5, 60], row=1, col=3)
    fig.update_layout(title="Reparameterization ([L], docs/papers.md §6): risk, identifiability, and the valley",
                      template="plotly_white", height=460, legend=dict(orientation="h", y=-0.25))
    return fig
