"""[P]'s identities and Figure 3 on the study's tuned runs (docs/papers.md §4): layer-0 attention
invariance, the bias identity and the hierarchy class on E1's and E3's runs, the task clusters
on E2's. The probes themselves are the `probes` package; this is the stage, its rows and its declaration.
"""

from __future__ import annotations

from pathlib import Path

from probes.clusters import activation_clusters
from probes.hierarchy import classify
from probes.compute import identity_probes, probe_inputs
from study.experiments.declaration import Experiment
from study.rows import row
from tuning.pipeline import load_run


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    """Invariance, bias and the hierarchy class on E1 (full vs prefix vs LoRA vs prompts) and E3,
    Figure-3 clusters on E2."""
    out: dict = {"invariance": {}, "bias": {}, "hierarchy": {}}
    n = cfg["n_inputs"]
    for exp in ("E1", "E3"):
        if up.get(exp, {}).get("status") != "done":
            continue
        for name, path in up[exp]["result"]["runs"].items():
            r = load_run(path)
            toks = probe_inputs(r, n)
            res = identity_probes(r.model, r.state, toks, ["invariance", "bias"])  # one shared pass
            out["invariance"][f"{exp}/{name}"] = res["invariance"].to_json()
            out["bias"][f"{exp}/{name}"] = res["bias"].to_json()
            # [P]'s hierarchy class of each run (a hard prompt: "prompting"), from the same pass
            out["hierarchy"][f"{exp}/{name}"] = classify(r.model, r.state, res["invariance"].summary["layer0_invariant"])
    if up.get("E2", {}).get("status") == "done":
        runs = {t: load_run(p) for t, p in up["E2"]["result"]["runs"].items()}
        first = next(iter(runs.values()))
        toks = probe_inputs(first, n)
        c = activation_clusters(first.model, {t: r.state for t, r in runs.items()}, toks,
                                position=first.spec.length - 1)
        out["clusters_E2"] = c.to_json()
        out["clusters_E2"]["pca"] = c.pca[:, : min(200, c.pca.shape[1])].tolist()
    return out


def rows(pr: dict) -> list[dict]:
    ctx = {k: v for k, v in pr["invariance"].items() if any(s in k for s in ("prefix", "prompt", "E3/"))}
    worst = max((v["layer0_max_abs_diff"] for v in ctx.values()), default=None)
    full = [v["layer0_max_abs_diff"] for k, v in pr["invariance"].items() if k.endswith("/full")]
    out = [row("[P] §4", "layer-0 attention invariance for every prefix / soft prompt (max error)", "exact",
               "—" if worst is None else f"{worst:.1e}", worst is not None and worst <= 1e-5, "≤ 1e-5 (fp32)")]
    if full:
        out.append(row("[P] §4", "full fine-tuning breaks it (contrast)", "changes the pattern", f"{full[0]:.1e}",
                       full[0] > 1e-3, "> 1e-3"))
    bias = [v["layer0_rel_residual"] for k, v in pr["bias"].items() if any(s in k for s in ("prefix", "prompt", "E3/"))]
    if bias:
        out.append(row("[P] §4", "bias identity at layer 0 (relative residual)", "exact", f"{max(bias):.1e}",
                       max(bias) <= 1e-5, "≤ 1e-5"))
    c = pr.get("clusters_E2")
    if c and c.get("nearest_centroid_acc_with_method") is not None:
        w, wo = c["nearest_centroid_acc_with_method"], c["nearest_centroid_acc_without_method"]
        out.append(row("[P] Fig. 3", "prefixes move activations into task clusters (nearest-centroid acc.)",
                       "visibly separate", f"{100 * w:.0f} % with vs {100 * wo:.0f} % without (chance {100 * c['chance']:.0f} %)",
                       w > wo + 0.2, "with > without + 20 pp"))
    return out


EXPERIMENT = Experiment(
    name="probes", title="Invariance, bias and clusters on the tuned runs", run=run,
    config=lambda scale, recipes: {"n_inputs": 64 if scale == "micro" else 500}, rows=rows,
    estimate=lambda cfg: 10.0, section="probing", needs=("E1", "E2", "E3"))
