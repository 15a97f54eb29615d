"""The LLaMA check's report section: each layer's identities on the real prefix attention."""

from __future__ import annotations

import json

from reports.html import Table


def section(r: dict, records: dict) -> tuple:
    rows = [[c["layer"], f"{c['prefix_mass_mean']:.4f}", f"{c['sink_mass_base']:.4f}", f"{c['rescale_max_err']:.2e}",
             f"{c['bias_rel_residual']:.2e}", f"{c['renorm_mean_js']:.2e}",
             "—" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")] for c in r["checks"]]
    return (f"LLaMA check: {r['note']}", [
        Table(["layer", "prefix mass", "BOS/sink mass (base)", "rescaling error", "bias residual (rel.)",
               "renormalized drift (JS)", "verdict"], rows)],
        f"dtype {r['dtype']}, P={r['prefix_len']} {r['prefix_source']} prefix, tolerance {json.dumps(r['tolerance'])}.")
