"""E2's report section: the cross-task matrix, Figure 3's clusters, curves and hard prompts."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from reports.experiments.common import curves_figure, prompt_table
from reports.figures import accuracy_figure, clusters_figure
from study.rows import of_ceiling


def section(r: dict, records: dict) -> tuple:
    items = [accuracy_figure({f"prefix for {t}": row for t, row in r["cross_task"].items()},
                             "E2: each task's P=1 prefix evaluated on every task")]
    pr = records["probes"].get("result") if records.get("probes", {}).get("status") == "done" else None
    if pr and "clusters_E2" in pr:
        c = pr["clusters_E2"]
        obj = SimpleNamespace(pca=torch.tensor(c["pca"]), tasks=c["tasks"], layer=c["layer"],
                              separability={k: c.get(k) for k in ("nearest_centroid_acc_with_method",
                                                                  "nearest_centroid_acc_without_method", "chance")})
        items.append(clusters_figure(obj, c["tasks"], ["prefix"] * len(c["tasks"]),
                                     title="Figure 3: attention output at the last input position, with and without each task's prefix"))
    items.append(curves_figure(r["curves"], "E2: loss and accuracy of each task's P=1 prefix"))
    if "prompt" in r:
        p = r["prompt"]
        items.append(prompt_table(p["P"], {t: {k: p[k][t] for k in ("acc", "length", "tokens", "by_length")}
                                           for t in p["acc"]}, r["own_task_acc"]))
    return ("E2: extracting pretrained tasks from mix4", items,
            f"Base: {of_ceiling(r['base_acc'])}. [P] evaluated mix4 without y1 (≈ 25 %).")
