"""Figures of the theory stages ([P] §3, papers.md §5; [L], papers.md §6): Theorem 1's inverse temperature against
its worst case, the generated text against its target, and the capacity count. Each builder
returns a `go.Figure` and never shows it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

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


def reparam_figure(result: ReparamResult, metric: str = "D") -> go.Figure:
    """Log-log plot of D (or metric="L2", the regression error) against n: replicate points,
    geometric mean ± one standard error of ln per n, and the fitted line with its slope."""
    values = result.voronoi if metric == "D" else result.l2_error
    label = "Voronoi loss D(Ĝ, G*)" if metric == "D" else "‖f_Ĝ − f_G*‖ (held-out L2)"
    ns = np.array(result.ns, dtype=float)
    fig = go.Figure()
    for model, v in values.items():
        color = _COLORS.get(model, "#7f7f7f")
        logv = np.log(np.maximum(v, np.finfo(float).tiny))
        mean = logv.mean(1)
        se = logv.std(1, ddof=1) / np.sqrt(logv.shape[1])
        fig.add_trace(go.Scatter(
            x=np.repeat(ns, v.shape[1]), y=v.ravel(), mode="markers", legendgroup=model,
            showlegend=False, marker=dict(color=color, size=4, opacity=0.3), name=model))
        fig.add_trace(go.Scatter(
            x=ns, y=np.exp(mean), mode="markers", legendgroup=model, name=f"{model} (mean)",
            marker=dict(color=color, size=9),
            error_y=dict(type="data", symmetric=False, array=np.exp(mean + se) - np.exp(mean),
                         arrayminus=np.exp(mean) - np.exp(mean - se))))
        s = result.slopes[model][metric]
        fig.add_trace(go.Scatter(
            x=ns, y=np.exp(s["intercept"] + s["slope"] * np.log(ns)), mode="lines",
            legendgroup=model, line=dict(color=color, dash="dash"),
            name=f"{model}: slope {s['slope']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"))
    fig.update_xaxes(type="log", title="n (samples)")
    fig.update_yaxes(type="log", title=label)
    fig.update_layout(title=f"Reparameterization and sample efficiency ([L], papers.md §6): "
                            f"{label} vs n", template="plotly_white")
    return fig
