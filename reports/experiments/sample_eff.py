"""[L]'s toy sample-efficiency section: accuracy and loss against n, and the learning-rate grid."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports.html import Table
from study.rows import of_ceiling, pct


def sample_eff_figure(r: dict):
    """[L]'s toy: exact accuracy and teacher-forced test loss against the number of training
    examples, one line per prefix parameterization (error bars: std over seeds)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("exact accuracy (test)", "test loss (teacher-forced)"))
    for i, v in enumerate(r["acc"]):
        color = ["#636efa", "#ef553b", "#00cc96", "#ab63fa"][i % 4]
        for col, metric in ((1, "acc"), (2, "test_loss")):
            cells = [r[metric][v][n] for n in r["sizes"]]  # the record's keys are sorted: keep n's order
            fig.add_trace(go.Scatter(x=r["sizes"], y=[c["mean"] for c in cells], mode="lines+markers",
                                     name=f"{v} (lr {r['lr'][v]:g}, {r['n_params'][v]:,} params)",
                                     legendgroup=v, showlegend=col == 1, line=dict(color=color),
                                     error_y=dict(array=[c["std"] for c in cells])), row=1, col=col)
    fig.update_xaxes(type="category", title_text="training examples n ('fresh': a new batch every step)")
    fig.update_layout(title=f"[L] on the toy: P={r['P']} prefixes learning {r['task']} ({r['steps']:,} steps, "
                            f"{len(r['seeds'])} seeds)", template="plotly_white", height=440)
    return fig


def section(r: dict, records: dict) -> tuple:
    title = "[L]'s claim on the toy: sample efficiency of the prefix parameterizations (real training)"
    about = (f"Each prefix starts at the base (init 'slot') and trains on a fixed pool of n examples of {r['task']} "
             f"(base: {of_ceiling(r['base_acc'])}). ")
    if not r["lr_grid"]:  # the recipe fixes each variant's rate (older records have no "lr_from")
        rates = Table(["variant", "lr"], [[v, f"{lr:g}"] for v, lr in r["lr"].items()])
        return (title, [sample_eff_figure(r), rates], about + "Each variant's learning rate is fixed by the "
                "recipe, as [L]'s code fixes one per method: the rate a validation grid chose for it (never the "
                "test set; docs/experiments.md, \"The [L] toy's learning rates, fixed\").")
    grid = [[v, f"{float(lr):g}", f"{g['val_loss']:.4f}", pct(g["val_acc"]), "chosen" if float(lr) == r["lr"][v] else ""]
            for v, by in r["lr_grid"].items() for lr, g in by.items()]
    return (title, [sample_eff_figure(r), Table(["variant", "lr", "validation loss", "validation exact acc.", ""], grid)],
            about + f"Learning rates were chosen per variant on a validation split (n = {r['sizes'][0]}, "
            f"seed {r['seeds'][0]}), never on the test set.")
