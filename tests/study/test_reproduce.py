"""End-to-end `reproduce` on the micro preset: caching and resumption after a real kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reports.study import render_study
from study.reproduce import reproduce

ROOT = Path(__file__).resolve().parents[2]


def stage_markers(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/result.json")}


def test_reproduce_micro_caches_and_resumes_after_kill(tmp_path):
    # 1. an uninterrupted study
    full = reproduce(tmp_path / "full", "micro")
    render_study(tmp_path / "full", full)
    failed = {n: r.get("error") for n, r in full["records"].items() if r["status"] != "done"}
    assert not failed, failed
    content_full = json.loads((tmp_path / "full" / "report.json").read_text())
    assert (tmp_path / "full" / "report.html").stat().st_size > 100_000
    assert content_full["table"][0]["source"] == "[P] E1"

    # 2. a study killed (SIGKILL) once its first stage has finished, then rerun
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # same thread count as this process: float results are bitwise equal only for equal threads
    proc = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); "
                             "from study.reproduce import reproduce; "
                             "reproduce(sys.argv[1], 'micro')", str(cut)], cwd=ROOT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not stage_markers(cut) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = stage_markers(cut)
    assert done_before, "the first stage should have finished before the kill"
    assert not (cut / "report.json").exists()
    resumed = reproduce(cut, "micro")
    # finished stages were not recomputed
    after = stage_markers(cut)
    for name, mtime in done_before.items():
        assert after[name] == mtime, f"stage {name} was recomputed"
    assert any(r.get("cached") for r in resumed["records"].values())
    # and the final report says the same as the uninterrupted one
    content_cut = json.loads((cut / "report.json").read_text())
    assert content_cut["table"] == content_full["table"]
    strip_paths = lambda s: json.loads(json.dumps(s).replace(str(cut), "X").replace(str(tmp_path / "full"), "X"))
    assert strip_paths(content_cut["stages"]) == strip_paths(content_full["stages"])

    # 3. a third run recomputes nothing
    again = reproduce(cut, "micro")
    assert all(r.get("cached") for r in again["records"].values())



def test_report_opens_with_the_paper_vs_lab_table(tmp_path):
    render_study(tmp_path / "s", reproduce(tmp_path / "s", "micro", only=["E1"]))
    html = (tmp_path / "s" / "report.html").read_text()
    body = html[html.index("<body>"):]
    first_section = body[body.index("<section"):body.index("</section>")]
    assert "Paper vs lab" in first_section
