"""The CLI explains itself: -h and --help everywhere, --version, an example in every command's and
group's help (one that parses), help text and a default on every option (a computed one in words,
never "—"), readable metavars (no <str>, no <bool>
on a flag, no {base}), `methods` printing values, tables that never cut a number, and progress
lines on stderr while a long command runs in a pipe."""
import io
import re
import shlex
import time
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

import cli
from cli import Heartbeat, ProgressBar, app, print_table, renamed_args

runner = CliRunner()
ROOT = typer.main.get_command(app)


def _commands(group, path=()):
    """(command path, click command) for every command and subcommand, groups included."""
    yield path, group
    for name, cmd in group.commands.items() if hasattr(group, "commands") else ():
        yield from _commands(cmd, path + (name,))


COMMANDS = list(_commands(ROOT))
LEAVES = [(p, c) for p, c in COMMANDS if not hasattr(c, "commands")]


def _ids(items):
    return [" ".join(p) or "prefixlab" for p, _ in items]


def _params(path, cmd):
    """The command's parameters as its help shows them (finetune's registry options included)."""
    ctx = cmd.make_context(path[-1] if path else "prefixlab", [], resilient_parsing=True)
    return cmd.get_params(ctx), ctx


def test_the_walk_sees_every_command_and_the_registry_options():
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"tasks", "methods", "pretrain", "finetune", "evaluate", "probe", "identity-check", "dilution",
            "data-to-text", "reparam-sim", "report", "reproduce", "demo", "construct thm1", "construct thm2",
            "construct capacity"} <= names
    finetune = dict(LEAVES)[("finetune",)]
    params, _ = _params(("finetune",), finetune)
    opts = {o for p in params for o in p.opts}
    from tuning.registry import METHODS
    assert {o.flag for cls in METHODS.values() for o in cls.options} <= opts


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=_ids(COMMANDS))
def test_every_option_has_help_a_default_and_a_readable_metavar(path, cmd):
    params, ctx = _params(path, cmd)
    problems = []
    for p in params:
        name = "/".join(p.opts)
        if not (p.help or "").strip():
            problems.append(f"{name}: no help text")
        shown = p.display_type_rich(ctx) if hasattr(p, "display_type_rich") else p.metavar
        if getattr(p, "is_flag", False):
            if shown:
                problems.append(f"{name}: a flag shows a value placeholder {shown!r}")
            continue
        if shown and ("<" in shown or "{" in shown or shown != shown.upper()):
            problems.append(f"{name}: metavar {shown!r} (want e.g. TASK, DIR, N)")
        if p.param_type_name == "option" and not p.required and p.default is None and not p.multiple:
            method_option = getattr(p, "rich_help_panel", None) == "Method options"
            # typer shows no default for None: the help must state it, as a [default: ...] tag like
            # typer's own (cli.dflt), or for a registry option in its "Default: <method> <value>" part
            if not method_option and "\\[default:" not in (p.help or ""):
                problems.append(f"{name}: its default is computed, and the help has no [default: ...] tag saying what")
            if method_option and ". Default: " not in (p.help or ""):
                problems.append(f"{name}: a method option whose help does not say its default")
    assert not problems, f"{' '.join(path)}: " + "; ".join(problems)


def test_the_checks_above_can_fail():
    """An option as typer makes it by default fails each check."""
    bad = typer.Typer()

    @bad.command()
    def f(out: str = typer.Option(None), flag: bool = typer.Option(False)):
        pass

    cmd = typer.main.get_command(bad)
    params, ctx = _params(("f",), cmd)
    out = next(p for p in params if "--out" in p.opts)
    flag = next(p for p in params if "--flag" in p.opts)
    assert not out.help and out.display_type_rich(ctx) == "<str>"
    assert flag.display_type_rich(ctx) == "<bool>"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=_ids(COMMANDS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_h_and_help_on_every_command(path, cmd, flag):
    r = runner.invoke(app, [*path, flag], env={"COLUMNS": "100"}, prog_name="prefixlab")
    assert r.exit_code == 0, r.output
    usage = next(l for l in r.output.splitlines() if "Usage:" in l)
    assert f"prefixlab {' '.join(path)}".rstrip() in usage
    assert "{" not in usage and "<" not in usage, usage  # BASE, RUN..., not {base}
    assert "<bool>" not in r.output and "<str>" not in r.output and "<int>" not in r.output


def test_version_is_the_installed_package_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"prefixlab {version('prefixlab')}"


def _examples(help_text: str, path) -> list[list[str]]:
    """The example command lines of a help text (a trailing backslash continues a line)."""
    text = re.sub(r"\\\n\s*", " ", help_text)
    lines = [re.sub(r"^([A-Z_]+=\S+\s+)*", "", l.strip()) for l in text.splitlines()]  # VAR=value prefixes
    return [shlex.split(l)[1:] for l in lines if l.startswith(f"prefixlab {' '.join(path)}")]


def _parse(args: list[str]):
    """Parse a command line as the app would, without running it: (leaf command, its context)."""
    cmd, name, ctx, rest = ROOT, "prefixlab", None, list(args)
    while True:
        ctx = cmd.make_context(name, rest, parent=ctx)
        if not hasattr(cmd, "commands"):
            return cmd, ctx
        name, cmd, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=_ids(COMMANDS))
def test_every_command_and_group_has_an_example_that_parses(path, cmd):
    """A command's example runs that command; a group's (the app, `construct`) one of its commands."""
    assert "Example" in (cmd.help or ""), f"{' '.join(path) or 'prefixlab'}: no example in its help"
    examples = _examples(cmd.help, path)
    assert examples, f"{' '.join(path)}: its example names no `prefixlab {' '.join(path)} ...` line"
    within = [c for p, c in LEAVES if p[:len(path)] == path]
    for args in examples:
        leaf, ctx = _parse(args)
        warnings = []
        renamed_args(leaf.name, args[len(ctx.command_path.split()) - 1:], warnings.append)
        assert not warnings, f"{args}: the example uses an old spelling: {warnings}"
        assert leaf is cmd if not hasattr(cmd, "commands") else any(leaf is c for c in within), args


def test_examples_use_the_studys_prefix_recipe():
    """A prefix on add1 stalls from --init normal (docs/methods.md); the study and the examples use slot."""
    lines = [a for a in _examples(dict(LEAVES)[("finetune",)].help, ("finetune",)) if "prefix" in a]
    assert lines and all("--init" in a and a[a.index("--init") + 1] == "slot" for a in lines)


def test_help_renders_examples_one_per_line():
    r = runner.invoke(app, ["identity-check", "-h"], env={"COLUMNS": "120"})
    lines = [l.strip() for l in r.output.splitlines()]
    assert "prefixlab identity-check --model tiny" in lines


def test_methods_prints_values_not_reprs():
    r = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert not re.search(r"\bNone\b", r.output) and "('" not in r.output and "'zero'" not in r.output
    assert "o, mlp_in, mlp_out" in r.output
    help_text = runner.invoke(app, ["finetune", "-h"], env={"COLUMNS": "250"}).output
    assert not re.search(r"\bNone\b", help_text) and "('" not in help_text
    assert cli.show(None) == "—" and cli.show(("o", "mlp_in")) == "o, mlp_in" and cli.show(0.01) == "0.01"


def test_no_method_option_shows_a_dash_for_its_default():
    """A default the method computes (LoRA's alpha, the deep-share width) is said in words, not "—"."""
    from tuning.registry import METHODS
    for cls in METHODS.values():
        for o in cls.options:
            assert cli.shown_default(o) not in ("—", "", "None"), f"{cls.name} {o.flag}: declare a default_text"
    lora = {o.name: o for o in METHODS["lora"].options}
    prefix = {o.name: o for o in METHODS["prefix"].options}
    assert cli.shown_default(lora["alpha"]) == "r (scale 1)"
    assert cli.shown_default(prefix["hidden"]) == "2·d_model" and cli.shown_default(prefix["mlp"]) == "shared"
    assert cli.shown_default(prefix["share"]) == "simple"  # a declared value is shown as itself
    methods = runner.invoke(app, ["methods"], env={"COLUMNS": "250"}).output
    help_text = runner.invoke(app, ["finetune", "-h"], env={"COLUMNS": "250"}).output
    assert "—" not in methods and "—" not in help_text
    assert "--alpha: r (scale 1)" in methods and "lora r (scale 1)" in help_text
    assert "(default" not in help_text.split("Method options")[1]  # the default is said once, after "Default:"


def test_the_dash_check_can_fail():
    from tuning.options import Option
    assert cli.shown_default(Option("alpha", float, None, "LoRA alpha", "[P] E4")) == "—"


def test_narrow_tables_switch_to_one_value_per_line(monkeypatch):
    header = ["layer", "prefix mass", "sink base", "sink w/ prefix", "rescale err", "bias resid (rel)",
              "renorm drift", "JS (nats)", "exact?", "ok"]
    row = ["0", "0.0297", "0.0541", "0.0515", "3.44e-06", "2.02e-06", "3.52e-06", "2.96e-13", "yes", "PASS"]
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    print_table(header, [row], title="tiny", file=out)
    text = out.getvalue()
    assert "…" not in text
    for h, v in zip(header[1:], row[1:]):
        assert re.search(rf"^\s+{re.escape(h)}\s+{re.escape(v)}$", text, re.M), (h, text)
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    print_table(header, [row], title="tiny", file=out)
    assert "┃ prefix mass" in out.getvalue() and "0.0297" in out.getvalue()


def test_llama_check_piped_at_80_columns_cuts_no_number():
    r = runner.invoke(app, ["identity-check", "--model", "tiny"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    assert re.search(r"prefix mass\s+\d\.\d{4}$", r.stdout, re.M), r.stdout
    assert "{" not in r.stdout  # the tolerance as values, not a dict repr


def test_progress_in_a_pipe_prints_between_evaluations():
    out = io.StringIO()
    with ProgressBar("pretrain add1", every=0.05, file=out) as prog:
        prog(3, 100, {"loss": 0.5})
        time.sleep(0.3)
        prog(4, 100, {"loss": 0.4, "eval": True})
    lines = out.getvalue().splitlines()
    assert any(l.startswith("[pretrain add1] step 3/100") and "so far" in l for l in lines), lines
    assert any(l.startswith("[pretrain add1] step 4/100 loss 0.4000") for l in lines), lines
    n = len(lines)
    time.sleep(0.2)
    assert len(out.getvalue().splitlines()) == n  # silent once the work is done


def test_heartbeat_names_the_step_that_runs_long():
    out = io.StringIO()
    with Heartbeat("identity-check", every=0.05, file=out) as hb:
        hb.say("loading smollm2")
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "loading smollm2"
    assert any(l.startswith("[identity-check] still loading smollm2 (") for l in lines[1:]), lines


def test_probe_help_lists_the_registered_probes():
    from probes.registry import PROBES
    assert cli.PROBE_NAMES == ", ".join(PROBES)
    r = runner.invoke(app, ["probe", "-h"], env={"COLUMNS": "250"})
    row = next(l for l in r.output.splitlines() if re.search(r"--probe\s+LIST", l))
    assert cli.PROBE_NAMES in row and "hierarchy" not in row


def test_out_is_a_directory_and_one_html_page_is_html():
    """--out names a directory on every command; a single HTML page is --html FILE."""
    seen_out, seen_html = [], []
    for path, cmd in COMMANDS:
        params, ctx = _params(path, cmd)
        for p in params:
            if "--out" in p.opts:
                assert p.metavar == "DIR", f"{' '.join(path)}: --out {p.metavar}"
                seen_out.append(" ".join(path))
            if "--html" in p.opts:
                assert p.metavar == "FILE", f"{' '.join(path)}: --html {p.metavar}"
                seen_html.append(" ".join(path))
            assert "--fig" not in p.opts
    assert {"pretrain", "finetune", "probe", "reproduce", "demo"} <= set(seen_out)
    assert {"report", "dilution", "identity-check"} == set(seen_html)
    for command, old in (("report", "--out"), ("dilution", "--out"), ("identity-check", "--fig")):
        warnings = []
        assert renamed_args(command, [old, "page.html"], warnings.append) == ["--html", "page.html"]
        assert len(warnings) == 1 and "use --html" in warnings[0]
