"""The paper-vs-lab table: each headline number of papers.md against this lab's measurement,
with a verdict on whether the paper's *conclusion* holds under a criterion stated in the row, and
the gap where it does not."""

from __future__ import annotations

def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _ms(d: dict | None) -> str:
    if not d:
        return "—"
    if len(d.get("values", [])) > 1:
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f} %"
    return _pct(d["mean"])


def _row(source, claim, paper, ours, holds, criterion, gap=None):
    if holds is None:
        verdict = "not run"
    elif holds:
        verdict = "reproduced"
    else:
        verdict = "differs" + (f" ({gap})" if gap else "")
    return {"source": source, "claim": claim, "paper": paper, "lab": ours, "verdict": verdict,
            "criterion": criterion}


def _sample_eff_reading(gap_small: float, gap_large: float) -> str:
    """What the two gaps (best shared variant minus No-share, at the smallest and largest n) say."""
    if gap_small <= 0.05:
        return "no shared variant is ahead of No-share at the smallest n"
    if gap_large >= gap_small:
        return "sharing is ahead but the gap does not shrink with n (an optimization gap, not a sample-size one)"
    return "sharing ahead at small n, gap shrinking with n"


def of_ceiling(b: dict) -> str:
    """A base's accuracy against its task's ceiling, e.g. '93.1 % of a 94.0 % ceiling (y1 given)'."""
    return (f"{b['task']} {_pct(b['exact_acc'])} of a {_pct(b['ceiling'])} ceiling"
            + (" (y1 given)" if b.get("y1_given") else ""))


def paper_vs_lab(records: dict) -> list[dict]:
    rows = []
    res = lambda n: records.get(n, {}).get("result") if records.get(n, {}).get("status") == "done" else None
    e1 = res("E1")
    if e1:
        acc = e1["descending_acc"]
        full = acc["full"]["mean"]
        rows.append(_row("[P] E1", "full fine-tuning learns descending (ascending base)", "84.9 %", _ms(acc["full"]),
                         full >= 0.5, "≥ 50 %", f"{100 * (full - 0.849):+.1f} pp"))
        for k, label in (("prefix_simple", "Simple-share prefix"), ("prefix_none", "No-share prefix"),
                         ("prefix_deep", "Deep-share prefix"), ("soft_prompt", "soft prompt")):
            a = acc[k]["mean"]
            rows.append(_row("[P] E1", f"{label} cannot learn descending", "0.0 %" if "prefix" in k else "(not run in [P])",
                             _ms(acc[k]), a <= 0.05, "≤ 5 %", f"{100 * a:+.1f} pp"))
    else:
        rows.append(_row("[P] E1", "E1", "—", "stage failed or not run", None, ""))
    e2 = res("E2")
    if e2:
        own = e2["own_task_acc"]
        low = min(v["mean"] for v in own.values())
        rows.append(_row("[P] E2", "each task's P=1 prefix solves its own pretrained task (min over 4)", "≥ 83.7 %",
                         ", ".join(f"{t} {_ms(v)}" for t, v in own.items()) + f" (base: {of_ceiling(e2['base_acc'])})",
                         low >= 0.75, "min ≥ 75 %",
                         f"min {100 * (low - 0.837):+.1f} pp"))
        off = max(v for t, row in e2["cross_task"].items() for u, v in row.items() if u != t)
        rows.append(_row("[P] E2", "… and ≈ 0 on the other tasks (max off-diagonal)", "≈ 0 %", _pct(off),
                         off <= 0.05, "≤ 5 %", f"{100 * off:+.1f} pp"))
    e3 = res("E3")
    if e3:
        acc = e3["acc"]
        pre = min(acc[t]["mean"] for t in ("ascending", "descending", "add1", "add2"))
        rows.append(_row("[P] E3", "P=10 prefixes solve the pretraining tasks (min over 4)", "≈ 100 %",
                         f"{_pct(pre)} (base: {of_ceiling(e3['base_acc'])})",
                         pre >= 0.9, "≥ 90 %", f"{100 * (pre - 1):+.1f} pp"))
        a = acc["ascending_add1"]["mean"]
        rows.append(_row("[P] E3", "prefix partly learns ascending_add1 (new composition)", "71.6 %",
                         _ms(acc["ascending_add1"]), 0.1 <= a, "≥ 10 % (partly or fully)", f"{100 * (a - 0.716):+.1f} pp"))
        h = acc["double_hist"]["mean"]
        rows.append(_row("[P] E3", "prefix fails double_hist (new attention pattern)", "0.6 %", _ms(acc["double_hist"]),
                         h <= 0.05, "≤ 5 %", f"{100 * (h - 0.006):+.1f} pp"))
    e4 = res("E4")
    if e4:
        acc = e4["double_hist_acc"]
        lo, pr = acc["lora"]["mean"], acc["prefix"]["mean"]
        n = e4["params"]
        rows.append(_row("[P] E4", f"rank-1 LoRA learns double_hist ({n['lora']:,} params)", "92.4 % (12,288 params)",
                         _ms(acc["lora"]), lo >= 0.5, "≥ 50 %", f"{100 * (lo - 0.924):+.1f} pp"))
        rows.append(_row("[P] E4", f"P={e4['prefix_len']} prefix does not ({n['prefix']:,} params)", "0.3 %",
                         _ms(acc["prefix"]), pr <= 0.05 and lo >= 0.5, "≤ 5 %, with LoRA ≥ 50 % in the same study",
                         f"{100 * (pr - 0.003):+.1f} pp" if pr > 0.05 else "LoRA did not learn it either: no contrast"))
    pr = res("probes")
    if pr:
        ctx = {k: v for k, v in pr["invariance"].items() if any(s in k for s in ("prefix", "soft", "E3/"))}
        worst = max((v["layer0_max_abs_diff"] for v in ctx.values()), default=None)
        full = [v["layer0_max_abs_diff"] for k, v in pr["invariance"].items() if k.endswith("/full")]
        rows.append(_row("[P] §4", "layer-0 attention invariance for every prefix / soft prompt (max error)", "exact",
                         "—" if worst is None else f"{worst:.1e}", worst is not None and worst <= 1e-5, "≤ 1e-5 (fp32)"))
        if full:
            rows.append(_row("[P] §4", "full fine-tuning breaks it (contrast)", "changes the pattern", f"{full[0]:.1e}",
                             full[0] > 1e-3, "> 1e-3"))
        bias = [v["layer0_rel_residual"] for k, v in pr["bias"].items() if any(s in k for s in ("prefix", "soft", "E3/"))]
        if bias:
            rows.append(_row("[P] §4", "bias identity at layer 0 (relative residual)", "exact", f"{max(bias):.1e}",
                             max(bias) <= 1e-5, "≤ 1e-5"))
        c = pr.get("clusters_E2")
        if c and c.get("nearest_centroid_acc_with_method") is not None:
            w, wo = c["nearest_centroid_acc_with_method"], c["nearest_centroid_acc_without_method"]
            rows.append(_row("[P] Fig. 3", "prefixes move activations into task clusters (nearest-centroid acc.)",
                             "visibly separate", f"{100 * w:.0f} % with vs {100 * wo:.0f} % without (chance {100 * c['chance']:.0f} %)",
                             w > wo + 0.2, "with > without + 20 pp"))
    ll = res("llama")
    if ll:
        l0 = next((c for c in ll["checks"] if c["layer"] == 0), None)
        if l0:
            rows.append(_row("[P] Fig. 5", f"LLaMA layer-0 identities, {ll['model']} ({ll['dtype']})",
                             "hold to fp16 precision (LLaMA-7B)",
                             f"rescaling {l0['rescale_max_err']:.1e}, bias (rel.) {l0['bias_rel_residual']:.1e}",
                             bool(ll["passed"]), f"within {ll['dtype']} tolerance"))
    t1 = res("thm1")
    if t1:
        ok = all(c.get("success_rate", 0) == 1.0 for c in t1["checks"])
        rows.append(_row("[P] Thm 1", "one virtual token generates any sequence", "any Y ∈ [V]^N",
                         "; ".join(f"V={c.get('V')} N={c.get('N')}: {100 * c.get('success_rate', 0):.1f} %" for c in t1["checks"]),
                         ok, "all targets exact"))
    t2 = res("thm2")
    if t2:
        ok = all(c.get("success_rate", 0) == 1.0 for c in t2["thm2"])
        rows.append(_row("[P] Thm 2", "one virtual token realises any map [V]→[V]", "V^V maps",
                         "; ".join(f"V={c.get('V')}: {100 * c.get('success_rate', 0):.1f} %" for c in t2["thm2"]), ok, "all maps exact"))
        cap = t2["capacity"]
        rows.append(_row("[P] §3", "virtual tokens reach more completions than hard tokens", "24,426 hard vs 46,812 virtual (LLaMA-7B)",
                         f"{cap.get('hard_distinct')} hard vs {cap.get('virtual_distinct')} virtual",
                         (cap.get("virtual_distinct") or 0) > (cap.get("hard_distinct") or 0), "virtual > hard"))
    se = res("sample_eff")
    if se:
        acc = se["acc"]
        lo, hi = str(se["sizes"][0]), str(se["sizes"][-1])
        at = lambda n: {s_: acc[s_][n]["mean"] for s_ in acc}
        small, large = at(lo), at(hi)
        shared_small = max(small.get("simple", 0), small.get("deep", 0))
        # sample efficiency: sharing ahead at small n, and the gap closing as n grows
        gap_small = shared_small - small.get("none", 0)
        gap_large = max(large.get("simple", 0), large.get("deep", 0)) - large.get("none", 0)
        rows.append(_row("[L] toy", f"sharing is more sample-efficient ({se['task']}, P={se['P']} prefixes; n = {lo} / {hi} examples)",
                         "Simple/Deep-share > No-share (FGVC)",
                         "; ".join(f"{s_} {_pct(small[s_])} / {_pct(large[s_])}" for s_ in small),
                         gap_small > 0.05 and gap_large < gap_small,
                         "a shared variant ahead at the smallest n, gap shrinking with n",
                         f"gap {100 * gap_small:.0f} pp at n={lo}, {100 * gap_large:.0f} pp at n={hi}: "
                         + _sample_eff_reading(gap_small, gap_large)))
    rp = res("reparam")
    if rp:
        sl = rp.get("slopes", {})
        get = lambda m: sl.get(m, {}).get("D", {})
        shared = [get(m).get("slope") for m in ("shared-linear", "shared-tanh") if get(m)]
        ns = get("no-share").get("slope")
        if shared and ns is not None:
            flatter = all(ns > s + 0.1 and get("no-share").get("ci_low", ns) > get(m).get("ci_high", s)
                          for s, m in zip(shared, ("shared-linear", "shared-tanh")))
            rows.append(_row("[L] §6", "sharing: D falls ~ n^-1/2; no-share far flatter (log-log slopes)",
                             "≈ −0.5 vs ≫ −0.5",
                             f"shared-linear {shared[0]:.2f}, shared-tanh {shared[-1]:.2f}, no-share {ns:.2f}",
                             flatter, "no-share slope > shared + 0.1, CIs apart",
                             "no-share is not clearly flatter"))
    rows.append(_row("[L] FGVC", "No-share 82.3 < Deep-share 88.3 < Simple-share 89.1 (ViT-B/16)", "82.3 / 88.3 / 89.1",
                     "not run (needs ViT-B/16 and image data)", None, ""))
    return rows
