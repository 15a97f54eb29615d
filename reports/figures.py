"""Plotly figure builders for reports. Each returns a `go.Figure` and never shows it.

Every string that comes from a token, a run or a task goes through `escape_token`: plotly renders
hover text, tick labels and titles as pseudo-HTML, so a token such as `<script>` would otherwise
become markup (LLaMA vocabularies hold such tokens).

The attention figure keeps every layer and head of every panel in `layout.meta` (float32, base64,
plotly's own typed-array layout) and shows one (layer, head) at a time: two dropdowns pick them
and a small script in the report (`reports/html.py`, ATTENTION_JS) restyles the heatmaps; the
raw/renormalized toggle is a plain plotly button that swaps which of two trace sets is visible.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from prefixlab_common.errors import UserError

META_KEY = "prefixlab_attention"
VIEWS = ("raw", "renormalized")
ZERO_FLOOR = 1e-10  # log-scale floor of the invariance figure; exact zeros sit on it
PREFIX_COLOR = "#d62728"
PROMPT_COLOR = "#444444"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#d62728"]
SYMBOLS = ["circle", "diamond", "square", "triangle-up", "x", "star", "cross", "pentagon"]


def escape_token(s) -> str:
    """A token (or any label) as text for plotly and HTML: `&`, `<`, `>` become entities, which
    plotly and browsers display as the characters themselves, never as markup."""
    return html.escape(str(s), quote=False)


def label_html(s) -> str:
    """A multi-line label for plotly: each line escaped, joined with <br>."""
    return "<br>".join(escape_token(line) for line in str(s).split("\n"))


# --------------------------------------------------------------------------------------------
# Attention heatmaps ([P] Figure 1 style).


@dataclass
class AttentionPanel:
    """One method's attention on one input.

    pattern:       [layer, head, Q, K] with-method pattern, non-content keys first; layers whose
                   prefix is shorter (a shallow prefix) are padded with NaN key columns.
    n_pre:         non-content keys (prefix slots or soft-prompt positions) at the front of K.
    n_query_pre:   non-content queries (soft-prompt positions) at the front of Q; 0 for a prefix.
    content_labels: token strings of the T content positions (unescaped).
    prompt_len:    content positions that are the task's input X; a line marks where Y begins.
    pre_label:     label stem of the non-content positions: P1, P2, ... for prefix slots.
    """

    title: str
    pattern: Tensor
    n_pre: int
    n_query_pre: int
    content_labels: list[str]
    prompt_len: int | None = None
    pre_label: str = "P"

    def __post_init__(self) -> None:
        if self.pattern.ndim != 4:
            raise UserError(f"an attention panel needs a [layer, head, query, key] pattern, got shape "
                            f"{tuple(self.pattern.shape)}")
        L, H, Q, K = self.pattern.shape
        T = len(self.content_labels)
        if Q != self.n_query_pre + T or K != self.n_pre + T:
            raise UserError(f"pattern shape {(Q, K)} does not match {T} content tokens with "
                            f"{self.n_query_pre} prompt queries and {self.n_pre} prefix keys")

    @property
    def key_labels(self) -> list[str]:
        return [f"{self.pre_label}{k + 1}" for k in range(self.n_pre)] + list(self.content_labels)

    @property
    def query_labels(self) -> list[str]:
        return [f"{self.pre_label}{k + 1}" for k in range(self.n_query_pre)] + list(self.content_labels)


def renormalized_pattern(pattern: Tensor, n_pre: int) -> Tensor:
    """The content part of a pattern renormalized to sum to 1 per query (A^pt / (1 - alpha),
    docs/papers.md §4); non-content keys become NaN, and so do rows with no content mass."""
    content = pattern[..., n_pre:].double()
    mass = content.sum(-1, keepdim=True)
    renorm = torch.where(mass > 0, content / mass.clamp_min(torch.finfo(torch.float64).tiny),
                         torch.full_like(content, float("nan")))
    pre = torch.full((*pattern.shape[:-1], n_pre), float("nan"), dtype=torch.float64)
    return torch.cat([pre, renorm], -1).to(pattern.dtype)


def encode_array(a) -> dict:
    """float32 array -> plotly's typed-array spec {dtype, bdata, shape} (exact, compact)."""
    a = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
    return {"dtype": "f4", "bdata": base64.b64encode(a.tobytes()).decode("ascii"),
            "shape": ", ".join(str(s) for s in a.shape)}


def decode_array(spec) -> np.ndarray:
    """Inverse of `encode_array`; also accepts a plain (nested) list or array."""
    if isinstance(spec, dict) and "bdata" in spec:
        shape = tuple(int(s) for s in str(spec["shape"]).split(","))
        dtype = np.dtype(spec.get("dtype", "f4")).newbyteorder("<")
        return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=dtype).reshape(shape)
    return np.asarray(spec, dtype=float)


def _crop(panel: AttentionPanel, window: tuple[int, int] | None) -> tuple[Tensor, list[int]]:
    """Content positions window[0]:window[1] (queries and keys); non-content positions stay."""
    T = len(panel.content_labels)
    lo, hi = (0, T) if window is None else (max(0, window[0]), min(T, window[1]))
    if lo >= hi:
        raise UserError(f"attention window {window} holds no content position (0..{T - 1})")
    keys = list(range(panel.n_pre)) + [panel.n_pre + i for i in range(lo, hi)]
    queries = list(range(panel.n_query_pre)) + [panel.n_query_pre + i for i in range(lo, hi)]
    return panel.pattern[:, :, queries][..., keys], list(range(lo, hi))


def _position_name(i: int, prompt_len: int | None) -> str:
    if prompt_len is None:
        return f"pos {i}"
    return f"x{i + 1}" if i < prompt_len else f"y{i - prompt_len + 1}"


def _panel_labels(p: AttentionPanel, positions: list[int]) -> tuple[list[str], list[str], list[list[str]]]:
    """A panel's key tokens, query tokens and hover text (position and token of query and key)."""
    content = [p.content_labels[j] for j in positions]
    pre_names = [f"{p.pre_label}{k + 1}" for k in range(p.n_pre)]
    key_tok = pre_names + content
    key_pos = pre_names + [_position_name(j, p.prompt_len) for j in positions]
    qpre = [f"{p.pre_label}{k + 1}" for k in range(p.n_query_pre)]
    q_tok = qpre + content
    q_pos = qpre + [_position_name(j, p.prompt_len) for j in positions]
    text = [[f"query {escape_token(q_pos[a])}: {escape_token(q_tok[a])}<br>"
             f"key {escape_token(key_pos[b])}: {escape_token(key_tok[b])}"
             for b in range(len(key_tok))] for a in range(len(q_tok))]
    return key_tok, q_tok, text


def _panel_shapes(p: AttentionPanel, positions: list[int], xref: str, yref: str, nk: int, nq: int,
                  nq_pre: int) -> list[dict]:
    """One panel's marks: red boxes around the prefix-slot keys and the soft-prompt queries, and a
    dashed line at the end of the prompt X (when the window shows it)."""
    shapes = []
    box = dict(type="rect", xref=xref, yref=yref, line=dict(color=PREFIX_COLOR, width=2.5),
               fillcolor="rgba(0,0,0,0)", layer="above")
    if p.n_pre:
        shapes.append({**box, "x0": -0.5, "x1": p.n_pre - 0.5, "y0": -0.5, "y1": nq - 0.5})
    if nq_pre:
        shapes.append({**box, "x0": -0.5, "x1": nk - 0.5, "y0": -0.5, "y1": nq_pre - 0.5})
    if p.prompt_len is not None and positions[0] < p.prompt_len <= positions[-1]:
        kx = p.n_pre + positions.index(p.prompt_len) - 0.5
        qy = nq_pre + positions.index(p.prompt_len) - 0.5
        line = dict(type="line", xref=xref, yref=yref, layer="above",
                    line=dict(color=PROMPT_COLOR, width=1.5, dash="dash"))
        shapes.append({**line, "x0": kx, "x1": kx, "y0": -0.5, "y1": nq - 0.5})
        shapes.append({**line, "x0": -0.5, "x1": nk - 0.5, "y0": qy, "y1": qy})
    return shapes


def _attention_menus(vis_raw: list[bool], vis_ren: list[bool], names: list[str], layer: int, head: int,
                     n_heads: int) -> list[dict]:
    """The raw/renormalized buttons and the layer and head dropdowns (the page's script swaps the
    heatmaps' data when a dropdown changes)."""
    return [
        dict(type="buttons", direction="right", x=0.0, xanchor="left", y=1.0, yanchor="bottom",
             pad=dict(t=0, b=52), showactive=True, active=0, name="view",
             buttons=[dict(label="raw", method="restyle", args=[{"visible": vis_raw}]),
                      dict(label="renormalized over content", method="restyle", args=[{"visible": vis_ren}])]),
        dict(type="dropdown", x=0.42, xanchor="left", y=1.0, yanchor="bottom", pad=dict(t=0, b=52),
             active=layer, name="layer",
             buttons=[dict(label=escape_token(n), method="skip", args=[None]) for n in names]),
        dict(type="dropdown", x=0.58, xanchor="left", y=1.0, yanchor="bottom", pad=dict(t=0, b=52),
             active=head, name="head",
             buttons=[dict(label=f"head {h}", method="skip", args=[None]) for h in range(n_heads)]),
    ]


def attention_figure(panels: list[AttentionPanel], title: str = "Attention patterns",
                     window: tuple[int, int] | None = None, max_tokens: int = 48,
                     layer: int = 0, head: int = 0, cols: int = 3,
                     layer_names: list[str] | None = None) -> go.Figure:
    """One heatmap per panel (method), side by side, for one (layer, head) at a time.

    Dropdowns select the layer and the head (usable for 32 x 32 heads: never one panel per head);
    buttons toggle raw and content-renormalized views. Long inputs are cropped to `window`
    (content positions lo:hi; default the first `max_tokens`); prefix slots are always shown.
    Keys on x, queries on y (top to bottom); tokens on both axes; red boxes mark prefix slots
    and soft-prompt positions, a dashed line the end of the prompt X.
    """
    if not panels:
        raise UserError("an attention figure needs at least one panel")
    n_layers, n_heads = panels[0].pattern.shape[:2]
    for p in panels:
        if tuple(p.pattern.shape[:2]) != (n_layers, n_heads):
            raise UserError("attention panels disagree on the number of layers and heads")
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise UserError(f"layer {layer} / head {head} out of range ({n_layers} layers, {n_heads} heads)")
    T = len(panels[0].content_labels)
    if window is None and T > max_tokens:
        window = (0, max_tokens)
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[label_html(p.title) for p in panels],
                        horizontal_spacing=0.07, vertical_spacing=min(0.3, 0.6 / rows) if rows > 1 else 0.08)
    raw_store: list[list[list]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
    ren_store: list[list[list]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
    shapes = []
    raw_traces, ren_traces = [], []
    for i, p in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        pat, positions = _crop(p, window)
        ren = renormalized_pattern(pat, p.n_pre)
        nq_pre = p.n_query_pre
        key_tok, q_tok, text = _panel_labels(p, positions)
        for l in range(n_layers):
            for h in range(n_heads):
                raw_store[l][h].append(encode_array(pat[l, h].float().numpy()))
                ren_store[l][h].append(encode_array(ren[l, h].float().numpy()))
        for view, z in (("raw", pat), ("renormalized", ren)):
            fig.add_trace(go.Heatmap(
                z=z[layer, head].float().numpy(), x=list(range(len(key_tok))), y=list(range(len(q_tok))),
                text=text, coloraxis="coloraxis", visible=view == "raw", name=label_html(p.title),
                hovertemplate="%{text}<br>" + view + " attention: %{z:.4f}<extra>" + label_html(p.title) + "</extra>",
                xgap=0.5, ygap=0.5), row=r, col=c)
            (raw_traces if view == "raw" else ren_traces).append(len(fig.data) - 1)
        xref = "x" if i == 0 else f"x{i + 1}"
        yref = "y" if i == 0 else f"y{i + 1}"
        nk, nq = len(key_tok), len(q_tok)
        fig.update_xaxes(tickmode="array", tickvals=list(range(nk)), ticktext=[escape_token(t) for t in key_tok],
                         showgrid=False, title_text="key", row=r, col=c)
        fig.update_yaxes(tickmode="array", tickvals=list(range(nq)), ticktext=[escape_token(t) for t in q_tok],
                         autorange="reversed", showgrid=False, title_text="query" if c == 1 else None,
                         row=r, col=c)
        shapes += _panel_shapes(p, positions, xref, yref, nk, nq, nq_pre)
    names = layer_names or [f"layer {l}" for l in range(n_layers)]
    n_vis = len(fig.data)
    vis_raw = [k in raw_traces for k in range(n_vis)]
    vis_ren = [k in ren_traces for k in range(n_vis)]
    menus = _attention_menus(vis_raw, vis_ren, names, layer, head, n_heads)
    height = 150 + rows * max(340, 16 * max(len(p.query_labels) for p in panels) + 90)
    fig.update_layout(
        title=dict(text=escape_token(title), x=0.0, xanchor="left", y=0.995, yanchor="top"),
        height=height, margin=dict(t=165, l=60, r=20, b=50), template="plotly_white",
        plot_bgcolor="#e6e6e6", updatemenus=menus, shapes=shapes,
        coloraxis=dict(colorscale="Blues", cmin=0.0, cmax=1.0, colorbar=dict(title=dict(text="attention"))),
        meta={META_KEY: {"raw": raw_store, "renormalized": ren_store, "raw_traces": raw_traces,
                         "renormalized_traces": ren_traces, "layer_menu": 1, "head_menu": 2,
                         "n_layers": int(n_layers), "n_heads": int(n_heads)}})
    return fig


def stored_attention(fig: go.Figure, panel: int, layer: int, head: int, view: str = "raw") -> np.ndarray:
    """The heatmap a panel shows for (layer, head) in `view`, as stored in the figure."""
    meta = fig.layout.meta[META_KEY]
    return decode_array(meta[view][layer][head][panel])


# --------------------------------------------------------------------------------------------
# Invariance.


def _fmt_small(v: float) -> str:
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.0e}" if v < 1e-2 else f"{v:.2f}"


def _tolerance_scale(tol: float) -> list:
    lo = math.log10(ZERO_FLOOR)
    t = min(max((math.log10(tol) - lo) / -lo, 0.01), 0.99)
    return [[0.0, "#08306b"], [t, "#9ecae1"], [t + 0.001, "#fee08b"], [(1 + t) / 2, "#f46d43"], [1.0, "#a50026"]]


def invariance_figure(results: dict[str, object], title: str = "Attention invariance") -> go.Figure:
    """Layer x head heatmap of each run's `InvarianceResult.max_abs_diff`
    (max |A^pt / (1 - alpha) - A| over content), log colour scale.

    z is log10(max(d, ZERO_FLOOR)); `customdata` holds d itself and each cell is labelled with it.
    The colour scale breaks at the probe's tolerance: cells within it (a prefix at layer 0: exact
    zeros, or fp32 rounding) are blue, cells above it (full fine-tuning) yellow to red."""
    if not results:
        raise UserError("the invariance figure needs at least one tuned run")
    n = len(results)
    tol = min(getattr(r, "tol", 1e-5) for r in results.values())
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[label_html(k) for k in results],
                        horizontal_spacing=0.05, vertical_spacing=0.2 if rows > 1 else 0.1)
    for i, (name, res) in enumerate(results.items()):
        d = res.max_abs_diff.double().numpy()
        z = np.log10(np.maximum(d, ZERO_FLOOR))
        text = [[_fmt_small(float(v)) for v in row] for row in d]
        fig.add_trace(go.Heatmap(
            z=z, customdata=d, text=text, texttemplate="%{text}", x=[f"h{h}" for h in res.heads],
            y=[f"L{l}" for l in res.layers], coloraxis="coloraxis", name=label_html(name), xgap=1, ygap=1,
            hovertemplate="layer %{y}, head %{x}<br>max abs diff %{customdata:.3e}<extra>"
                          + label_html(name) + "</extra>"),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=dict(text=escape_token(title), x=0.0, xanchor="left"), template="plotly_white",
        height=120 + rows * max(260, 40 * max(len(r.layers) for r in results.values())),
        margin=dict(t=120, l=50, r=20, b=40),
        coloraxis=dict(colorscale=_tolerance_scale(tol), cmin=math.log10(ZERO_FLOOR), cmax=0.0,
                       colorbar=dict(title=dict(text="max |diff|"), tickvals=list(range(-10, 1, 2)),
                                     ticktext=["0 / ≤1e-10"] + [f"1e{k}" for k in range(-8, 0, 2)] + ["1"])))
    return fig


# --------------------------------------------------------------------------------------------
# Bias / clusters ([P] Figure 3 style).


def clusters_figure(clusters, tasks: list[str], methods: list[str], max_lines: int = 200,
                    title: str = "Activations with and without each task's method") -> go.Figure:
    """PCA scatter of `ClusterResult.pca` (index 0 = base): grey base points, one coloured point
    per input under each run's method (colour = task, symbol = method) and a line from each
    base point to its method point (the bias the method adds)."""
    pca = clusters.pca.double().numpy()
    k = len(clusters.tasks)
    if len(tasks) != k or len(methods) != k:
        raise UserError("clusters_figure needs one task and one method name per method state")
    task_color = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(dict.fromkeys(tasks))}
    method_symbol = {m: SYMBOLS[i % len(SYMBOLS)] for i, m in enumerate(dict.fromkeys(methods))}
    fig = go.Figure()
    base = pca[0]
    N = base.shape[0]
    fig.add_trace(go.Scatter(x=base[:, 0], y=base[:, 1], mode="markers", name="base (no method)",
                             marker=dict(color="#9a9a9a", size=5), customdata=np.arange(N),
                             hovertemplate="input %{customdata}<br>base model<extra></extra>"))
    m = min(N, max_lines)
    for i in range(k):
        pts = pca[i + 1]
        color = task_color[tasks[i]]
        label = escape_token(clusters.tasks[i])
        lx = np.full(3 * m, np.nan)
        ly = np.full(3 * m, np.nan)
        lx[0::3], lx[1::3] = base[:m, 0], pts[:m, 0]
        ly[0::3], ly[1::3] = base[:m, 1], pts[:m, 1]
        fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", line=dict(color=color, width=0.6),
                                 opacity=0.35, legendgroup=label, showlegend=False, hoverinfo="skip",
                                 connectgaps=False))
        fig.add_trace(go.Scatter(
            x=pts[:, 0], y=pts[:, 1], mode="markers", name=label, legendgroup=label,
            marker=dict(color=color, size=6, symbol=method_symbol[methods[i]]), customdata=np.arange(N),
            hovertemplate="input %{customdata}<br>" + label + "<extra></extra>"))
    sep = clusters.separability
    sub = ""
    if sep.get("nearest_centroid_acc_with_method") is not None:
        sub = (f"<br><sup>task identity by nearest centroid: {sep['nearest_centroid_acc_with_method']:.2f} "
               f"with the methods, {sep['nearest_centroid_acc_without_method']:.2f} without "
               f"(chance {sep['chance']:.2f})</sup>")
    fig.update_layout(title=dict(text=escape_token(title) + sub, x=0.0, xanchor="left"),
                      template="plotly_white", height=520, margin=dict(t=90, l=50, r=20, b=50),
                      xaxis_title=f"PC1 of layer {clusters.layer} attention output",
                      yaxis_title="PC2", legend=dict(itemsizing="constant"))
    return fig


# --------------------------------------------------------------------------------------------
# Accuracy.


def accuracy_figure(matrix: dict[str, dict[str, float]], title: str = "Exact accuracy by task") -> go.Figure:
    """Annotated heatmap, runs x tasks, of exact accuracy (0..1)."""
    runs = list(matrix)
    if not runs:
        raise UserError("the accuracy figure needs at least one run")
    tasks = list(dict.fromkeys(t for r in runs for t in matrix[r]))
    z = np.array([[matrix[r].get(t, np.nan) for t in tasks] for r in runs], dtype=float)
    text = [["" if np.isnan(v) else f"{100 * v:.1f}%" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[label_html(t) for t in tasks], y=[label_html(r) for r in runs], text=text,
        texttemplate="%{text}", colorscale="Greens", zmin=0.0, zmax=1.0, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="exact acc."), tickformat=".0%"),
        hovertemplate="run %{y}<br>task %{x}<br>exact accuracy %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=dict(text=escape_token(title), x=0.0, xanchor="left"), template="plotly_white",
                      height=160 + 36 * len(runs), margin=dict(t=60, l=60, r=20, b=60))
    return fig


def learning_curves_figure(curves: dict[str, list[dict]], title: str = "Learning curves") -> go.Figure:
    """Exact accuracy and loss against the step, from each run's metrics.jsonl rows."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["exact accuracy (test set)", "training loss"],
                        horizontal_spacing=0.1)
    for i, (name, rows) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        label = escape_token(name)
        steps = [r.get("step") for r in rows]
        fig.add_trace(go.Scatter(x=steps, y=[r.get("exact_acc") for r in rows], mode="lines+markers",
                                 name=label, legendgroup=label, line=dict(color=color), marker=dict(size=4),
                                 hovertemplate="step %{x}<br>exact acc %{y:.3f}<extra>" + label + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[r.get("loss") for r in rows], mode="lines+markers",
                                 name=label, legendgroup=label, showlegend=False, line=dict(color=color),
                                 marker=dict(size=4),
                                 hovertemplate="step %{x}<br>loss %{y:.4f}<extra>" + label + "</extra>"),
                      row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=dict(text=escape_token(title), x=0.0, xanchor="left"), template="plotly_white",
                      height=420, margin=dict(t=80, l=50, r=20, b=50))
    return fig
