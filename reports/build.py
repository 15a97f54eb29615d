"""`build_report`: load runs, collect their probes (`probes.compute.collect`, one pass per run) and
render one self-contained HTML report. Method labels come from the method registry.

Sections: overview, any caller sections (`extra_sections`), attention patterns ([P] Figure 1
style), attention invariance, bias and activation clusters ([P] Figure 3 style), accuracy
(cross-task matrix and learning curves) and provenance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from probes.common import paired_forwards
from probes.compute import collect, probe_inputs
from reports.figures import (AttentionPanel, accuracy_figure, attention_figure, clusters_figure,
                             invariance_figure, learning_curves_figure)
from reports.html import Pre, Section, Table, as_section, check_output, export_pngs, render_report, write_report
from prefixlab_common.errors import UserError
from toy_models.pretraining import LoadedRun, base_sha
from tuning.pipeline import load_run
from tuning.registry import METHODS
from toy_models.runs import RunDir
from toy_models.tasks import MIX4, fixed_test_set, resolve_task
from toy_models.training import evaluate, resolve_device


def build_report(runs: list[Path], out: Path, png_dir: Path | None = None, n_inputs: int = 200,
                 extra_sections: list | None = None, title: str = "prefixlab report",
                 extras_first: bool = False, device=None) -> dict:
    """Write a report on `runs` (base and/or tuned runs of one base model) to `out`.

    extra_sections: Sections, or (title, item) / (title, [items]) / (title, items, intro)
    tuples, where an item is a plotly figure, `reports.html.Table` (escaped cells),
    `Pre` (escaped preformatted text), `Raw` (trusted HTML) or a str (an escaped paragraph).
    They follow the overview (or open the report, with extras_first). Returns a summary dict; `warnings` holds one-line notes (e.g. PNG
    export skipped for lack of a browser)."""
    t0 = time.perf_counter()
    if not runs:
        raise UserError("no runs to report on; pass one or more run directories")
    out = check_output(Path(out))
    if png_dir is not None and Path(png_dir).exists() and not Path(png_dir).is_dir():
        raise UserError(f"the PNG directory {png_dir} exists and is not a directory")
    if n_inputs <= 0:
        raise UserError(f"--inputs must be positive, got {n_inputs}")
    extras = [as_section(s) for s in (extra_sections or [])]  # validated before the slow part
    # validated and recorded; the probe sections compute on the CPU in fp32 (probes/compute.py)
    asked = resolve_device(device)

    loaded = _load(runs)
    tuned = [r for r in loaded if r.state is not None]
    labels = _labels(loaded)
    base = next((r for r in loaded if r.state is None), None)

    # extras_first: the caller's sections open the report (reproduce's paper-vs-lab table)
    sections = extras + [_overview(loaded, labels)] if extras_first else [_overview(loaded, labels)] + extras
    sections.append(_attention_section(loaded, tuned, labels, base))
    if tuned:
        probed = collect(tuned, ["invariance", "bias", "clusters"], n_inputs,
                         key=lambda r: f"{r.config['task']} · {_method_desc(r)} [{labels[id(r)]}]")
        sections.append(_invariance_section(tuned, labels, n_inputs, [p["invariance"] for p in probed["runs"]]))
        sections.append(_bias_section(tuned, labels, n_inputs, [p["bias"] for p in probed["runs"]],
                                      probed["clusters"]))
    sections.append(_accuracy_section(loaded, labels, n_inputs))
    sections.append(_provenance_section(loaded, labels))

    subtitle = (f"{len(loaded)} runs, {n_inputs} probe inputs per run; built "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    doc, figures = render_report(title, sections, subtitle)
    write_report(out, doc)
    result = {"out": str(out), "bytes": out.stat().st_size, "runs": [labels[id(r)] for r in loaded],
              "sections": [s.title for s in sections], "figures": len(figures), "png": [], "warnings": [],
              "device": "cpu"}
    if asked.type != "cpu":
        result["warnings"].append(f"--device {asked} asked; the report's probes and evaluations ran on the CPU")
    if png_dir is not None:
        paths, warning = export_pngs(figures, Path(png_dir))
        result["png"] = [str(p) for p in paths]
        if warning:
            result["warnings"].append(warning)
    result["seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# Loading.


def _load(paths: list[Path]) -> list[LoadedRun]:
    loaded = [load_run(p) for p in paths]
    shas = {}
    for r in loaded:
        sha = base_sha(r.path) if r.state is None else r.config["base"]["sha256"]
        shas.setdefault(sha, r)
    if len(shas) > 1:
        raise UserError("these runs come from different base models; report on the runs of one base together")
    if not any(r.state is None for r in loaded):  # the base is the reference of every figure
        base_path = Path(loaded[0].config["base"]["path"])
        loaded.insert(0, load_run(base_path))
    return loaded


def _method_desc(r: LoadedRun) -> str:
    if r.state is None:
        return "base model"
    m = dict(r.config["method"])
    name = m.pop("name")
    return METHODS[name].describe(m) if name in METHODS else name


def _labels(loaded: list[LoadedRun]) -> dict[int, str]:
    names = [r.name for r in loaded]
    out = {}
    for r in loaded:
        name = r.name if names.count(r.name) == 1 else f"{r.path.parent.name}/{r.name}"
        out[id(r)] = name
    return out


def _title(r: LoadedRun, labels) -> str:
    return f"{_method_desc(r)}\non {r.config['task']} [{labels[id(r)]}]"


# --------------------------------------------------------------------------------------------
# Sections.


def _overview(loaded, labels) -> Section:
    rows = []
    for r in loaded:
        final = RunDir(r.path).read_json("metrics.json") if RunDir(r.path).complete else {}
        rows.append([labels[id(r)], r.kind, _method_desc(r), r.config["task"], r.config.get("seed"),
                     r.config.get("n_params", sum(p.numel() for p in r.model.parameters()) if r.state is None else None),
                     final.get("exact_acc"), final.get("steps"), str(r.path)])
    spec = loaded[0].spec
    cfg = loaded[0].model.cfg
    intro = (f"Base model: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}; inputs of "
             f"{spec.length} digits 0..{spec.num_digits - 1}, {spec.prompt_len} prompt slots.")
    return Section("Overview", [Table(["run", "kind", "method", "task", "seed", "trainable params",
                                       "exact acc. (own task)", "steps", "path"], rows)], intro)


def _content_labels(r: LoadedRun, tokens: torch.Tensor) -> list[str]:
    return [r.spec.token_str(int(t)) for t in tokens]


def _panel(r: LoadedRun, title: str, tokens: torch.Tensor, pattern_per_layer: list[torch.Tensor],
           label: str) -> AttentionPanel:
    T = tokens.shape[0]
    n_pre = [p.shape[-1] - T for p in pattern_per_layer]
    n_max = max(n_pre)
    padded = []
    for p, n in zip(pattern_per_layer, n_pre):
        gap = torch.full((*p.shape[:-1], n_max - n), float("nan"), dtype=p.dtype)
        padded.append(torch.cat([p[..., :n], gap, p[..., n:]], -1))
    pattern = torch.stack(padded)  # [layer, head, Q, K]
    return AttentionPanel(title, pattern, n_max, pattern.shape[-2] - T, _content_labels(r, tokens),
                          prompt_len=r.spec.length, pre_label=label)


def _attention_section(loaded, tuned, labels, base) -> Section:
    ref = tuned[0] if tuned else loaded[0]
    tokens = probe_inputs(ref, 1)  # one fixed test input of the (first) tuned task
    model = base.model
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    panels = [_panel(base, _title(base, labels), tokens[0], [cache[n][0] for n in names], "P")]
    for r in tuned:
        pair = next(paired_forwards(r.model, r.state, tokens, names))
        name = r.config["method"]["name"]
        label = METHODS[name].slot_label if name in METHODS else "P"
        panels.append(_panel(r, _title(r, labels), tokens[0], [pair.method[n][0] for n in names], label))
    fig = attention_figure(panels, title=f"Attention on one {ref.config['task']} test input: "
                           + " ".join(ref.spec.token_str(int(t)) for t in tokens[0]))
    intro = ("The same input under the base model and each tuned run ([P] Figure 1). Keys run along x, "
             "queries down y; hover a cell for its tokens. Red boxes mark prefix slots (P1, P2, ...) or "
             "soft-prompt positions (SP1, ...), the dashed line the end of the input X, after which the "
             "model writes Y. 'renormalized over content' divides each row's content part by its content "
             "mass 1 - alpha: at layer 0 a prefix leaves it equal to the base pattern, full fine-tuning "
             "does not. Pick the layer and head with the dropdowns.")
    return Section("Attention patterns", [fig], intro)


def _invariance_section(tuned, labels, n_inputs, invariance) -> Section:
    results, rows = {}, []
    for r, inv in zip(tuned, invariance):
        results[_title(r, labels)] = inv
        s = inv.summary
        rows.append([labels[id(r)], _method_desc(r), s["layer0_max_abs_diff"],
                     "yes" if s["layer0_invariant"] else "no",
                     float(inv.mean_prefix_mass[0].mean()) if inv.n_pre[0] else None,
                     max(s["max_abs_diff_by_layer"].values())])
    intro = ("Max over inputs, queries and content keys of |A^pt/(1 - alpha) - A| per layer and head "
             f"({n_inputs} test inputs of each run's task), on a log colour scale; cells read '0' where the "
             "renormalized pattern equals the base pattern exactly (docs/papers.md §4: exact at layer 0 for "
             "prefixes and soft prompts).")
    table = Table(["run", "method", "layer-0 max |diff|", "layer-0 invariant (≤ 1e-5)",
                   "layer-0 mean prefix mass", "max |diff| over layers"], rows)
    return Section("Attention invariance", [invariance_figure(results), table], intro)


def _bias_section(tuned, labels, n_inputs, bias, c) -> Section:
    rows = []
    for r, b in zip(tuned, bias):
        s = b.summary
        rows.append([labels[id(r)], _method_desc(r), s["layer0_rel_residual"],
                     "yes" if s["layer0_identity_holds"] else "no", s["layer0_min_bias_cosine"],
                     float(b.mean_bias_norm[0].mean())])
    ref = tuned[0]
    fig = clusters_figure(c, [r.config["task"] for r in tuned], [_method_desc(r) for r in tuned])
    intro = ("Layer-0 attention output at the last input position (the one that predicts y1), for "
             f"{n_inputs} test inputs of {ref.config['task']}, without a method (grey) and under each run's "
             "method, projected on the first two principal components ([P] Figure 3). Each line joins an "
             "input's base point to its point under a method: a prefix adds a bias that moves activations "
             "towards its task's cluster. The table checks the bias identity t^pt = sum_k A^pt_k v_k + "
             "(1 - alpha) t at layer 0.")
    table = Table(["run", "method", "layer-0 relative residual", "identity holds (≤ 1e-5)",
                   "layer-0 min bias cosine (P = 1)", "layer-0 mean bias norm"], rows)
    return Section("Bias and activation clusters", [fig, table], intro)


def _accuracy_section(loaded, labels, n_inputs) -> Section:
    tasks = list(dict.fromkeys(r.config["task"] for r in loaded))
    if "mix4" in tasks:
        tasks += [t for t in MIX4 if t not in tasks]
    matrix = {}
    for r in loaded:
        matrix[labels[id(r)]] = {t: _exact_acc(r, t, n_inputs) for t in tasks}
    curves = {labels[id(r)]: RunDir(r.path).metrics_rows() for r in loaded}
    intro = (f"Exact accuracy (all outputs right, greedy decoding) on {n_inputs} fixed test inputs of each task; "
             "for mix4 y1 is given, as in [P]. Learning curves are each run's metrics.jsonl.")
    return Section("Accuracy", [accuracy_figure(matrix, "Exact accuracy: runs × tasks"),
                                learning_curves_figure(curves)], intro)


def _exact_acc(r: LoadedRun, task: str, n: int, seed: int = 1234) -> float:
    """evaluate_run's exact accuracy on its fixed test set, without the greedy-decoding pass:
    teacher-forced exact accuracy equals greedy exact accuracy (toy_models.training.evaluate),
    and skipping the L extra forwards makes the report ~10x faster on a 4/4/256 model."""
    resolved = resolve_task(task, r.spec)
    return evaluate(r.model, r.state, fixed_test_set(resolved, r.spec, n, seed), greedy=False,
                    provide_first=resolved.ambiguous_first)["exact_acc"]


def _provenance_section(loaded, labels) -> Section:
    rows, blocks = [], []
    for r in loaded:
        run = RunDir(r.path)
        prov = run.read_json("provenance.json") if (r.path / "provenance.json").is_file() else {}
        v = prov.get("versions", {})
        rows.append([labels[id(r)], r.config.get("seed"), prov.get("command"), prov.get("started"),
                     v.get("torch"), v.get("plotly"), v.get("python"),
                     (r.config.get("base") or {}).get("sha256", "")[:12] or None])
        blocks.append(Pre(json.dumps({"config": r.config, "provenance": prov}, indent=2, sort_keys=True),
                          summary=f"{labels[id(r)]}: config.json and provenance.json"))
    table = Table(["run", "seed", "command", "started", "torch", "plotly", "python", "base sha256"], rows)
    return Section("Provenance", [table, *blocks], "Each run's resolved config, seed, command and package versions.")
