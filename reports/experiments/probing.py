"""The identity probes' report section: invariance, bias and the hierarchy class of every tuned run."""

from __future__ import annotations

from reports.html import Table


def section(pr: dict, records: dict) -> tuple:
    rows = [[k, f"{v['layer0_max_abs_diff']:.2e}", "holds" if v["layer0_invariant"] else "broken",
             ", ".join(f"L{l}: {x:.1e}" for l, x in v["max_abs_diff_by_layer"].items())]
            for k, v in pr["invariance"].items()]
    brows = [[k, f"{v['layer0_rel_residual']:.2e}",
              "—" if v.get("layer0_min_bias_cosine") is None else f"{v['layer0_min_bias_cosine']:.6f}"]
             for k, v in pr["bias"].items()]
    return ("Identities on every tuned run", [
        Table(["run", "layer-0 max |A^pt/(1-α) − A|", "layer-0 invariance", "by layer"], rows),
        Table(["run", "layer-0 bias residual (relative)", "P=1: min cosine of the bias direction"], brows)]
        + ([Table(["run", "class in [P]'s hierarchy", "evidence"],
                  [[k, v["class"], v["evidence"]] for k, v in pr["hierarchy"].items()])] if pr.get("hierarchy") else []),
        "docs/papers.md §4: exact at layer 0 for prefixes and soft prompts; deeper layers drift; "
        "weight methods that touch q/k break it.")
