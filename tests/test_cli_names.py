"""One name, one meaning on the command line: --scale is the study's size (--preset a
model's), -P/--prefix-len is P and --seq-len is L on every command, and --json is a flag that prints
JSON on every command (a file is --json-file), --out is a directory on every command and one HTML
page is --html FILE. The old spellings still work, each with a one-line warning on stderr."""
import json

import click
import pytest
import typer
from typer.testing import CliRunner

from cli import JSON_FILE, RENAMED, app, renamed_args

runner = CliRunner()


def rewrite(command, args):
    warnings = []
    return renamed_args(command, args, warnings.append), warnings


@pytest.mark.parametrize("command,old,new", [(c, o, n) for c, m in RENAMED.items() for o, n in m.items()])
def test_each_old_spelling_becomes_the_new_one_with_one_warning(command, old, new):
    args, warnings = rewrite(command, ["--overwrite", old, "3", "--seed", "1"])
    assert args == ["--overwrite", new, "3", "--seed", "1"]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {old} is deprecated; use {new}")
    args, warnings = rewrite(command, [f"{old}=3"])
    assert args == [f"{new}=3"] and len(warnings) == 1


def test_spellings_that_mean_the_same_as_before_are_left_alone():
    for command in ("pretrain", "finetune", "reproduce", "dilution", "evaluate"):
        args = ["--scale", "q", "--seq-len", "4", "-P", "2", "--prefix-len", "2", "--json", "--json-file", "f"]
        assert rewrite(command, args) == (args, [])
    # pretrain's --preset is the model's size: not renamed; neither is --length outside pretrain/finetune
    assert rewrite("pretrain", ["--preset", "micro"]) == (["--preset", "micro"], [])
    assert rewrite("dilution", ["--length", "3"]) == (["--length", "3"], [])
    # --json alone (or before another option) is the flag on every command
    assert rewrite("dilution", ["--json", "--lengths", "8"]) == (["--json", "--lengths", "8"], [])
    assert rewrite("data-to-text", ["--scale", "micro", "--json"]) == (["--scale", "micro", "--json"], [])
    assert rewrite("evaluate", ["--json", "x"]) == (["--json", "x"], [])  # a positional run after the flag


@pytest.mark.parametrize("command", JSON_FILE)
def test_json_with_a_path_is_the_old_json_file(command):
    args, warnings = rewrite(command, ["--json", "out.json", "--seed", "0"])
    assert args == ["--json-file", "out.json", "--seed", "0"] and len(warnings) == 1
    assert "--json-file" in warnings[0]
    assert rewrite(command, ["--json=out.json"])[0] == ["--json-file=out.json"]


def _commands(group, prefix=""):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer's own, not a click.Group subclass)
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_json_is_a_flag_on_every_command_and_p_and_l_have_one_spelling():
    root = typer.main.get_command(app)
    seen = []
    for name, cmd in _commands(root):
        ctx = click.Context(cmd)
        for p in cmd.get_params(ctx):
            opts = set(p.opts) | set(p.secondary_opts)
            if "--json" in opts:
                assert p.is_flag, name
                seen.append(name)
            assert "--length" not in opts, f"{name}: --length is now --seq-len (L) or --prefix-len (P)"
            assert "--preset" not in opts or name in ("pretrain",), f"{name}: a study's size is --scale"
            if "--prefix-len" in opts:
                assert "-P" in opts, name
    assert {"pretrain", "finetune", "evaluate", "probe", "identity-check", "dilution", "data-to-text",
            "construct thm1", "construct thm2", "construct capacity"} <= set(seen)


def test_old_spellings_still_run_with_one_warning_line(tmp_path):
    micro = ["--preset", "micro", "--num-digits", "4", "--prompt-len", "2", "--steps", "2", "--batch-size", "8",
             "--eval-every", "1"]
    r = runner.invoke(app, ["pretrain", "--task", "add1", "--out", str(tmp_path / "b"), *micro, "--length", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == ("warning: --length is deprecated; use --seq-len (the old spelling goes in "
                                        "the next release)")
    assert json.loads(r.stdout)["steps"] == 2
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["task_spec"]["length"] == 4
    r = runner.invoke(app, ["finetune", str(tmp_path / "b"), "--method", "prompt", "--task", "add1",
                            "--out", str(tmp_path / "hp"), "--length", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert [l for l in r.stderr.splitlines() if l.startswith("warning:")] == [
        "warning: --length is deprecated; use --prefix-len (the old spelling goes in the next release)"]
    assert len(json.loads(r.stdout)["search"]["tokens"]) == 2
    r = runner.invoke(app, ["finetune", str(tmp_path / "b"), "--method", "prompt", "--task", "add1",
                            "--out", str(tmp_path / "hp1"), "--prefix-len", "1", "--json"])
    assert r.exit_code == 0 and "warning" not in r.stderr and len(json.loads(r.stdout)["search"]["tokens"]) == 1


def test_bad_scale_is_one_error_line_in_either_spelling(tmp_path):
    r = runner.invoke(app, ["reproduce", "--scale", "huge", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and r.stderr.splitlines() == ["error: unknown scale 'huge'; use quick (default), paper or micro"]
    r = runner.invoke(app, ["reproduce", "--preset", "huge", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        "warning: --preset is deprecated; use --scale (the old spelling goes in the next release)",
        "error: unknown scale 'huge'; use quick (default), paper or micro"]
    assert not (tmp_path / "s").exists()


def test_dilution_json_flag_prints_and_json_file_writes(tmp_path):
    r = runner.invoke(app, ["dilution", "--model", "tiny", "--lengths", "8,16", "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert printed["lengths"] == [8, 16]
    j = tmp_path / "d.json"
    r = runner.invoke(app, ["dilution", "--model", "tiny", "--lengths", "8,16", "--json", str(j)])  # the old spelling
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0].startswith("warning: --json PATH is deprecated; use --json-file PATH")
    written = json.loads(j.read_text())
    assert written["lengths"] == printed["lengths"] and written["layers"] == printed["layers"]


def test_make_demo_runs_the_quick_scale(monkeypatch, tmp_path):
    """`make demo` is `prefixlab demo`: the reproduce command at scale quick (stopped before any work)."""
    import study.reproduce
    from prefixlab_common.errors import UserError
    seen = {}

    def stop(out, scale, *args, **kwargs):
        seen.update(out=out, scale=scale)
        raise UserError("stopped by the test")

    monkeypatch.setattr(study.reproduce, "reproduce", stop)
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--workers", "1"])
    assert r.exit_code == 2 and r.stderr.splitlines()[-1] == "error: stopped by the test", r.output
    assert seen == {"out": tmp_path / "d", "scale": "quick"}


def test_the_old_command_name_runs_the_new_command_with_one_notice():
    new = runner.invoke(app, ["identity-check", "--model", "tiny", "--json"])
    old = runner.invoke(app, ["llama-check", "--model", "tiny", "--json"])
    assert new.exit_code == old.exit_code == 0, old.output
    assert old.stderr.splitlines() == ["note: `llama-check` is now `identity-check` (it checks the identities on any "
                                       "supported model); the old name goes in the next release"]
    assert new.stderr == ""
    assert json.loads(old.stdout)["passed"] == json.loads(new.stdout)["passed"] is True
    assert "llama-check" not in runner.invoke(app, ["-h"]).output  # the help lists one name
