"""Report size and render time: 4 tuned runs of a petrov-e3-sized model (4 layers, 4 heads,
d_model 256, P = 10), every layer and head in the attention figure. Training is a few steps only
(accuracy does not matter for size). Prints JSON: file size (target <= 8 MB) and the time headless
Chromium takes from navigation until every figure has rendered (median/min/max of 3; target <= 3 s).

    python benchmarks/bench_report.py [--out DIR] [--repeats 3] [--screenshot PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reports.build import build_report  # noqa: E402
from toy_models.pretraining import pretrain  # noqa: E402
from toy_models.tasks import TaskSpec  # noqa: E402
from toy_models.training import TrainConfig  # noqa: E402
from tuning.pipeline import finetune  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ALL_RENDERED = """() => { const d = [...document.querySelectorAll('.plotly-graph-div')];
  return d.length > 0 && d.every(g => g.querySelector('.main-svg')); }"""
RUNS = [("full", "ascending_add1", {}), ("prefix", "ascending_add1", {"length": 10}),
        ("prefix", "double_hist", {"length": 10}), ("lora", "double_hist", {"rank": 1})]


def make_runs(root: Path) -> list[Path]:
    spec = TaskSpec(prompt_len=10)
    base = root / "base"
    pretrain(base, "mix4", "petrov-e3", spec, TrainConfig(steps=2, batch_size=16, warmup=1, eval_every=2,
                                                          eval_size=32), overwrite=True)
    tr = {"steps": 2, "batch_size": 16, "eval_every": 1, "eval_size": 32, "warmup": 1}
    out = []
    for method, task, opts in RUNS:
        p = root / f"{method}_{task}"
        finetune(base, method, task, p, opts, tr, overwrite=True)
        out.append(p)
    return out


def render_times(report: Path, repeats: int, screenshot: Path | None) -> list[float]:
    from playwright.sync_api import sync_playwright
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for i in range(repeats):
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            t = time.perf_counter()
            page.goto(report.resolve().as_uri())
            page.wait_for_function(ALL_RENDERED, timeout=60_000)
            times.append(time.perf_counter() - t)
            if screenshot and i == 0:
                page.screenshot(path=str(screenshot), full_page=True)
            page.close()
        browser.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep runs and report here (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=200)
    ap.add_argument("--screenshot", type=Path, default=None, help="save a full-page screenshot here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        t = time.perf_counter()
        runs = make_runs(root / "runs")
        train_s = time.perf_counter() - t
        report = root / "report.html"
        res = build_report(runs, report, n_inputs=args.inputs)
        result = {"benchmark": "report", "model": "petrov-e3 (4 layers, 4 heads, d_model 256), P = 10",
                  "runs": len(runs), "figures": res["figures"], "size_mb": res["bytes"] / 1e6,
                  "size_target_mb": 8.0, "build_s": round(res["seconds"], 2), "train_s": round(train_s, 2),
                  "n_inputs": args.inputs}
        if Path(CHROMIUM).exists():
            try:
                times = render_times(report, args.repeats, args.screenshot)
                result["render_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                                      "runs": times}
            except ImportError:
                result["render_s"] = None
                result["note"] = "playwright is not installed: render time not measured"
        else:
            result["render_s"] = None
            result["note"] = f"{CHROMIUM} is missing: render time not measured"
        result["render_target_s"] = 3.0
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
