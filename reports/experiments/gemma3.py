"""The Gemma 3 check's report section: both families side by side at layer 0, then Gemma 3's
layers with their type, window and whether the prefix was visible."""

from __future__ import annotations

import json

from reports.html import Table


def _family_row(r: dict) -> list:
    l0 = next(c for c in r["checks"] if c["layer"] == 0)
    return [r["model"], r["model_type"], f"{r['n_heads']} / {r['n_kv_heads']}", r["dtype"],
            f"{l0['rescale_max_err']:.2e}", f"{l0['bias_rel_residual']:.2e}", "pass" if r["passed"] else "FAIL"]


def section(r: dict, records: dict) -> tuple:
    llama = records.get("llama", {})
    families = [_family_row(x["result"]) for x in (llama,) if x.get("status") == "done"] + [_family_row(r)]
    layers = [[c["layer"], c.get("layer_type", "—"), c.get("window") or "—", f"{c['prefix_mass_mean']:.4f}",
               f"{c['rescale_max_err']:.2e}", f"{c['bias_rel_residual']:.2e}",
               f"{c.get('prefix_visible_queries', '—')} of {len(r['tokens'])}" if "prefix_visible_queries" in c else "—",
               "—" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")] for c in r["checks"]]
    return (f"Gemma 3 check: {r['note']}", [
        Table(["model", "family", "query / KV heads", "dtype", "layer-0 rescaling error", "layer-0 bias residual (rel.)",
               "verdict"], families),
        Table(["layer", "type", "window", "prefix mass", "rescaling error", "bias residual (rel.)",
               "queries that see the prefix", "verdict"], layers)],
        f"P={r['prefix_len']} {r['prefix_source']} prefix, tolerance {json.dumps(r['tolerance'])}. Only layer 0 is "
        "judged: deeper layers' inputs carry the earlier layers' prefix biases. A sliding layer hides the prefix from "
        "queries more than its window away (docs/llama.md, the sliding window).")
