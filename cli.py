"""prefixlab: one typer app, a command per step of the study.

Each command parses its options, calls one library function and prints. Heavy imports (torch,
TransformerLens) happen inside the commands, so `prefixlab --help` stays fast. Every mistake a
user can make ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

# -h is --help on the app and on every command and subcommand (click passes it down the contexts)
CONTEXT = {"help_option_names": ["-h", "--help"]}


class _Readable:
    """Help that reads as the docs write it: a flag shows no value placeholder (typer shows <bool>),
    and the usage line names the arguments by their metavar (BASE, RUN...) rather than {base}."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
            elif p.param_type_name == "argument" and p.metavar:  # its name column shows the metavar
                p.display_type_rich = lambda ctx=None: None
        return params

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name != "argument":
                continue
            name = p.metavar or p.name.upper()
            name += "..." if p.nargs != 1 and not name.endswith("...") else ""
            pieces.append(name if p.required else f"[{name}]")
        return pieces + ([self.subcommand_metavar] if hasattr(self, "subcommand_metavar") else [])


# Renamed commands: the old name still runs the new command, with a one-line notice on stderr.
RENAMED_COMMANDS = {"llama-check": "identity-check"}


class _Group(_Readable, typer.core.TyperGroup):
    def get_command(self, ctx, name):
        if name in RENAMED_COMMANDS and name not in self.commands:
            typer.echo(f"note: `{name}` is now `{RENAMED_COMMANDS[name]}` (it checks the identities on any "
                       f"supported model); the old name goes in the next release", err=True)
            name = RENAMED_COMMANDS[name]
        return super().get_command(ctx, name)


APP_HELP = """What can context-based fine-tuning do, what can it not do, and why?

Example (the whole study's table in about 15 s of one core, at a size whose numbers mean nothing):

prefixlab reproduce --scale micro --out runs/micro
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  context_settings=CONTEXT, help=APP_HELP)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            typer.echo(f"prefixlab {version('prefixlab')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("prefixlab (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the installed version and exit")):
    """What can context-based fine-tuning do, what can it not do, and why?"""


def _user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from prefixlab_common.errors import UserError
        from toy_models.lock import STORAGE_ERRNOS
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except OSError as e:  # a full, read-only or forbidden output: the run store left it resumable
            if e.errno not in STORAGE_ERRNOS:
                raise
            typer.echo(f"error: {_storage_error(e)}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("error: interrupted; complete runs are kept, and an interrupted run continues with "
                       "--resume (a study: rerun the same reproduce command)", err=True)
            raise typer.Exit(130)

    return wrapper


def _storage_error(e: OSError) -> str:
    import errno
    where = e.filename or "the output"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left to write {where}: free some space, then continue with --resume (a study: "
                "rerun the same command); complete runs are untouched")
    return f"cannot write {where} ({e.strerror}): give an output directory you can write to"


def _note(line: str) -> None:
    """What the run store healed or took over, one line on stderr."""
    print(f"note: {line}", file=sys.stderr, flush=True)


# Renamed spellings (one name, one meaning), kept working with a one-line warning on stderr: the
# study's size is --scale ("preset" is a model size), P is -P/--prefix-len everywhere, L is --seq-len,
# --json is a flag that prints JSON on every command, --out is always a directory, and one HTML page
# is --html FILE.
RENAMED = {
    "reproduce": {"--preset": "--scale"},
    "data-to-text": {"--preset": "--scale"},
    "finetune": {"--length": "--prefix-len"},
    "pretrain": {"--length": "--seq-len"},
    # --out is a directory everywhere; a single HTML page is --html FILE
    "report": {"--out": "--html"},
    "dilution": {"--out": "--html"},
    "identity-check": {"--fig": "--html"},
}
JSON_FILE = ("dilution", "data-to-text")  # --json PATH wrote a file there: now --json-file PATH


def renamed_args(command_name: str, args: list[str], warn) -> list[str]:
    """`args` with this command's old spellings replaced by the new ones, warning once per spelling."""
    renames = RENAMED.get(command_name, {})
    out, i = [], 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if flag in renames:
            warn(f"warning: {flag} is deprecated; use {renames[flag]} (the old spelling goes in the next release)")
            out.append(renames[flag] + eq + value)
        elif (flag == "--json" and command_name in JSON_FILE
              and (eq or (i + 1 < len(args) and not args[i + 1].startswith("-")))):
            warn("warning: --json PATH is deprecated; use --json-file PATH (--json alone prints the JSON)")
            out.append("--json-file" + eq + value)
        else:
            out.append(a)
        i += 1
    return out


class _Renamed(_Readable, typer.core.TyperCommand):
    """A command that still accepts its renamed options' old spellings (RENAMED)."""

    def parse_args(self, ctx, args):
        warn = lambda msg: typer.echo(msg, err=True)  # noqa: E731
        return super().parse_args(ctx, renamed_args(self.name, list(args), warn))


def command(*args, **kwargs):
    def deco(fn):
        return app.command(*args, cls=kwargs.pop("cls", _Renamed), **kwargs)(_user_errors(fn))
    return deco


def _fail(msg: str):
    from prefixlab_common.errors import UserError
    raise UserError(msg)


# the options several commands share, with one help text each
SEED_HELP = "seed of init, data and dropout"
STEPS_HELP = "training steps"
OVERWRITE_HELP = "replace an existing output (default: refuse, and write nothing)"
RESUME_HELP = "continue an interrupted run from its last checkpoint"
JSON_HELP = "print the result as JSON on stdout instead of a table"
BATCH_HELP = "training batch size"
WARMUP_HELP = "learning-rate warmup steps"
EVAL_EVERY_HELP = "evaluate (and checkpoint) every N steps"
SCHEDULE_HELP = "learning-rate schedule: cosine, constant, or decay (constant, then linear over the last 20 %)"
HTML_HELP = "write one self-contained HTML page here"
PROBE_NAMES = "invariance, bias, clusters, drift"  # probes/registry.py's PROBES (a test keeps them equal)


def dflt(value) -> str:
    """A default that typer cannot show (an option whose default is computed), as typer shows its own."""
    return f"\\[default: {value}]"  # escaped: rich markup would read [default: ...] as a style


METHOD_DEFAULT = dflt("the method's (`prefixlab methods`)")
OWN_TASK_DEFAULT = dflt("each run's own")
CONSTRUCTION_DEFAULT = dflt("the construction's")
SCALE_DEFAULT = dflt("the scale's")
NO_FILE = dflt("none written")


def show(value) -> str:
    """A default as the help and `prefixlab methods` print it: a value, not a Python repr."""
    if value is None:
        return "—"
    if isinstance(value, (tuple, list)):
        return ", ".join(map(show, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown_default(option) -> str:
    """A method option's default as the help and `prefixlab methods` print it: its words where the
    method computes it (default_text, e.g. LoRA's alpha "r (scale 1)"), else its value."""
    return option.default_text if option.default_text is not None else show(option.default)


# a computed paper-vs-lab verdict (None: too little data for one), as the commands print it
VERDICT_WORD = {True: "reproduced", False: "differs", None: "no verdict"}
DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda or mps"
_PRECISIONS = "fp32, bf16 (autocast; refused without native bf16) or auto (bf16 where native)"
PRECISION_HELP = (f"training precision: {_PRECISIONS} "
                  + dflt("bf16 on a CUDA GPU that has it, fp32 on a CPU (docs/benchmarks.md)"))
REPRODUCE_PRECISION_HELP = (
    f"training precision of every toy stage: {_PRECISIONS}; runs of each precision are cached separately "
    + dflt("per stage: bf16 on a CUDA GPU that has it; on a CPU with native bf16, bf16 only where measured "
           "faster (the quick E4; docs/benchmarks.md); else fp32"))


def _device(name: str):
    """Validate --device before anything is written (a device torch cannot use: exit 2)."""
    from toy_models.training import resolve_device
    return resolve_device(name)


def _precision(name: str | None, dev) -> str:
    """Validate --precision on the device before anything is written (bf16 without native bf16,
    or an unknown name: exit 2)."""
    from toy_models.precision import resolve_precision
    return resolve_precision(name, dev)


def _ints(text: Optional[str], what: str) -> Optional[List[int]]:
    if text is None or text == "":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")


HEARTBEAT_S = 15.0  # the longest a running command stays silent on stderr


def _elapsed(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Heartbeat:
    """Progress lines on stderr for a command that reports in steps of its own (say(msg): loading,
    each forward...): each message at once, and while one step runs long, a line every `every`
    seconds naming it and the time so far, so that no command is silent for long."""

    def __init__(self, label: str, every: float = HEARTBEAT_S, file=None):
        import threading
        self.label, self.every, self.file = label, every, file
        self.last = "starting"
        self.t0 = self.said = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            if time.monotonic() - self.said >= self.every:
                self.line(self.heartbeat())

    def heartbeat(self) -> str:
        return f"[{self.label}] still {self.last} ({_elapsed(time.monotonic() - self.t0)} so far)"

    def line(self, text: str) -> None:
        print(text, file=self.file or sys.stderr, flush=True)
        self.said = time.monotonic()

    def say(self, msg: str) -> None:
        self.last = msg
        self.line(msg)


class ProgressBar(Heartbeat):
    """A rich progress bar on a terminal. Elsewhere (a pipe, a log file) plain lines on stderr: one at
    each evaluation, and one at least every HEARTBEAT_S seconds in between (the step reached, the
    time so far). An instance is a `prefixlab_common.progress.Progress` callback."""

    def __init__(self, label: str, every: float = HEARTBEAT_S, file=None, start: str = "starting"):
        super().__init__(label, every, file)
        self.start = start
        self.tty = (file or sys.stderr).isatty()
        self.bar = None
        self.step = None

    def __enter__(self):
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=None, info="")
            return self
        return super().__enter__()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        else:
            super().__exit__(*exc)

    def heartbeat(self) -> str:
        where = f"step {self.step[0]}/{self.step[1]}" if self.step else self.start
        return f"[{self.label}] {where} ({_elapsed(time.monotonic() - self.t0)} so far)"

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg, markup=False, highlight=False)
        else:
            super().say(msg)

    def __call__(self, step: int, total: int, info: dict) -> None:
        text = " ".join(f"{k} {v:.4f}" for k, v in info.items() if isinstance(v, float))
        self.step = (step, total)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, info=text)
        elif info.get("eval"):
            self.line(f"[{self.label}] step {step}/{total} {text} ({_elapsed(time.monotonic() - self.t0)})")


def print_table(header, rows, title: str | None = None, file=None) -> None:
    """A table of values on stdout: a rich table where it fits the console (piped: COLUMNS, else 80
    columns), else one value per line, so that no number is ever cut to "0.02…"."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    console = Console(file=file)
    table = Table(*map(escape, header), title=escape(title) if title else None)
    for row in rows:
        table.add_row(*(escape(str(v)) for v in row))
    if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:
        console.print(table)
        return
    out = file or sys.stdout
    if title:
        print(title, file=out)
    for row in rows:
        print(f"{header[0]} {row[0]}" if str(row[0]) else header[0], file=out)
        width = max(len(h) for h in header[1:])
        for h, v in zip(header[1:], row[1:]):
            print(f"  {h:<{width}}  {v}", file=out)


def _train_opts(steps, lr, batch_size, seed, schedule, warmup, eval_every) -> dict:
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "schedule": schedule,
            "warmup": warmup, "eval_every": eval_every}


@command()
def tasks():
    """List the tasks, each with a one-line description and an example.

    Example:

    prefixlab tasks
    """
    from toy_models.tasks import TASKS, example, task_names
    from rich.console import Console
    from rich.table import Table
    table = Table("task", "description", "example X -> Y")
    for col in table.columns:  # words wrap; a word longer than its column folds instead of being cut
        col.overflow = "fold"
    for name in task_names():
        desc = TASKS[name].description if name in TASKS else "each sample one of ascending, descending, add1, add2"
        x, y = example(name)
        table.add_row(name, desc, f"{' '.join(map(str, x))} -> {' '.join(map(str, y))}")
    Console().print(table)
    print("Compose tasks with '+', e.g. less_than+add1 (apply less_than, then add1).")


@command()
def methods():
    """List the tuning methods (the registry), each with its options and where their defaults came from.

    Example:

    prefixlab methods
    """
    from rich.console import Console
    from rich.table import Table
    from tuning.registry import METHODS
    table = Table("method", "what it trains", "options (default; source)")
    for col in table.columns:
        col.overflow = "fold"
    for name, cls in METHODS.items():
        opts = "\n".join(f"{o.flag}{' ' + o.short if o.short else ''}: {shown_default(o)}; {o.source}"
                         for o in cls.options)
        table.add_row(name, cls.summary, opts or "(none)")
    Console().print(table)


@command()
def pretrain(task: str = typer.Option("mix4", metavar="TASK", help="task to pretrain on (see `prefixlab tasks`)"),
             preset: str = typer.Option("default", metavar="SIZE", help="model size: micro, default, petrov-e1, petrov-e2, petrov-e3, petrov-large"),
             out: Path = typer.Option(..., metavar="DIR", help="run directory to write"),
             prompt_len: int = typer.Option(1, metavar="N", help="prompt slots reserved before the content (the most P a method can use)"),
             slots: Optional[str] = typer.Option(None, metavar="PROTOCOL", help=f"slot protocol: token (SLOT tokens fill the slots, as [P]) or empty {dflt('token')}"),
             seq_len: int = typer.Option(10, "--seq-len", metavar="L", help="sequence length L of X and Y"),
             num_digits: int = typer.Option(8, metavar="N", help="X digits are 0..N-1"),
             steps: Optional[int] = typer.Option(None, metavar="N", help=f"{STEPS_HELP} {dflt('3000')}"),
             lr: Optional[float] = typer.Option(None, metavar="LR", help=f"peak learning rate {dflt('3e-3')}"),
             batch_size: Optional[int] = typer.Option(None, metavar="N", help=f"{BATCH_HELP} {dflt('64')}"),
             schedule: Optional[str] = typer.Option(None, metavar="NAME", help=f"{SCHEDULE_HELP} {dflt('cosine')}"),
             warmup: Optional[int] = typer.Option(None, metavar="N", help=f"{WARMUP_HELP} {dflt('100')}"),
             eval_every: Optional[int] = typer.Option(None, metavar="N", help=f"{EVAL_EVERY_HELP} {dflt('250')}"),
             seed: int = typer.Option(0, metavar="INT", help=SEED_HELP),
             overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
             resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
             device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP),
             precision: Optional[str] = typer.Option(None, metavar="NAME", help=PRECISION_HELP),
             json_out: bool = typer.Option(False, "--json", help="print the final metrics as JSON")):
    """Pretrain a toy model on a task and write a base run.

    Example (the base of the README's tour, on the four tasks: about 85 s of one core, ~89 % exact with y1
    given, of a 94 % ceiling):

    prefixlab pretrain --task mix4 --out runs/mix4
    """
    from toy_models.pretraining import PRETRAIN_DEFAULTS, pretrain as _pretrain
    dev = _device(device)
    _precision(precision, dev)
    from toy_models.tasks import TaskSpec
    from toy_models.training import TrainConfig
    spec = TaskSpec(length=seq_len, num_digits=num_digits, prompt_len=prompt_len)
    opts = {k: v for k, v in _train_opts(steps, lr, batch_size, seed, schedule, warmup, eval_every).items()
            if v is not None}
    train = TrainConfig(**{**PRETRAIN_DEFAULTS, **opts})
    with ProgressBar(f"pretrain {task}") as prog:
        m = _pretrain(out, task, preset, spec, train, overwrite=overwrite, resume=resume, progress=prog,
                      slots=slots, device=dev, on_note=_note, precision=precision)
    if json_out:
        print(json.dumps(m, indent=2))
    else:
        first = " (y1 given)" if m.get("provide_first") else ""
        print(f"{out}: {task} exact accuracy {m['exact_acc']:.2%}{first}, token accuracy {m['token_acc']:.2%} "
              f"after {m['steps']} steps ({m['timing']['train_seconds']:.0f} s)")


class _MethodOptions(_Renamed):
    """`finetune`'s method options are the method registry's declarations (tuning/registry.py):
    one flag per option name, shared by the methods that declare it. They are read when the
    command parses or shows its help (that imports torch; `prefixlab --help` does not)."""

    def get_params(self, ctx):
        help_option = self.get_help_option(ctx)
        own = [p for p in super().get_params(ctx) if p is not help_option]
        return own + [*_method_params()] + ([help_option] if help_option is not None else [])

    def invoke(self, ctx):
        names = {p.name for p in _method_params()}
        ctx.meta["method_opts"] = {k: ctx.params.pop(k) for k in list(ctx.params) if k in names}
        return super().invoke(ctx)


@functools.lru_cache(maxsize=None)
def _method_params() -> tuple:
    from rich.markup import escape
    from typer.main import _get_param  # typer's own option builder (its Option class needs it)
    from typer.models import ParamMeta
    from tuning.registry import options_by_flag
    params = []
    for name, users in options_by_flag().items():
        first = users[0][1]
        helps = list(dict.fromkeys(o.help for _, o in users))
        defaults = {}
        for m, o in users:  # methods that share a default and its source are named together
            defaults.setdefault((shown_default(o), o.source), []).append(m)
        text = escape("; ".join(helps) + ". Default: " + "; ".join(
            f"{'/'.join(ms)} {d} ({src})" for (d, src), ms in defaults.items()))
        decls = [first.flag] + ([first.short] if first.short else [])
        kind = str if first.many else first.type
        metavar = "LIST" if first.many else {int: "N", float: "X"}.get(first.type, "NAME")
        params.append(_get_param(ParamMeta(name=name, annotation=Optional[kind],
                                           default=typer.Option(None, *decls, help=text, metavar=metavar,
                                                                rich_help_panel="Method options"))))
    return tuple(params)


def _method_opts(ctx: typer.Context) -> dict:
    """The method options given on the command line, parsed by their declarations."""
    from tuning.registry import options_by_flag
    declared = {name: users[0][1] for name, users in options_by_flag().items()}
    return {k: declared[k].parse(v) if declared[k].many else v
            for k, v in ctx.meta.get("method_opts", {}).items() if v is not None}


@app.command(cls=_MethodOptions)
@_user_errors
def finetune(ctx: typer.Context,
             base: Path = typer.Argument(..., metavar="BASE", show_default=False, help="base (pretrained) run directory"),
             method: str = typer.Option(..., metavar="METHOD", help="the method (`prefixlab methods` lists them and their options)"),
             task: str = typer.Option(..., metavar="TASK[,TASK]", help="task to tune for; several (a,b,c): one run per task under --out"),
             out: Path = typer.Option(..., metavar="DIR", help="tuned run directory to write (with --seeds: seed0/, seed1/... in it)"),
             steps: Optional[int] = typer.Option(None, metavar="N", help=f"{STEPS_HELP} {dflt('1000')}"),
             lr: Optional[float] = typer.Option(None, metavar="LR", help=f"learning rate {METHOD_DEFAULT}"),
             batch_size: Optional[int] = typer.Option(None, metavar="N", help=f"{BATCH_HELP} {dflt('64')}"),
             schedule: Optional[str] = typer.Option(None, metavar="NAME", help=f"{SCHEDULE_HELP} {METHOD_DEFAULT}"),
             warmup: Optional[int] = typer.Option(None, metavar="N", help=f"{WARMUP_HELP} {METHOD_DEFAULT}"),
             eval_every: Optional[int] = typer.Option(None, metavar="N", help=f"{EVAL_EVERY_HELP} {dflt('100')}"),
             seed: int = typer.Option(0, metavar="INT", help=SEED_HELP),
             seeds: Optional[str] = typer.Option(None, metavar="LIST", help=f"repeat for these seeds, e.g. 0,1,2 (one run each under --out); reports mean ± std {dflt('one run at --seed')}"),
             fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="train several seeds/tasks in one batched forward, or one by one"),
             overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
             resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
             device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP),
             precision: Optional[str] = typer.Option(None, metavar="NAME", help=PRECISION_HELP),
             json_out: bool = typer.Option(False, "--json", help="print the final metrics as JSON")):
    """Tune a method on a task over a frozen base run and write a tuned run.

    The method options below come from the method registry; each applies to the methods named in its help.

    Example (the study's prefix recipe, --init slot, on add1 over the base of `prefixlab pretrain -h`: about 30 s
    of one core, 100 % exact):

    prefixlab finetune runs/mix4 --method prefix -P 1 --init slot --task add1 --out runs/p-add1
    """
    from tuning.pipeline import finetune as _finetune
    from tuning.registry import check_method
    from tuning.sweep import sweep
    dev = _device(device)
    _precision(precision, dev)
    task_list = [t.strip() for t in task.split(",") if t.strip()]
    opts = _method_opts(ctx)
    check_method(method, opts)  # the name and its options, before anything is written
    train = _train_opts(steps, lr, batch_size, seed, schedule, warmup, eval_every)
    seed_list = _ints(seeds, "--seeds")
    if (seed_list or len(task_list) > 1) and resume:
        _fail("--resume applies to one run; with --seeds or several tasks, complete runs are reused "
              "and interrupted ones resumed by `prefixlab reproduce` (rerun with --overwrite to start afresh)")
    with ProgressBar(f"{method} on {task}") as prog:
        if seeds is not None or len(task_list) > 1:
            res = sweep(base, method, task_list, out, seed_list if seeds is not None else None, opts, train,
                        overwrite=overwrite, progress=prog, fuse=fuse, device=dev, precision=precision)
            if json_out:
                print(json.dumps(res[task_list[0]] if len(task_list) == 1 else res, indent=2))
                return
            for t, r in res.items():
                acc = (f"{r['exact_acc_mean']:.2%} ± {r['exact_acc_std']:.2%} over seeds {seed_list}"
                       if seed_list else f"{r['exact_acc']:.2%}")
                print(f"{out if len(task_list) == 1 else out / t}: {method} on {t}: exact accuracy {acc}")
            return
        m = _finetune(base, method, task, out, opts, train, overwrite=overwrite, resume=resume, progress=prog,
                      device=dev, on_note=_note, precision=precision)
    if json_out:
        print(json.dumps(m, indent=2))
    else:
        found = f", prompt {m['search']['tokens']} ({m['search']['kind']} search)" if "search" in m else ""
        print(f"{out}: {method} on {task}: exact accuracy {m['exact_acc']:.2%}, token accuracy "
              f"{m['token_acc']:.2%}, {m['n_params']:,} trainable parameters{found}")


@command()
def evaluate(runs: List[Path] = typer.Argument(..., metavar="RUN...", show_default=False, help="base or tuned run directories"),
             task: Optional[List[str]] = typer.Option(None, "--task", "-t", metavar="TASK", show_default=False,
                                                      help=f"a task to evaluate on, repeatable {OWN_TASK_DEFAULT}"),
             n: int = typer.Option(1000, metavar="N", help="size of the fixed test set"),
             device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP),
             json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Evaluate runs on tasks: a cross-task matrix of exact-sequence accuracy.

    Example:

    prefixlab evaluate runs/mix4 runs/p-add1 --task add1 --task add2 --n 200
    """
    from toy_models.pretraining import evaluate_run
    from tuning.pipeline import load_run
    dev = _device(device)
    if n <= 0:
        _fail(f"--n must be positive, got {n}")
    loaded = [load_run(r, dev) for r in runs]
    from toy_models.tasks import resolve_task
    for t in task or []:
        for r in loaded:
            resolve_task(t, r.spec)  # validate every task before any work
    results = {}
    for r in loaded:
        results[str(r.path)] = evaluate_run(r, list(task) if task else [r.config["task"]], n)
    if json_out:
        print(json.dumps(results, indent=2))
        return
    cols = sorted({t for res in results.values() for t in res}, key=lambda t: (task or []).index(t) if task and t in task else 99)
    rows = []
    for r in loaded:
        res = results[str(r.path)]
        kind = r.config["method"]["name"] if r.kind == "finetune" else "base"
        rows.append([str(r.path), kind, *[
            (f"{res[t]['exact_acc']:.1%} ({res[t]['token_acc']:.1%})" + ("*" if res[t]["provide_first"] else ""))
            if t in res else "" for t in cols]])
    print_table(["run", "kind", *cols], rows, title="exact-sequence accuracy (token accuracy)")
    if any(v["provide_first"] for res in results.values() for v in res.values()):
        print("* y1 given: mix4 has no task indicator, so its first output is provided ([P]'s protocol).")


@command()
def probe(runs: List[Path] = typer.Argument(..., metavar="RUN...", show_default=False, help="tuned run directories, all tuned over the same base"),
          probe_: Optional[str] = typer.Option(None, "--probe", metavar="LIST", help=f"probes to run, e.g. invariance,bias, of {PROBE_NAMES} {dflt('all')}"),
          layers: Optional[str] = typer.Option(None, metavar="LIST", help=f"layers, e.g. 0,1 {dflt('all')}"),
          heads: Optional[str] = typer.Option(None, metavar="LIST", help=f"heads, e.g. 0,2 {dflt('all')}"),
          inputs: int = typer.Option(1000, metavar="N", help="number of test inputs"),
          out: Path = typer.Option(..., metavar="DIR", help="directory for probe.json and probe.safetensors"),
          overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
          device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP),
          json_out: bool = typer.Option(False, "--json", help="print probe.json's content on stdout")):
    """Probe tuned runs with the registered probes, and place each run in [P]'s method hierarchy.

    The probes: attention invariance, bias decomposition, clusters and drift (--probe picks some). Invariance always runs: a run's class in the hierarchy (prompting, soft prompting, prefix-tuning, weights, full fine-tuning) uses its layer-0 verdict.

    Example:

    prefixlab probe runs/p-add1 --inputs 200 --out runs/probe
    """
    from probes.compute import run_probes
    dev = _device(device)
    report = run_probes(runs, None if probe_ is None else [p.strip() for p in probe_.split(",") if p.strip()], out,
                        _ints(layers, "--layers"), _ints(heads, "--heads"), inputs, overwrite, device=dev)
    if report.get("device_note"):
        print(report["device_note"], file=sys.stderr)
    if json_out:
        print(json.dumps(report, indent=2))
        return
    rows = [[v["run"], v["identity"], {True: "holds", False: "broken", None: "n/a"}[v["holds"]],
             "" if v["value"] is None else f"{v['value']:.2e}"] for v in report["verdicts"]]
    print_table(["run", "identity", "verdict", "max error"], rows, title="identities (fp32 tolerance 1e-5)")
    for name, entry in report["runs"].items():
        h = entry["hierarchy"]
        print(f"{name}: class in [P]'s method hierarchy: {h['class']} ({h['evidence']})")
    if "clusters" in report:
        c = report["clusters"]
        if c.get("nearest_centroid_acc_with_method") is not None:
            print(f"clusters: nearest-centroid task accuracy {c['nearest_centroid_acc_with_method']:.1%} with the "
                  f"methods, {c['nearest_centroid_acc_without_method']:.1%} without (chance {c['chance']:.1%})")
    print(f"wrote {out}/probe.json and {out}/probe.safetensors")


@command("identity-check")
def identity_check(model: str = typer.Option("tiny", metavar="MODEL", help="tiny, tiny-gqa, tiny-gemma3, smollm2, gemma3 (Gemma 3 270M), or a local HF checkpoint directory (llama, mistral, qwen2, qwen3, gemma3_text)"),
                prefix: str = typer.Option("random", metavar="PREFIX", help="random, train, or a prefix file saved by prefixlab"),
                soft_prompt: Optional[str] = typer.Option(None, "--soft-prompt", metavar="PROMPT", help=f"check a soft prompt instead: random, or a soft-prompt file saved by prefixlab {dflt('none: check --prefix')}"),
                adapter: Optional[Path] = typer.Option(None, metavar="DIR", help=f"a PEFT adapter directory: prefix tuning or prompt tuning (read from adapter_config.json) {dflt('none')}"),
                layers: Optional[str] = typer.Option("0", metavar="LIST", help="layers to check, e.g. 0,1,2, or all"),
                heads: Optional[str] = typer.Option(None, metavar="LIST", help=f"heads to check, e.g. 0,3 {dflt('all')}"),
                prefix_len: int = typer.Option(1, "--prefix-len", "-P", metavar="P", help="prefix slots / soft-prompt length"),
                dtype: str = typer.Option("float32", metavar="DTYPE", help="float32, bfloat16 or float16"),
                text: Optional[str] = typer.Option(None, metavar="TEXT", help=f"text to check on {dflt('the DART sample, docs/papers.md §4')}"),
                seed: int = typer.Option(0, metavar="INT", help="seed of the random prefix or soft prompt"),
                stream: bool = typer.Option(False, "--stream", help="load one decoder layer at a time (checkpoints larger than memory)"),
                html: Optional[Path] = typer.Option(None, "--html", metavar="FILE", help=f"{HTML_HELP}: the table and the Fig. 5 panels of the first layer (+ --dilution) {NO_FILE}"),
                dilution: Optional[str] = typer.Option(None, metavar="LIST", help=f"with --html: also measure prefix dilution at these lengths, e.g. 16,64,256 {dflt('none')}"),
                overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --html file"),
                json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Check the prefix or soft-prompt identities on a LLaMA-family or Gemma 3 model (docs/papers.md §4, Fig. 5).

    The table says per layer its attention (full or sliding window) and how many content queries still see the prefix.

    Examples (the tiny random model: seconds; SmolLM2: about a minute; Gemma 3 270M: about 1.5 minutes):

    prefixlab identity-check --model tiny
    prefixlab identity-check --model smollm2 --soft-prompt random -P 4 \\
      --html check.html
    prefixlab identity-check --model gemma3 --layers all
    """
    fig = html
    from model_checks.check import run_identity_check
    lay = None if layers in (None, "all") else _ints(layers, "--layers")
    if dilution is not None and fig is None:
        _fail("--dilution adds curves to the page: give --html too")
    if fig is not None:
        from reports.llama_figures import check_new_output
        check_new_output(fig, overwrite)
    lengths = None
    if dilution is not None:
        from model_checks.dilution import check_lengths, parse_lengths
        lengths = check_lengths(parse_lengths(dilution), None, prefix_len)
    from contextlib import nullcontext
    with (nullcontext() if json_out else Heartbeat("identity-check")) as hb:  # --json: stderr stays quiet
        say = hb.say if hb is not None else None
        kept = []  # the model the check loaded, reused for --dilution (loaded once)
        res = run_identity_check(model, prefix, str(adapter) if adapter else None, lay, _ints(heads, "--heads"),
                              prefix_len, dtype, text, seed, stream, progress=say, soft_prompt=soft_prompt,
                              on_loaded=kept.append if lengths is not None else None)
        if fig is not None:
            from reports.llama_figures import write_page
            dil = None
            if lengths is not None:
                from model_checks.dilution import dilution_loaded
                from model_checks.models import load_model, resolve_dtype
                loaded = kept[0] if kept else load_model(model, resolve_dtype(dtype), seed=seed)  # stream mode loads here
                dil = dilution_loaded(loaded, prefix, str(adapter) if adapter else None, lengths, "mean", prefix_len, seed,
                                      say=say or (lambda m: None))
            write_page(fig, res, dil)
    if json_out:
        print(json.dumps(res.to_json(), indent=2))
        return
    rows = res.table_rows()
    what = "soft prompt" if res.method == "soft_prompt" else "prefix"
    print_table(rows[0], rows[1:], title=f"{res.model} ({res.model_type}, {res.dtype}), P={res.prefix_len}, {what}: {res.prefix_source}")
    print(f"RoPE position-shift error (same pattern, no {what}, content shifted by P): {res.rope_shift_error:.2e}")
    if res.hierarchy:
        h = res.hierarchy
        print(f"hierarchy: soft prompt as its per-layer prefix reproduces the soft-prompt forward: max |Δ logits| "
              f"{h['logits_max_abs_diff']:.2e} (relative {h['logits_rel_diff']:.2e}), max |Δ final residual| "
              f"{h['resid_final_max_abs_diff']:.2e}")
    tol = ", ".join(f"{k} {show(v)}" for k, v in res.tolerance.items()) if isinstance(res.tolerance, dict) else show(res.tolerance)
    print(f"layer-0 identities {'hold' if res.passed else 'DO NOT hold'} within the {res.dtype} tolerance ({tol})")
    if fig is not None:
        print(f"wrote {fig}")


@command("dilution")
def dilution_cmd(model: str = typer.Option("tiny", metavar="MODEL", help="tiny, tiny-gqa, tiny-gemma3, smollm2, gemma3 (Gemma 3 270M), or a local HF checkpoint directory (llama, mistral, qwen2, qwen3, gemma3_text)"),
                 prefix: str = typer.Option("random", metavar="PREFIX", help="random, train, or a prefix file saved by prefixlab"),
                 adapter: Optional[Path] = typer.Option(None, metavar="DIR", help=f"a PEFT prefix-tuning or prompt-tuning adapter directory {dflt('none')}"),
                 lengths: Optional[str] = typer.Option(None, metavar="LIST", help=f"input lengths, e.g. 16,64,256,1024 {dflt('16..1024 within the context')}"),
                 heads: str = typer.Option("mean", metavar="HOW", help="aggregate heads per layer: mean, max, all (each head drawn), or head indices 0,3"),
                 prefix_len: int = typer.Option(1, "--prefix-len", "-P", metavar="P", help="prefix length P"),
                 dtype: str = typer.Option("float32", metavar="DTYPE", help="float32, bfloat16 or float16"),
                 text: Optional[str] = typer.Option(None, metavar="TEXT", help=f"text to repeat as input {dflt('the shipped DART-style lines')}"),
                 seed: int = typer.Option(0, metavar="INT", help="seed of the random prefix"),
                 json_out: bool = typer.Option(False, "--json", help="print the curves and fits as JSON"),
                 json_path: Optional[Path] = typer.Option(None, "--json-file", metavar="FILE", help=f"write the curves and fits as JSON here {NO_FILE}"),
                 html: Optional[Path] = typer.Option(None, "--html", metavar="FILE", help=f"{HTML_HELP}: dilution, sink, and a layer-0 Fig. 5 check {NO_FILE}"),
                 overwrite: bool = typer.Option(False, "--overwrite", help="replace existing --json-file / --html files"),
                 identities: bool = typer.Option(False, "--identities", help="also the per-layer identity residuals at every length, each layer's input patched to the base forward's (sliding and global layers alike)")):
    """Prefix dilution: attention mass on the prefix and on the sink as the input grows.

    On sliding-window layers (Gemma 3) the table says which share of the queries still sees the prefix.

    Examples (the tiny random model: seconds; SmolLM2: about a minute):

    prefixlab dilution --model tiny --lengths 16,64,256
    prefixlab dilution --model smollm2 --json-file dil.json --html dil.html
    prefixlab dilution --model gemma3 --lengths 64,256,512,1024 --identities --html window.html
    """
    out = html
    from model_checks.dilution import check_lengths, parse_lengths, run_dilution
    from reports.llama_figures import check_new_output
    for path in (json_path, out):
        if path is not None:
            check_new_output(path, overwrite)
    if json_path is not None and out is not None and json_path.resolve() == out.resolve():
        _fail("--json-file and --html name the same file; give two different files")
    wanted = parse_lengths(lengths)
    if wanted is not None:
        check_lengths(wanted, None, prefix_len)
    with Heartbeat("dilution") as hb:
        say = hb.say
        kept = []  # the model dilution loaded, reused for the --html page's layer-0 check (loaded once)
        res = run_dilution(model, prefix, str(adapter) if adapter else None, wanted, heads, prefix_len, dtype, seed, text,
                           progress=say, on_loaded=kept.append, identities=identities)
        if json_path is not None:
            from reports.html import write_report
            write_report(json_path, json.dumps(res.to_json(), indent=1) + "\n")
        if out is not None:
            from model_checks.check import check_loaded
            from model_checks.soft_check import check_soft_loaded
            from reports.llama_figures import write_page
            from model_checks.soft_prompt import adapter_kind
            loaded = kept[0]
            say("layer-0 check of the same prefix for the Fig. 5 panels")
            if adapter is not None and adapter_kind(adapter) == "soft_prompt":
                check = check_soft_loaded(loaded, adapter=str(adapter), layers=[0], seed=seed)
            else:
                check = check_loaded(loaded, prefix, str(adapter) if adapter else None, [0], None, prefix_len, seed=seed)
            write_page(out, check, res)
    if json_out:
        print(json.dumps(res.to_json(), indent=1))
        for path in (json_path, out):
            if path is not None:
                print(f"wrote {path}", file=sys.stderr)
        return
    rows = res.table_rows()
    print_table(rows[0], rows[1:], title=f"{res.model}: prefix dilution, P={res.prefix_len}, prefix {res.prefix_source}, heads {res.heads}")
    print(f"lengths {res.lengths}; alpha = mean prefix mass of the {res.window}; {res.timings['total_s']:.1f} s")
    for path in (json_path, out):
        if path is not None:
            print(f"wrote {path}")


CONSTRUCT_HELP = """[P]'s Theorem 1 and 2 constructions, and the capacity count (docs/papers.md §5).

Example:

prefixlab construct thm1 --text "I love transformers!"
"""
construct_app = typer.Typer(help=CONSTRUCT_HELP, no_args_is_help=True, cls=_Group)
app.add_typer(construct_app, name="construct")


@construct_app.command("thm1", cls=_Renamed)
@_user_errors
def construct_thm1(text: str = typer.Option("I love transformers!", metavar="TEXT", help="the sequence to generate"),
                   beta: Optional[float] = typer.Option(None, metavar="BETA", help=f"inverse temperature {CONSTRUCTION_DEFAULT}"),
                   json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Generate TEXT from one virtual token with the hand-built Theorem-1 transformer.

    Example:

    prefixlab construct thm1 --text "I love transformers!"
    """
    from theory.constructions import thm1_text
    res = thm1_text(text, beta=beta)
    if json_out:
        print(json.dumps(res.to_json(), indent=2))
        return
    d = res.to_json()
    print(f"generated: {d.get('generated')!r}")
    print(f"verdict: {'exact' if d.get('exact') else 'MISMATCH'}")


@construct_app.command("thm2", cls=_Renamed)
@_user_errors
def construct_thm2(map_: Optional[str] = typer.Option(None, "--map", metavar="MAP", help=f"a map [V]->[V], e.g. 1,2,0 (m(0)=1, m(1)=2, m(2)=0) {dflt('random maps')}"),
                   V: int = typer.Option(8, "--V", metavar="V", help="vocabulary size for random maps"),
                   n_maps: int = typer.Option(20, metavar="N", help="random maps to check when --map is not given"),
                   seed: int = typer.Option(0, metavar="INT", help="seed of the random maps"),
                   json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Realise a map with one virtual token (context 2) and check it on every input.

    Example:

    prefixlab construct thm2 --map 1,2,0
    """
    from theory.constructions import parse_map, thm2_check
    mapping = parse_map(map_) if map_ else None
    res = thm2_check(len(mapping) if mapping else V, mapping, n_maps, seed)
    d = res.to_json()
    print(json.dumps(d, indent=2) if json_out else
          f"V={d.get('V')}: {d.get('n_maps')} map(s), success rate {100 * d.get('success_rate', 0):.1f} %")


@construct_app.command("capacity", cls=_Renamed)
@_user_errors
def construct_capacity(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Distinct greedy completions from hard first tokens vs from virtual tokens.

    Example:

    prefixlab construct capacity
    """
    from theory.constructions import capacity_count
    d = capacity_count().to_json()
    print(json.dumps(d, indent=2) if json_out else
          f"distinct completions: {d.get('hard_distinct')} from hard tokens, {d.get('virtual_distinct')} from virtual tokens")


@command("data-to-text")
def data_to_text_cmd(scale: str = typer.Option("quick", "--scale", metavar="SCALE", help="micro (tiny model, seconds), quick (~30 min of one core) or paper (hours on the CPU, minutes on a GPU)"),
                     model: Optional[str] = typer.Option(None, metavar="MODEL", help=f"smollm2, tiny, or a local HF checkpoint directory {SCALE_DEFAULT}"),
                     shares: Optional[str] = typer.Option(None, metavar="LIST", help=f"prefix parameterizations, e.g. none,deep (of none, simple, deep) {SCALE_DEFAULT}"),
                     sizes: Optional[str] = typer.Option(None, metavar="LIST", help=f"training-set sizes n, e.g. 16,64,256 {SCALE_DEFAULT}"),
                     steps: Optional[int] = typer.Option(None, metavar="N", help=f"training steps per run {SCALE_DEFAULT}"),
                     lr: Optional[List[str]] = typer.Option(None, metavar="SHARE=LRS", show_default=False,
                                                            help=f"a share's lr grid, chosen on validation, repeatable: --lr none=1e-2,3e-2 --lr deep=1e-4,3e-4 {SCALE_DEFAULT}"),
                     prefix_len: Optional[int] = typer.Option(None, "--prefix-len", "-P", metavar="P", help=f"prefix length P {SCALE_DEFAULT}"),
                     seeds: Optional[str] = typer.Option(None, metavar="LIST", help=f"seeds, e.g. 0,1,2 {SCALE_DEFAULT}"),
                     batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help=f"{BATCH_HELP} {SCALE_DEFAULT}"),
                     device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP),
                     cost: bool = typer.Option(False, "--cost", help="only measure seconds per training step and estimate the scale's cost"),
                     json_out: bool = typer.Option(False, "--json", help="print the result (or the cost) as JSON"),
                     json_path: Optional[Path] = typer.Option(None, "--json-file", metavar="FILE", help=f"write the result (or the cost) as JSON here {NO_FILE}"),
                     overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --json-file")):
    """[L]'s language analogue: No- vs Deep-share prefix-tuning of SmolLM2 on data-to-text at several n.

    docs/llama.md describes the scales and what the table means.

    Examples (the tiny model: seconds; --cost measures before a long run):

    prefixlab data-to-text --scale micro
    prefixlab data-to-text --scale quick --cost
    """
    from study.experiments.data_to_text import SCALES, estimate_seconds, measure_step_seconds, parse_lrs, run_scale
    from reports.llama_figures import check_new_output
    if json_path is not None:
        check_new_output(json_path, overwrite)
    if scale not in SCALES:
        _fail(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    dev = str(_device(device))
    over = {k: v for k, v in {"model": model, "steps": steps, "prefix_len": prefix_len, "batch_size": batch_size,
                              "shares": tuple(s.strip() for s in shares.split(",") if s.strip()) if shares else None,
                              "sizes": _ints(sizes, "--sizes"), "seeds": _ints(seeds, "--seeds"),
                              "lrs": parse_lrs(lr) or None}.items() if v is not None}
    if cost:
        cfg = {**SCALES[scale], **over}
        res = measure_step_seconds(cfg["model"], cfg["shares"], cfg["batch_size"], cfg["prefix_len"],
                                   threads=(1,), device=dev)
        step = max(res["seconds_per_step"].values())
        res["estimate"] = {"preset": scale, **estimate_seconds(cfg, step)}
    else:
        model_name = over.get("model", SCALES[scale]["model"])
        with ProgressBar("data-to-text", start=f"loading {model_name}, scoring the start prefix") as prog:
            res = run_scale(scale, device=dev, progress=lambda i, n, info: prog(i, n, {**info, "eval": True}), **over)
    if json_path is not None:
        from reports.html import write_report
        write_report(json_path, json.dumps(res, indent=1) + "\n")
    if json_out:
        print(json.dumps(res, indent=1))
        if json_path is not None:
            print(f"wrote {json_path}", file=sys.stderr)
        return
    if cost:
        for k, v in res["seconds_per_step"].items():
            print(f"{k}: {v:.2f} s per training step (batch {res['batch_size']}, P={res['prefix_len']}, {dev})")
        e = res["estimate"]
        print(f"scale {scale}: {e['runs']} runs, {e['train_steps']} training steps, ~{e['seconds'] / 60:.0f} min at the slowest rate "
              f"(evaluation included; loading and generation not)")
        return
    rows = []
    for share, per_n in res["results"].items():
        for n, r in per_n.items():
            std = f" ± {r['test_loss_std']:.3f}" if r["test_loss_std"] is not None else ""
            rows.append([share, n, f"{r['lr']:g}", f"{r['val_loss']:.3f}", f"{r['test_loss_mean']:.3f}{std}"])
    print_table(["share", "n", "lr", "val NLL", "test NLL (mean ± std over seeds)"], rows,
                title=f"{res['model']}: data-to-text, P={res['config']['prefix_len']}, {res['config']['steps']} steps")
    print(f"start prefix (no training): test NLL {res['base']['test_loss']:.3f}")
    row = res["table_row"]
    print(f"[L] language row: {VERDICT_WORD[row['holds']]} ({row['gap']})")
    if json_path is not None:
        print(f"wrote {json_path}")


@command("reparam-sim")
def reparam_sim(quick: bool = typer.Option(False, "--quick", help="quick preset: one truth, n = 10^3..10^4, 8 replicates (under 2 min of one core; shows the valley, not rates: no verdict)"),
                out: Path = typer.Option(Path("runs/reparam"), metavar="DIR", help="directory for reparam.json and reparam.html"),
                overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)):
    """[L]'s reparameterization theory as a simulation: shared vs No-share prefix fits (docs/reparam.md).

    Fits shared-linear, shared-tanh and No-share models from a split start and from valley starts, plus an exact-atom control, and prints per model and n the mean split-cell D, the far and non-identified replicates, the slopes, and the verdict of the [L] simulation row (docs/papers.md §6). Without --quick: the full preset (two truths, n = 10^3..10^5, about 30 minutes of one core). A progress line goes to stderr every 30 s.

    Example (under 2 minutes of one core):

    OMP_NUM_THREADS=1 prefixlab reparam-sim --quick --out runs/reparam-quick
    """
    from reports.theory_figures import reparam_study_figure
    from theory.reparam import ReparamConfig, run_reparam_study, summary_lines, table_row
    from toy_models.runs import RunDir, write_json
    from reports.html import write_figure_html
    rd = RunDir(out)
    rd.check_new(overwrite, False, resumable=False)
    cfg = ReparamConfig.quick() if quick else ReparamConfig.full()
    begin, last = time.monotonic(), [0.0]

    def progress(done: int, total: int, info: dict) -> None:
        now = time.monotonic()
        if now - last[0] < 30 and done < total:
            return
        last[0] = now
        frac = done / total if total else 1.0
        left = f"about {(now - begin) * (1 - frac) / frac:.0f} s left" if frac >= 0.01 else "estimating"
        print(f"[reparam] {100 * frac:5.1f} % of the fit budget, {now - begin:6.0f} s elapsed, "
              f"{left}: {info.get('what', '')}", file=sys.stderr, flush=True)

    res = run_reparam_study(cfg, progress=progress)
    rd.prepare(overwrite, False)
    data = res.to_json()
    write_json(rd.path / "reparam.json", data)
    write_figure_html(reparam_study_figure(res), rd.path / "reparam.html")
    for line in summary_lines(data):
        print(line)
    row = table_row(data)
    print(f"[L] §6: {VERDICT_WORD[row['holds']]}" + (f" ({row['gap']})" if row["gap"] else ""))
    print(f"wrote {out}/reparam.json and {out}/reparam.html ({res.total_seconds:.0f} s)")


@command()
def report(runs: List[Path] = typer.Argument(..., metavar="RUN...", show_default=False, help="run directories (base and tuned)"),
           html: Path = typer.Option(Path("report.html"), "--html", metavar="FILE", help="the self-contained HTML page to write"),
           png: Optional[Path] = typer.Option(None, metavar="DIR", help=f"also export every figure as PNG into this directory (needs chromium: make browser) {dflt('no PNGs')}"),
           inputs: int = typer.Option(200, metavar="N", help="test inputs for the probes"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --html file"),
           device: str = typer.Option("cpu", metavar="DEVICE", help=DEVICE_HELP)):
    """Write one self-contained interactive HTML report for a set of runs.

    Example:

    prefixlab report runs/mix4 runs/p-add1 --html report.html
    """
    out = html
    from reports.build import build_report
    from toy_models.runs import check_overwrite
    dev = _device(device)
    check_overwrite(out, overwrite)
    if png is not None:
        from reports.html import png_export_unavailable
        why = png_export_unavailable()
        if why:
            _fail(why)
    res = build_report(runs, out, png_dir=png, n_inputs=inputs, device=dev)
    for w in res.get("warnings", []):
        print(w, file=sys.stderr)
    print(f"wrote {out}")


@command()
def reproduce(scale: str = typer.Option("quick", "--scale", metavar="SCALE", help="the study's size: quick (what make demo runs), paper (the papers' model sizes) or micro (seconds; its numbers mean nothing)"),
              out: Path = typer.Option(Path("runs/reproduce"), metavar="DIR", help="study directory (stages are cached here; report.html goes here)"),
              stage: Optional[str] = typer.Option(None, metavar="LIST", help=f"run only these stages (and what they need), e.g. E1,probes {dflt('all')}"),
              workers: str = typer.Option("1", metavar="N", help="run independent stages in parallel on a local Ray with N workers "
                                                  "(each pins its torch threads to cores/N), or auto: one worker per core this process may use"),
              ray: Optional[str] = typer.Option(None, "--ray", envvar="RAY_ADDRESS", metavar="ADDRESS",
                                                help="run the stages on an existing Ray cluster, host:port as `ray start --head` "
                                                     "prints it (--out must be on storage every node sees; a head with "
                                                     "token authentication needs RAY_AUTH_TOKEN) "
                                                     + dflt("none: this machine, --workers on a local Ray")),
              device: str = typer.Option("cpu", metavar="DEVICE", help="where the toy runs train: auto, cpu, cuda or mps (probes stay fp32 on the CPU)"),
              precision: Optional[str] = typer.Option(None, metavar="NAME", help=REPRODUCE_PRECISION_HELP)):
    """Run the whole study as cached stages and write one report (paper vs lab first).

    Examples (micro: the whole table in about 15 s with one worker, or about a minute with --workers 2 as Ray
    starts up; its verdicts are not evidence. quick: what make demo runs):

    prefixlab reproduce --scale micro --out runs/micro
    prefixlab reproduce --scale quick --workers 2 --out runs/study
    """
    from reports.study import render_study
    from study.reproduce import reproduce as _reproduce
    only = [s for s in stage.split(",")] if stage else None
    n_workers = _workers(workers)
    from engine.progress import StudyProgress
    with StudyProgress(sys.stderr) as sp:
        res = _reproduce(out, scale, sp.factory, only, n_workers, ray, sp.done, device=device, on_note=_note,
                         precision=precision)
    t = res.get("timing")
    if t:
        print(f"study: wall {t['wall_s']:.0f} s, stage work {t['work_s']:.0f} s, longest chain "
              f"{t['longest_chain_s']:.0f} s ({' -> '.join(t['longest_chain'])})", file=sys.stderr)
    report = render_study(out, res)
    failed = [n for n, r in res["records"].items() if r["status"] != "done"]
    from study.table import scale_banner
    if scale_banner(res.get("preset", scale)):
        print(scale_banner(res.get("preset", scale)))
    for row in res["table"]:
        print(f"{row['source']:10s} {row['verdict']:12s} {row['claim']}: paper {row['paper']}, lab {row['lab']}")
    for n in failed:
        print(f"stage {n} FAILED: {res['records'][n].get('error')}", file=sys.stderr)
    print(f"report: {report}")
    if failed:
        raise typer.Exit(1)


def _workers(value: str) -> int:
    """--workers N or auto (one worker per core this process may run on)."""
    if value == "auto":
        from engine.parallel import usable_cores
        return usable_cores()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        _fail(f"--workers must be a whole number of at least 1 or auto, got {value!r}")
    return n


@command()
def demo(out: Path = typer.Option(Path("runs/demo"), metavar="DIR", help="study directory (stages are cached here; report.html goes here)"),
         workers: str = typer.Option("auto", metavar="N", help="parallel stage workers on a local Ray: N, or auto (one per core)")):
    """The whole study as `make demo` runs it: `reproduce --scale quick --workers auto`.

    About 95 minutes on 2 cores (install included); the report is report.html in --out (runs/demo/report.html by default).

    Example (what `make demo` runs):

    prefixlab demo --out runs/demo
    """
    reproduce(scale="quick", out=out, stage=None, workers=workers, ray=None, device="cpu", precision=None)


if __name__ == "__main__":
    app()
