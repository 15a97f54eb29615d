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


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """An uninterrupted micro study, run stage after stage in this process (one torch thread)."""
    path = tmp_path_factory.mktemp("seq") / "full"
    full = reproduce(path, "micro")
    render_study(path, full)
    return path, full


def same_content(a: Path, b: Path) -> None:
    ca, cb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert ca["table"] == cb["table"]
    strip = lambda s, p: json.loads(json.dumps(s).replace(str(p), "X"))
    assert strip(ca["stages"], a) == strip(cb["stages"], b)


def kill_after_first_stage(cmd: str, out: Path) -> dict:
    """Start a study in a new process group, SIGKILL the group once a stage has finished."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", cmd, str(out)], cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not stage_markers(out) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = stage_markers(out)
    assert done, "the first stage should have finished before the kill"
    assert not (out / "report.json").exists()
    return done


def test_reproduce_micro_caches_and_resumes_after_kill(tmp_path, sequential):
    # 1. an uninterrupted study
    full_path, full = sequential
    failed = {n: r.get("error") for n, r in full["records"].items() if r["status"] != "done"}
    assert not failed, failed
    content_full = json.loads((full_path / "report.json").read_text())
    assert (full_path / "report.html").stat().st_size > 100_000
    assert content_full["table"][0]["source"] == "[P] E1"

    # 2. a study killed (SIGKILL) once its first stage has finished, then rerun
    cut = tmp_path / "cut"
    # same thread count as this process: float results are bitwise equal only for equal threads
    done_before = kill_after_first_stage("import sys, torch; torch.set_num_threads(1); "
                                         "from study.reproduce import reproduce; reproduce(sys.argv[1], 'micro')", cut)
    resumed = reproduce(cut, "micro")
    # finished stages were not recomputed
    after = stage_markers(cut)
    for name, mtime in done_before.items():
        assert after[name] == mtime, f"stage {name} was recomputed"
    assert any(r.get("cached") for r in resumed["records"].values())
    # and the final report says the same as the uninterrupted one
    same_content(cut, full_path)

    # 3. a third run recomputes nothing
    again = reproduce(cut, "micro")
    assert all(r.get("cached") for r in again["records"].values())
    # its report says that it computed nothing, and keeps each stage's work from when it was computed
    from reports.study import _stages_section
    _, (table,), intro = _stages_section(again["records"], again["timing"])
    assert again["timing"]["stages_run"] == 0 and "computed nothing" in intro and "longest chain" not in intro
    assert all(row[3].startswith("cached (") and row[3].endswith(" s when computed)") for row in table.rows)



@pytest.mark.slow
def test_parallel_study_on_ray_resumes_and_matches_the_sequential_one(tmp_path, sequential):
    """`--workers 2` on a local Ray (num_cpus=2), one thread per task: killed (driver and workers)
    after its first stage, then rerun, its report content equals the sequential study's."""
    pytest.importorskip("ray")
    cut = tmp_path / "ray"
    done_before = kill_after_first_stage(
        "import sys; from study.reproduce import reproduce; "
        "reproduce(sys.argv[1], 'micro', workers=2, threads=1)", cut)
    res = reproduce(cut, "micro", workers=2, threads=1)
    assert all(r["status"] == "done" for r in res["records"].values())
    for name, mtime in done_before.items():
        assert stage_markers(cut)[name] == mtime, f"stage {name} was recomputed"
    same_content(cut, sequential[0])


def test_report_opens_with_the_paper_vs_lab_table(tmp_path):
    render_study(tmp_path / "s", reproduce(tmp_path / "s", "micro", only=["E1"]))
    html = (tmp_path / "s" / "report.html").read_text()
    body = html[html.index("<body>"):]
    first_section = body[body.index("<section"):body.index("</section>")]
    assert "Paper vs lab" in first_section


ANCHOR = Path(__file__).with_name("micro_anchor.json")
STAGES = ("E1", "E2", "E3", "E4")  # the [P] stages; [L]'s sample-efficiency and reparameterization stages are not pinned


def anchor_of(records: dict) -> dict:
    """What the anchor pins of a study: every number of the E1-E4 results except paths and
    timings (accuracies are multiples of 1/64 on the micro test sets; for each loss curve its
    last loss), and the [P] rows of those stages as the table shows them."""
    from study.table import paper_vs_lab
    out = {}
    for n in STAGES:
        res = dict(records[n]["result"])
        res.pop("base", None), res.pop("runs", None), res.pop("prompt_runs", None)
        res["curves"] = {k: c[-1][1] for k, c in res.pop("curves", {}).items()}
        out[n] = res
    out["rows"] = [r for r in paper_vs_lab({n: records[n] for n in STAGES}) if r["source"].split()[-1] in STAGES]
    return out


def test_micro_study_numbers_and_verdicts_are_anchored(sequential):
    """A regression anchor beside the self-comparison above: the micro study's E1-E4 numbers and
    verdicts as recorded (one torch thread; a rerun was bit-identical). A change here is a change
    of the experiments, their recipes or the training loop: look at it, then rewrite the anchor
    with `write_anchor(records)` if it is meant."""
    got = anchor_of(sequential[1]["records"])
    want = json.loads(ANCHOR.read_text())
    for n in STAGES:
        g, w = dict(got[n]), dict(want[n])
        gc, wc = g.pop("curves"), w.pop("curves")
        assert g == w, n
        assert gc.keys() == wc.keys() and all(abs(gc[k] - wc[k]) <= 1e-4 * abs(wc[k]) for k in wc), (n, gc, wc)
    assert got["rows"] == want["rows"]


def write_anchor(records: dict) -> None:
    ANCHOR.write_text(json.dumps(anchor_of(records), indent=1, ensure_ascii=False) + "\n")


def test_a_study_records_each_stage_s_work_and_wall_and_its_own_wall_time(sequential):
    """report.json says how fast the study ran, apart from its content."""
    path, full = sequential
    report = json.loads((path / "report.json").read_text())
    t = report["timing"]
    assert t == full["timing"] and t["cores"] == 1 and t["stages_run"] == len(full["records"])
    stages = [r["timing"] for r in full["records"].values()]
    assert all(0 < s["work_s"] <= s["wall_s"] + 1e-9 and s["threads"] >= 1 for s in stages)
    assert t["work_s"] == sum(s["work_s"] for s in stages) <= t["wall_s"]
    assert t["longest_chain"][0].startswith("base-") and 0 < t["longest_chain_s"] <= t["work_s"]
    # each stage's measured work is kept for the next study's schedule
    history = json.loads((path / "timings.json").read_text())
    assert {n: h["work_s"] for n, h in history.items()} == {n: s["work_s"] for n, s in zip(full["records"], stages)}
    html = (path / "report.html").read_text()
    assert "longest chain" in html and "waited" in html
    # each training stage's precision (the micro recipes: none pays for bf16, so all fp32, per stage
    # or not), and none for the stages that train no toy run: the bases and the experiments that
    # declare a recipe (the registry says which: a new toy experiment is covered unedited)
    from study.experiments.registry import REGISTRY
    trained = ({n for n in full["records"] if n.startswith("base-")}
               | {e.name for e in REGISTRY if e.recipe is not None and "micro" in e.scales})
    assert {"base-E1", "base-E2", "base-E3", "E1", "E2", "E3", "E4", "sample_eff"} <= trained
    assert report["stage_precision"] == full["stage_precision"] == {n: "fp32" for n in trained}
    assert "what a training stage trained in" in html


def test_micro_study_has_hard_prompt_rows_searched_not_trained(sequential):
    """Hard prompting in E1 and E2: the best hard prompt of length ≤ P=1 on each task,
    found by an exhaustive search of the V tokens on one training batch (no optimizer steps); its
    rows in the table; the probes stage classes E1's prompt run as prompting."""
    from tuning.pipeline import load_run
    path, full = sequential
    rec = full["records"]
    e1, e2 = rec["E1"]["result"], rec["E2"]["result"]
    runs = [e1["runs"]["prompt"]] + list(e2["prompt_runs"].values())
    assert len(runs) == 5 and len(set(runs)) == 5
    for run_path in runs:
        run = load_run(run_path)
        m = json.loads((Path(run_path) / "metrics.json").read_text())
        assert run.config["method"]["name"] == "prompt" and run.config["method"]["length"] == 1
        s = m["search"]
        assert (s["kind"], s["candidates"], s["batch"]) == ("exhaustive", run.model.cfg.d_vocab, 64)
        assert len(s["tokens"]) == 1  # micro: V = 7 (4 digits, the counts, SLOT); quick/paper: V = 12
        assert run.state.prompt.equal(run.model.embed.W_E[s["tokens"]])  # the tokens it chose are its state
        assert m["exact_acc"] in (e1["descending_acc"]["prompt"]["values"][0],
                                  *[v["values"][0] for v in e2["prompt"]["acc"].values()])
    assert e1["prompt"]["P"] == e2["prompt"]["P"] == 1
    assert set(e2["prompt"]["acc"]) == set(e2["own_task_acc"]) == {"ascending", "descending", "add1", "add2"}
    assert e1["prompt"]["tokens"][0] == json.loads((Path(e1["runs"]["prompt"]) / "metrics.json").read_text())["search"]["tokens"]
    claims = [r["claim"] for r in full["table"] if "hard prompt" in r["claim"]]
    assert claims == ["a hard prompt (best of length ≤ 1) cannot learn descending either",
                      "a hard prompt (best of length ≤ 1) selects a pretrained task at most as well as the P=1 prefix"]
    assert rec["probes"]["result"]["hierarchy"]["E1/prompt"]["class"] == "prompting (hard prompt)"
    assert rec["probes"]["result"]["hierarchy"]["E1/soft_prompt"]["class"] == "soft prompting"
    assert "E1/prompt" in rec["probes"]["result"]["invariance"]
    html = (path / "report.html").read_text()
    assert "best hard prompt (length ≤ 1)" in html and "class in [P]" in html and "prompting (hard prompt)" in html


def test_e1_and_e2_stage_keys_carry_the_prompt_settings(tmp_path):
    """A cached E1/E2 without the prompt rows is not reused: their configs (so their keys) hold
    the prompt settings; the other experiments' and the bases' configs do not."""
    from study.recipes import PROMPTING
    from study.stages import stages_for
    for scale in ("micro", "quick", "paper"):
        st = {s.name: s for s in stages_for(scale, tmp_path)}
        for e in ("E1", "E2"):
            assert st[e].config["prompt"] == PROMPTING[scale] and PROMPTING[scale]["P"] == 1
            old = dict(st[e].config)
            del old["prompt"]
            keys = {n: "k" for n in st[e].needs}
            assert st[e].key(keys) != type(st[e])(e, "", old, st[e].fn, st[e].needs).key(keys)
        assert not any("prompt" in s.config for n, s in st.items() if n not in ("E1", "E2"))
