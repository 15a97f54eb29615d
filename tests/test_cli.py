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
