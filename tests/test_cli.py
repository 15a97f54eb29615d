"""The CLI through typer's CliRunner on micro sizes: happy path and every bad input (exit 2, one
line, nothing written)."""

import json

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
MICRO = ["--preset", "micro", "--seq-len", "4", "--num-digits", "4", "--prompt-len", "3",
         "--steps", "20", "--batch-size", "16", "--eval-every", "10"]
TUNE = ["--steps", "10", "--batch-size", "8", "--eval-every", "5"]


def ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def bad(args, match):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "base"
    ok(["pretrain", "--task", "add1", "--out", p, *MICRO])
    return p


def test_tasks_lists_every_task():
    r = ok(["tasks"])
    for t in ("ascending", "double_hist", "filter_at_least_n", "mix4"):
        assert t in r.output


def test_pretrain_finetune_evaluate_probe(base, tmp_path):
    ok(["finetune", base, "--method", "prefix", "--task", "add2", "-P", "2", "--out", tmp_path / "pre", *TUNE])
    ok(["finetune", base, "--method", "full", "--task", "add2", "--out", tmp_path / "full", *TUNE])
    r = ok(["evaluate", base, tmp_path / "pre", tmp_path / "full", "--task", "add1", "--task", "add2", "--json", "--n", "50"])
    res = json.loads(r.stdout)
    assert set(res[str(tmp_path / "pre")]) == {"add1", "add2"}
    ok(["evaluate", base, tmp_path / "pre", "--task", "add1", "--task", "add2", "--n", "50"])
    r = ok(["probe", tmp_path / "pre", tmp_path / "full", "--inputs", "40", "--out", tmp_path / "probe"])
    assert "layer-0 attention invariance" in r.output
    rep = json.loads((tmp_path / "probe" / "probe.json").read_text())
    verdicts = {(v["run"], v["identity"]): v["holds"] for v in rep["verdicts"]}
    assert verdicts[("pre", "layer-0 attention invariance")] is True
    assert verdicts[("full", "layer-0 attention invariance")] is False
    assert (tmp_path / "probe" / "probe.safetensors").is_file()


def test_finetune_seeds_reports_mean_and_std(base, tmp_path):
    r = ok(["finetune", base, "--method", "soft_prompt", "--task", "add2", "-P", "1", "--seeds", "0,1",
            "--out", tmp_path / "s", *TUNE])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and (tmp_path / "s" / "seed1" / "metrics.json").is_file()
    # mean and sample std of the seeds' own metrics, as summary.json and the printed line say
    import statistics
    accs = [json.loads((tmp_path / "s" / f"seed{i}" / "metrics.json").read_text())["exact_acc"] for i in (0, 1)]
    assert summary["exact_acc"] == {"0": accs[0], "1": accs[1]}
    assert (summary["exact_acc_mean"], summary["exact_acc_std"]) == (statistics.fmean(accs), statistics.stdev(accs))
    assert f"{statistics.fmean(accs):.2%} ± {statistics.stdev(accs):.2%}" in r.output


def test_bad_inputs_exit_2_and_write_nothing(base, tmp_path):
    out = tmp_path / "x"
    bad(["pretrain", "--task", "sort_everything", "--out", out, *MICRO], "unknown task")
    bad(["pretrain", "--task", "add1", "--out", out, *MICRO[:-8], "--preset", "huge"], "unknown preset")
    bad(["pretrain", "--task", "add1", "--out", out, *MICRO, "--steps", "0"], "steps must be positive")
    bad(["pretrain", "--task", "add1", "--out", out, *MICRO, "--seq-len", "0"], "length must be positive")
    bad(["pretrain", "--task", "add1", "--out", out, *MICRO, "--prompt-len", "-2"], "prompt length")
    bad(["finetune", base, "--method", "magic", "--task", "add2", "--out", out], "unknown method")
    bad(["finetune", base, "--method", "prefix", "--task", "add2", "-P", "0", "--out", out], "positive")
    bad(["finetune", base, "--method", "lora", "--task", "add2", "-r", "0", "--out", out], "positive")
    bad(["finetune", base, "--method", "prefix", "--task", "add2", "-P", "9", "--out", out], "does not fit")
    bad(["finetune", tmp_path / "nothing", "--method", "prefix", "--task", "add2", "--out", out], "no run")
    bad(["evaluate", base, "--task", "nope"], "unknown task")
    bad(["probe", base, "--out", out], "base run")
    assert not out.exists()
    # an existing output directory is never overwritten
    before = (base / "model.safetensors").read_bytes()
    bad(["pretrain", "--task", "add1", "--out", base, *MICRO], "already exists")
    assert (base / "model.safetensors").read_bytes() == before


def test_corrupt_checkpoint_is_refused(base, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "model.safetensors").write_bytes(b"\\x00garbage")
    bad(["evaluate", broken, "--task", "add1"], "corrupt")
    (broken / "config.json").write_text("{not json")
    bad(["evaluate", broken], "not valid JSON")


def test_finetune_reads_the_method_registry(base, tmp_path):
    """Every declared option of every registered method is a finetune flag; `methods` lists them;
    the hard prompt is one more --method, and what does not apply is one line, exit 2."""
    from tuning.registry import METHODS
    help_text = ok(["finetune", "--help"]).output
    listed = ok(["methods"]).output
    for name, cls in METHODS.items():
        assert name in listed
        for o in cls.options:
            assert o.flag in help_text, o.flag
    r = ok(["finetune", base, "--method", "prompt", "--task", "add2", "-P", "1", "--batch-size", "16",
            "--out", tmp_path / "hp"])
    m = json.loads((tmp_path / "hp" / "metrics.json").read_text())
    assert f"prompt {m['search']['tokens']} (exhaustive search)" in r.output
    out = tmp_path / "x"
    bad(["finetune", base, "--method", "prompt", "--task", "add2", "--lr", "0.1", "--out", out],
        "--lr does not apply to method prompt")
    bad(["finetune", base, "--method", "lora", "--task", "add2", "--share", "none", "--out", out],
        "option --share does not apply to method lora")
    bad(["finetune", base, "--method", "prompt", "--task", "add2", "--tokens", "1,x", "--out", out],
        "--tokens must be comma-separated int")
    bad(["finetune", base, "--method", "magic", "--task", "add2,add1", "--seeds", "0", "--out", out], "unknown method")
    bad(["finetune", base, "--method", "prompt", "--task", "add2", "-P", "3", "--search", "exhaustive",
         "--max-candidates", "10", "--out", out], "max-candidates")
    assert not out.exists()


def test_probe_says_what_each_line_is(base, tmp_path):
    ok(["finetune", base, "--method", "prefix", "--init", "slot", "--task", "add2", "-P", "2", "--out",
        tmp_path / "pre", *TUNE])
    r = ok(["probe", tmp_path / "pre", "--inputs", "20", "--out", tmp_path / "probe"])
    assert "pre: class in [P]'s method hierarchy: prefix-tuning (prefix keys/values in" in r.output


def test_a_multi_seed_directory_passed_as_a_run_names_its_seed_folders(base, tmp_path):
    ok(["finetune", base, "--method", "soft_prompt", "--task", "add2", "-P", "1", "--seeds", "0,1",
        "--out", tmp_path / "s", "--steps", "2", "--batch-size", "8", "--eval-every", "1"])
    bad(["evaluate", tmp_path / "s"], "seed0/, seed1/")
    bad(["probe", tmp_path / "s", "--out", tmp_path / "p"], f"pass one of them, e.g. {tmp_path / 's' / 'seed0'}")
    bad(["finetune", tmp_path / "s", "--method", "prefix", "--task", "add1", "--out", tmp_path / "x"], "seed0/")
    assert not (tmp_path / "p").exists() and not (tmp_path / "x").exists()


def test_report_png_without_a_browser_is_one_line_naming_make_browser(base, tmp_path, monkeypatch):
    from choreographer.browsers.chromium import Chromium
    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kw: None))
    out, png = tmp_path / "r.html", tmp_path / "png"
    bad(["report", base, "--html", out, "--png", png], "make browser")
    assert not out.exists() and not png.exists()


def test_report_out_is_the_old_spelling_of_html(base, tmp_path):
    r = runner.invoke(app, ["report", str(base), "--out", str(tmp_path / "r.html"), "--inputs", "20"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0].startswith("warning: --out is deprecated; use --html")
    assert (tmp_path / "r.html").is_file()


@pytest.mark.parametrize("scale,banner", [("micro", True), ("quick", False)])
def test_micro_tables_carry_a_not_evidence_banner(monkeypatch, tmp_path, scale, banner):
    import reports.study
    import study.reproduce
    from reports.study import _table_section
    from study.table import scale_banner
    row = {"source": "[P] E1", "verdict": "reproduced", "claim": "a claim", "paper": "0 %", "lab": "0 %",
           "criterion": "c"}
    monkeypatch.setattr(study.reproduce, "reproduce", lambda out, s, *a, **k: {
        "preset": s, "records": {}, "table": [row], "timing": None})
    monkeypatch.setattr(reports.study, "render_study", lambda out, res: out / "report.html")
    r = ok(["reproduce", "--scale", scale, "--out", tmp_path / "s"])
    lines = r.stdout.splitlines()
    intro = _table_section([row], scale)[2]
    if banner:
        assert lines[0] == scale_banner("micro") and "not evidence" in lines[0].lower()
        assert intro.startswith(scale_banner("micro"))
    else:
        assert scale_banner(scale) is None and lines[0].startswith("[P] E1") and "NOT EVIDENCE" not in intro


def test_a_local_ray_starts_without_token_auth_or_start_up_lines(monkeypatch):
    """Token authentication is for clusters other machines reach; a local study's Ray needs none."""
    import logging
    import os
    from engine.parallel import _init_local
    seen = {}

    class FakeRay:
        def init(self, **kwargs):
            seen.update(kwargs, auth=os.environ.get("RAY_AUTH_MODE"))

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    _init_local(FakeRay(), 2)
    assert seen["auth"] == "disabled" and "RAY_AUTH_MODE" not in os.environ
    assert seen["log_to_driver"] is False and seen["include_dashboard"] is False
    assert seen["logging_level"] >= logging.WARNING
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the user's own choice is kept
    _init_local(FakeRay(), 2)
    assert seen["auth"] == "token" and os.environ["RAY_AUTH_MODE"] == "token"
