"""The [PT+] stages' report sections (study.experiments.prefix_plus): each toy stage's accuracies
beside the matching [P] stage's prefix (and E4's rank-1 LoRA), with its curves; the probes' identities
per layer and the dilution figure (a prefix's attention mass against [PT+]'s share of the head output)."""

from __future__ import annotations

import plotly.graph_objects as go

from reports.experiments.common import curves_figure
from reports.figures import PALETTE
from reports.html import Table
from study.rows import ms, of_ceiling

NOTE = ("[PT+] (`--method prefix_plus`, docs/papers.md §7) keeps every attention pattern and adds φ(q)ᵀM to each "
        "head's output: the lab's question, beyond [P]. ")


def _done(records: dict, name: str) -> dict | None:
    rec = records.get(name, {})
    return rec["result"] if rec.get("status") == "done" and rec.get("result") else None


def _e1(r: dict, records: dict) -> tuple:
    p1 = _done(records, "E1")
    acc = r["descending_acc"]
    rows = [[f"[PT+] {k} ({r['params'][k]:,} params)", ms(v)] for k, v in acc.items()]
    if p1:
        rows += [[f"[P] E1 {k}", ms(v)] for k, v in p1["descending_acc"].items()]
    c = r["bias_cosine"]
    return ("[PT+] E1: Prefix-Tuning+ on descending", [
        Table(["run", "descending exact accuracy"], rows),
        Table(["layer", "mean cosine of the bias direction per head (defaults' run)"],
              [[l, ", ".join(f"{x:.3f}" for x in heads)] for l, heads in enumerate(c["per_head"])]),
        curves_figure(r["curves"], "[PT+] E1: descending")],
        NOTE + f"A one-slot prefix's bias has one direction per head (cosine 1); [PT+]'s mean cosine: {c['mean']:.3f}.")


def _e2(r: dict, records: dict) -> tuple:
    p = _done(records, "E2")
    own = p["own_task_acc"] if p else None
    rows = [[t, ms(v), ms(own[t]) if own else "—"] for t, v in r["own_task_acc"].items()]
    return ("[PT+] E2: Prefix-Tuning+ on mix4's pretrained tasks", [
        Table(["task", f"[PT+] ({r['params']:,} params)", "[P] E2: P=1 prefix"], rows),
        curves_figure(r["curves"], "[PT+] E2: each pretrained task")], NOTE + f"Base: {of_ceiling(r['base_acc'])}.")


def _e3(r: dict, records: dict) -> tuple:
    p = _done(records, "E3")
    rows = [[t, ms(v), ms(p["acc"].get(t)) if p else "—"] for t, v in r["acc"].items()]
    return ("[PT+] E3: Prefix-Tuning+ on the deeper mix4 model", [
        Table(["task", f"[PT+] ({r['params']:,} params)", "[P] E3: P=10 prefix"], rows),
        curves_figure(r["curves"], "[PT+] E3: pretraining tasks and ascending_add1")],
        NOTE + f"Base: {of_ceiling(r['base_acc'])}."
        + (f" Every [PT+] run here trained {r['steps']:,} steps; the prefix's ascending_add1 and double_hist "
           f"runs trained {r['prefix_steps']:,}." if "steps" in r else ""))


def _e4(r: dict, records: dict) -> tuple:
    p = _done(records, "E4")
    rows = [[f"[PT+] width {r['width']}", f"{r['params']['plus']:,}", ms(r["double_hist_acc"]["plus"])]]
    curves = {"[PT+]": r["curves"]["plus"]}
    if p:
        rows += [[f"[P] E4 {k}", f"{p['params'][k]:,}", ms(v)] for k, v in p["double_hist_acc"].items()]
        curves.update({f"[P] E4 {k}": c for k, c in p["curves"].items()})
    return ("[PT+] E4: Prefix-Tuning+ at rank-1 LoRA's budget on double_hist", [
        Table(["method", "trainable parameters", "double_hist exact accuracy"], rows),
        curves_figure(curves, "[PT+] E4 beside E4's rank-1 LoRA and prefix")],
        NOTE + "E4's LoRA and prefix are read from the E4 stage of the same study, where it finished.")


def dilution_figure(d: dict) -> go.Figure:
    """Per layer against input length: a random prefix's attention mass (dashed) and a random [PT+]'s
    share of the head output (solid), log-log."""
    fig = go.Figure()
    for l, (alpha, share) in enumerate(zip(d["prefix_alpha"], d["memory_share"])):
        color = PALETTE[l % len(PALETTE)]
        fig.add_trace(go.Scatter(x=d["lengths"], y=alpha, mode="lines+markers", name=f"layer {l}: prefix mass",
                                 line=dict(color=color, dash="dash")))
        fig.add_trace(go.Scatter(x=d["lengths"], y=share, mode="lines+markers", name=f"layer {l}: [PT+] share",
                                 line=dict(color=color)))
    fig.update_xaxes(type="log", title_text="input length (tokens)")
    fig.update_yaxes(type="log", title_text="prefix mass α / [PT+] share of the head output")
    fig.update_layout(title=dict(text=f"Dilution: a P={d['prefix_len']} prefix against [PT+] ({d['model']})", x=0.0,
                                 xanchor="left"), template="plotly_white", height=460, margin=dict(t=80, l=60, r=20, b=50))
    return fig


def _probes(r: dict, records: dict) -> tuple:
    ids, d = r["identities"], r["dilution"]
    fmt = lambda x: "—" if x is None else f"{x:+.2f}"
    rows = [[x["layer"], f"{x['pattern_max_abs_diff']:.1e}", f"{x['z_softmax_part_max_abs_diff']:.1e}",
             f"{x['out_residual_max_abs']:.1e}", f"{x['out_moved_max_abs']:.2e}",
             fmt(d["prefix_exponent"][x["layer"]]), fmt(d["memory_exponent"][x["layer"]])] for x in ids["layers"]]
    return (f"[PT+] probes: {r['note']}", [
        Table(["layer", "pattern − base (max)", "softmax part of z − base (max)", "output − term (max)",
               "output moved (max)", "prefix mass decay exponent", "[PT+] share decay exponent"], rows),
        dilution_figure(d)],
        NOTE + f"A random memory at every layer, calibrated to the head outputs' size; layer 0's pattern against the "
        f"base model's own: {ids['layer0_pattern_vs_base']:.1e}. Dilution: {d['window']}.")


SECTIONS = {"PT+E1": _e1, "PT+E2": _e2, "PT+E3": _e3, "PT+E4": _e4, "PT+probes": _probes}


def section(r: dict, records: dict) -> tuple:
    return SECTIONS[r["experiment"]](r, records)
