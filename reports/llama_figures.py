"""The LLaMA "your model" page: figure builders for [P]'s Fig. 5 panels, prefix dilution and the
attention sink, and the page that puts the identity check (Fig. 5 panels), the dilution curves and
the sink comparison of one model on one self-contained HTML page.

`llama_fig5` takes a `model_checks.identities.LlamaCheckResult`; the dilution and sink builders
take the JSON summary of a dilution run (`model_checks.dilution.DilutionResult.to_json()`). Each
returns a `go.Figure`; nothing here shows a figure. `write_page` renders with `reports.html` and
writes atomically. Labels coming from a model, a path or a token go through
`reports.figures.escape_token` (`llama_fig5`: `html.escape`, which also turns quotes into entities).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from model_checks.dilution import DilutionResult
from model_checks.identities import LlamaCheckResult
from reports.figures import PREFIX_COLOR, escape_token
from reports.html import Pre, Section, Table, check_output, render_report, write_report
from prefixlab_common.errors import UserError
from toy_models.runs import check_overwrite

BASE_COLOR = "#1f77b4"


def _layer_colors(n: int) -> list[str]:
    return sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])


def _check(d: dict) -> None:
    if not d.get("layers") or not d.get("lengths"):
        raise UserError("the dilution figure needs a dilution result with at least one layer and two lengths")


def _positive(values):
    """Log axes cannot show zeros: None (a gap) instead."""
    return [v if v is not None and v > 0 else None for v in values]


def llama_fig5(result: LlamaCheckResult, layer: int, head: int) -> go.Figure:
    """docs/papers.md §4 (Fig. 5): with-prefix (or soft-prompt) pattern over content queries, renormalized over
    content, and without it."""
    key = (layer, head)
    if key not in result.patterns:
        raise UserError(f"layer {layer}, head {head} was not checked; run the check with that layer and head")
    pats = result.patterns[key]
    with_p, without = pats["with_prefix"], pats["without_prefix"]
    P = result.prefix_len
    toks = [html.escape(t) for t in result.tokens]
    keys_pt = [f"[{'prompt' if result.method == 'soft_prompt' else 'prefix'} {k}]" for k in range(P)] + toks
    alpha = with_p[:, :P].sum(-1, keepdims=True)
    renorm = with_p[:, P:] / (1 - alpha).clip(min=1e-30)

    def hover(mat, xs):
        return [[f"query {i} {toks[i]!s}<br>key {xs[j]}<br>{mat[i, j]:.5f}" for j in range(mat.shape[1])] for i in range(mat.shape[0])]

    what = "soft prompt" if result.method == "soft_prompt" else "prefix"
    titles = (f"with {what} (P={P})", f"with {what}, renormalized over content", f"without {what}")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.06)
    for col, (mat, xs) in enumerate(((with_p, keys_pt), (renorm, toks), (without, toks)), start=1):
        fig.add_trace(go.Heatmap(z=mat, text=hover(mat, xs), hovertemplate="%{text}<extra></extra>", zmin=0, zmax=1,
                                 colorscale="Blues", showscale=col == 3), row=1, col=col)
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(xs))), ticktext=xs, tickangle=-60, row=1, col=col)
        fig.update_yaxes(tickmode="array", tickvals=list(range(len(toks))), ticktext=toks, autorange="reversed", row=1, col=col)
    check = next((c for c in result.checks if c.layer == layer), None)
    note = f" — rescale err {check.rescale_max_err:.1e}, drift {check.renorm_max_diff:.1e}" if check else ""
    fig.update_layout(title=html.escape(f"{result.model}: layer {layer}, head {head}, {result.dtype}") + note,
                      height=520, width=1500)
    return fig


def dilution_figure(d: dict, title: str | None = None) -> go.Figure:
    """Left: prefix mass α against input length, log-log, one line per layer (heads aggregated as
    the run says; with heads='all' also one thin line per head). Right: each layer's fitted decay
    exponent (−slope of log α on log L), hover gives R²."""
    _check(d)
    lengths = d["lengths"]
    layers = d["layers"]
    colors = _layer_colors(len(layers))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32], horizontal_spacing=0.09,
                        subplot_titles=[f"prefix mass α ({escape_token(d.get('heads', 'mean'))} over heads)",
                                        "decay exponent of α (log-log slope, negated)"])
    for c, layer in zip(colors, layers):
        l = layer["layer"]
        fit = layer.get("fit") or {}
        exp = fit.get("exponent")
        name = f"layer {l}" + (f" (exp. {exp:.2f})" if exp is not None else "")
        if d.get("heads") == "all":
            for h, row in enumerate(layer.get("alpha_per_head", [])):
                fig.add_trace(go.Scatter(x=lengths, y=_positive(row), mode="lines", line=dict(color=c, width=0.6),
                                         opacity=0.35, legendgroup=f"L{l}", showlegend=False,
                                         hovertemplate=f"layer {l}, head {h}<br>L=%{{x}}<br>α=%{{y:.3g}}<extra></extra>"),
                              row=1, col=1)
        fig.add_trace(go.Scatter(x=lengths, y=_positive(layer["alpha"]), mode="lines+markers", name=name,
                                 legendgroup=f"L{l}", line=dict(color=c, width=2), marker=dict(size=5),
                                 hovertemplate=f"layer {l}<br>L=%{{x}}<br>α=%{{y:.3g}}<extra></extra>"),
                      row=1, col=1)
    xs = [layer["layer"] for layer in layers]
    exps = [(layer.get("fit") or {}).get("exponent") for layer in layers]
    r2 = [(layer.get("fit") or {}).get("r2") for layer in layers]
    fig.add_trace(go.Bar(x=xs, y=exps, marker_color=colors, showlegend=False,
                         customdata=["n/a" if v is None else f"{v:.3f}" for v in r2],
                         text=["" if e is None else f"{e:.2f}" for e in exps], textposition="outside",
                         hovertemplate="layer %{x}<br>exponent %{y:.3f}<br>R² %{customdata}<extra></extra>"),
                  row=1, col=2)
    fig.add_hline(y=1.0, line=dict(color="#888", dash="dot"), row=1, col=2,
                  annotation_text="1/L (uniform content)", annotation_position="top left")
    fig.update_xaxes(type="log", title_text="input length L (tokens, BOS included)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="α", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_yaxes(title_text="exponent", row=1, col=2)
    head = title or f"Prefix dilution: {d.get('model', '')}, P={d.get('prefix_len')}, prefix {d.get('prefix_source', '')}"
    fig.update_layout(title=dict(text=escape_token(head), x=0.0, xanchor="left"), template="plotly_white",
                      height=560, margin=dict(t=90, l=60, r=20, b=60), legend=dict(font=dict(size=10)))
    return fig


def window_figure(d: dict, title: str | None = None) -> go.Figure:
    """The prefix across a sliding window, per layer type. Left: prefix mass α of the last queries
    against input length (linear y, so the exact zeros past the window show), one line per layer,
    sliding layers dashed, the window marked. Middle: the share of those queries that still see the
    prefix. Right (when the run measured them): the identity residuals per layer type (max over the
    type's layers; inputs patched, `model_checks.dilution.patched_identities`)."""
    _check(d)
    lengths, layers = d["lengths"], d["layers"]
    windows = sorted({l["window"] for l in layers if l.get("window")})
    with_ids = all(l.get("rescale_err") for l in layers)
    titles = ["prefix mass α of the last queries", "share of those queries that see the prefix"]
    if with_ids:
        titles.append("identity residuals (max over the type's layers)")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.07)
    colors = _layer_colors(len(layers))
    for c, layer in zip(colors, layers):
        kind = "sliding" if layer.get("window") else "global"
        dash = "dash" if kind == "sliding" else "solid"
        name = f"layer {layer['layer']} ({kind})"
        for col, key in ((1, "alpha"), (2, "prefix_visible")):
            fig.add_trace(go.Scatter(x=lengths, y=layer.get(key) or [None] * len(lengths), mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line=dict(color=c, dash=dash, width=1.6),
                                     marker=dict(size=4),
                                     hovertemplate=f"{name}<br>L=%{{x}}<br>%{{y:.3g}}<extra></extra>"), row=1, col=col)
    if with_ids:
        for kind, dash in (("sliding", "dash"), ("global", "solid")):
            chosen = [l for l in layers if bool(l.get("window")) == (kind == "sliding")]
            if not chosen:
                continue
            for key, color in (("rescale_err", PREFIX_COLOR), ("bias_rel", BASE_COLOR)):
                ys = [max(l[key][n] for l in chosen) for n in range(len(lengths))]
                label = f"{'rescale error' if key == 'rescale_err' else 'bias residual (rel.)'}, {kind} layers"
                fig.add_trace(go.Scatter(x=lengths, y=_positive(ys), mode="lines+markers", name=label,
                                         line=dict(color=color, dash=dash), marker=dict(size=4),
                                         hovertemplate=f"{label}<br>L=%{{x}}<br>%{{y:.2e}}<extra></extra>"), row=1, col=3)
        fig.update_yaxes(type="log", title_text="max abs error", row=1, col=3)
    for w in windows:
        for col in range(1, len(titles) + 1):
            fig.add_vline(x=w, line=dict(color="#888", dash="dot"), row=1, col=col)
        fig.add_annotation(x=w, y=1.02, xref="x", yref="paper", text=f"window {w}", showarrow=False, font=dict(size=10))
    for col in range(1, len(titles) + 1):
        fig.update_xaxes(type="log", title_text="input length L (tokens, BOS included)", row=1, col=col)
    fig.update_yaxes(title_text="α", row=1, col=1)
    fig.update_yaxes(title_text="share of queries", range=[-0.05, 1.05], row=1, col=2)
    head = title or (f"The prefix across the sliding window: {d.get('model', '')}, P={d.get('prefix_len')}, "
                     f"prefix {d.get('prefix_source', '')}")
    fig.update_layout(title=dict(text=escape_token(head), x=0.0, xanchor="left"), template="plotly_white",
                      height=520, margin=dict(t=100, l=60, r=20, b=60), legend=dict(font=dict(size=10)))
    return fig


def sink_figure(d: dict, title: str | None = None) -> go.Figure:
    """Left: sink mass with the prefix against the base sink mass, one point per (layer, length),
    colour = layer, with y = x (the prefix takes nothing from the sink) for reference. Right: sink
    mass against length (mean over layers) without and with the prefix, and the prefix mass α."""
    _check(d)
    lengths = d["lengths"]
    layers = d["layers"]
    colors = _layer_colors(len(layers))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["base vs with prefix; colour = layer (dark = first), size = length",
                                        "mean over layers against length"])
    for c, layer in zip(colors, layers):
        l = layer["layer"]
        fig.add_trace(go.Scatter(
            x=layer["sink_base"], y=layer["sink_prefix"], mode="markers", name=f"layer {l}", legendgroup=f"L{l}",
            marker=dict(color=c, size=[5 + 2 * math.log2(max(L, 1) / lengths[0] + 1) for L in lengths]),
            customdata=lengths, showlegend=False,
            hovertemplate=f"layer {l}, L=%{{customdata}}<br>base %{{x:.3f}}<br>with prefix %{{y:.3f}}<extra></extra>"),
            row=1, col=1)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#888", dash="dot"), name="y = x",
                             hoverinfo="skip"), row=1, col=1)

    def mean_over_layers(key):
        return [sum(layer[key][i] for layer in layers) / len(layers) for i in range(len(lengths))]

    for key, name, color, dash in (("sink_base", "sink, base", BASE_COLOR, "solid"),
                                   ("sink_prefix", "sink, with prefix", PREFIX_COLOR, "solid"),
                                   ("alpha", "prefix mass α", PREFIX_COLOR, "dot")):
        fig.add_trace(go.Scatter(x=lengths, y=mean_over_layers(key), mode="lines+markers", name=name,
                                 line=dict(color=color, dash=dash),
                                 hovertemplate=f"{name}<br>L=%{{x}}<br>%{{y:.3f}}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="sink mass without prefix", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="sink mass with prefix", range=[-0.02, 1.02], row=1, col=1)
    fig.update_xaxes(type="log", title_text="input length L", row=1, col=2)
    fig.update_yaxes(title_text="attention mass", range=[-0.02, 1.02], row=1, col=2)
    head = title or f"Attention sink ({d.get('sink', 'content position 0')}): {d.get('model', '')}"
    fig.update_layout(title=dict(text=escape_token(head), x=0.0, xanchor="left"), template="plotly_white",
                      height=500, margin=dict(t=90, l=60, r=20, b=60))
    return fig


# --------------------------------------------------------------------------------------------
# The page.


def check_new_output(out: Path, overwrite: bool) -> Path:
    """UserError (before any work) if `out` is unusable or exists without `overwrite`."""
    out = check_output(Path(out))
    check_overwrite(out, overwrite)
    return out


def _check_sections(check: LlamaCheckResult) -> list[Section]:
    what = "soft prompt" if check.method == "soft_prompt" else "prefix"
    rows = check.table_rows()
    intro = (f"{check.model} ({check.model_type}, {check.dtype}), {what} of P={check.prefix_len} from "
             f"{check.prefix_source}. Positions: {check.positions}. Layer 0 is exact by [P] §4 (the content's "
             f"layer-0 inputs do not depend on the {what}); the pass rule is the dtype tolerance {check.tolerance} "
             f"plus twice the RoPE position-shift error {check.rope_shift_error:.2e} (the same pattern without any "
             f"{what}, content shifted by P). Verdict: layer-0 identities "
             f"{'hold' if check.passed else 'DO NOT hold'}.")
    items: list = [Table(rows[0], rows[1:], caption="per layer: rescale error max|A^pt − (1−α)A|, bias residual "
                                                      "relative to max|t^pt|, renormalized drift, mean JS divergence")]
    if check.hierarchy:
        h = check.hierarchy
        items.append(Table(["quantity", "value"], [
            ["max |Δ logits| (content positions)", f"{h['logits_max_abs_diff']:.3e}"],
            ["max |logits|", f"{h['logits_max_abs']:.3e}"],
            ["relative", f"{h['logits_rel_diff']:.3e} (tolerance {h['tolerance_rel']:.0e})"],
            ["max |Δ final residual|", f"{h['resid_final_max_abs_diff']:.3e}"],
            ["max |Δ keys/values| at the prompt positions", f"{h['kv_max_abs_diff']:.3e}"],
            ["greedy next tokens agree", "yes" if h["argmax_agree"] else "no"],
        ], caption="hierarchy: the soft prompt's per-layer keys/values used as a prefix (DynamicCache) vs the "
                   "soft-prompt forward"))
    sections = [Section(f"{what.capitalize()} identities ([P] §4)", items, intro)]
    figs = []
    layer = check.layers[0]
    first = check.checks[0]
    top = max(range(len(check.heads)), key=lambda n: first.prefix_mass_per_head[n])
    for head in dict.fromkeys([check.heads[0], check.heads[top]]):
        figs.append(llama_fig5(check, layer, head))
    sections.append(Section(f"Fig. 5 panels: layer {layer}", figs,
                            f"Left: the with-{what} pattern of the content queries (the {what} keys first). Middle: "
                            f"its content part divided by 1 − α. Right: the pattern without the {what}. At layer 0 "
                            "middle and right are equal. Shown: the first checked head and the head with the "
                            f"largest {what} mass."))
    return sections


def _dilution_sections(d: DilutionResult) -> list[Section]:
    js = d.to_json()
    rows = d.table_rows()
    exps = [l.fit["exponent"] for l in d.layers if l.fit["exponent"] is not None]
    summary = (f"median decay exponent over layers {sorted(exps)[len(exps) // 2]:.2f} "
               f"(range {min(exps):.2f}..{max(exps):.2f})") if exps else "no exponent could be fitted"
    intro = (f"α(L): prefix mass of the {d.window}, for inputs of L tokens (nested prefixes of one text: {d.text}); "
             f"heads aggregated by {d.heads}. [P]'s bias identity t^pt_i = α_i·v̄_prefix + (1 − α_i)·t_i says the "
             "prefix shifts each head's output by α_i·(v̄_prefix − t_i): the prefix's effect on a head decays with "
             "input length exactly as α does. An exponent near 1 is the 1/L dilution of a prefix whose key competes "
             "with every content key; near 0, a head whose content mass sits on the sink, so the prefix keeps "
             f"its share however long the input. Here: {summary}.")
    window = []
    if any(l.window for l in d.layers) or d.identities:
        sliding = sorted({l.window for l in d.layers if l.window})
        window = [Section("The prefix across the sliding window", [window_figure(js)],
                          ("A prefix holds the first positions of every layer's cache. "
                           + (f"On a sliding layer (window {', '.join(map(str, sliding))}) a query at content position i "
                              "sees it only while i < window − 1; past that its mass is exactly 0. " if sliding else
                              "Every layer here is global: every query sees the prefix. ")
                           + ("The identity residuals are measured with every layer's input patched to the base "
                              "forward's, so they are exact on every layer; they show whether the identities hold "
                              "on both layer types at every length." if d.identities else "")))]
    return [
        Section("Prefix dilution", [dilution_figure(js), Table(rows[0], rows[1:], caption="per layer (heads aggregated)")],
                intro), *window,
        Section("Attention sink", [sink_figure(js)],
                f"Sink: {d.sink}. Points below y = x: the prefix takes its mass partly from the sink; at layer 0 the "
                "invariance identity makes the with-prefix sink mass (1 − α) times the base one, query by query."),
    ]


def render_page(check: LlamaCheckResult | None = None, dilution: DilutionResult | None = None) -> str:
    """The page's HTML (at least one of the two results)."""
    if check is None and dilution is None:
        raise UserError("the model page needs a check or a dilution result")
    sections: list = []
    model = check.model if check is not None else dilution.model
    if check is not None:
        sections += _check_sections(check)
    if dilution is not None:
        sections += _dilution_sections(dilution)
    raw = {}
    if check is not None:
        raw["check"] = check.to_json()
    if dilution is not None:
        raw["dilution"] = {k: v for k, v in dilution.to_json().items() if k != "layers"}
    sections.append(Section("Provenance", [Pre(json.dumps(raw, indent=1), summary="settings and summary (JSON)")]))
    doc, _ = render_report(f"Your model: {model}", sections, subtitle="prefixlab identity-check / dilution ([P] §4)")
    return doc


def write_page(out: Path, check: LlamaCheckResult | None = None, dilution: DilutionResult | None = None) -> Path:
    """Render and write the page atomically."""
    write_report(Path(out), render_page(check, dilution))
    return Path(out)
