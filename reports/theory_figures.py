"""Figures of the theory stages ([P] §3, papers.md §5): Theorem 1's inverse temperature against
its worst case, the generated text against its target, and the capacity count. Each builder
returns a `go.Figure` and never shows it."""

from __future__ import annotations

import plotly.graph_objects as go

from reports.figures import escape_token


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
