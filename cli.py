"""prefixlab: one typer app, a command per step of the study.
(Over ~500 lines on purpose: one thin command per step of the study, each parsing its options and
calling one library function; splitting them would add a registry and no clarity.)


Each command parses its options, calls one library function and prints. Heavy imports (torch,
TransformerLens) happen inside the commands, so `prefixlab --help` stays fast. Every mistake a
user can make ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="What can context-based fine-tuning do, what can it not do, and why?")


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


# Spellings renamed in this release (issue 19: one name, one meaning), kept working for one release
# with a one-line warning on stderr: the study's size is --scale ("preset" is a model size), P is
# -P/--prefix-len everywhere, L is --seq-len, and --json is a flag that prints JSON on every command.
RENAMED = {
    "reproduce": {"--preset": "--scale"},
    "data-to-text": {"--preset": "--scale"},
    "finetune": {"--length": "--prefix-len"},
    "pretrain": {"--length": "--seq-len"},
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


class _Renamed(typer.core.TyperCommand):
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


# a computed paper-vs-lab verdict (None: too little data for one), as the commands print it
VERDICT_WORD = {True: "reproduced", False: "differs", None: "no verdict"}
DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda or mps"
_PRECISIONS = "fp32, bf16 (autocast; refused without native bf16) or auto (bf16 where native)"
PRECISION_HELP = (f"training precision: {_PRECISIONS}. Default: bf16 on a CUDA GPU that has it, fp32 on a CPU "
                  "(docs/benchmarks.md)")
REPRODUCE_PRECISION_HELP = (
    f"training precision of every toy stage: {_PRECISIONS}. Default: bf16 on a CUDA GPU that has it; on a CPU "
    "with native bf16, per stage (bf16 only where measured faster, the quick E4; docs/benchmarks.md); else fp32. "
    "Cached apart")


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


class ProgressBar:
    """A rich progress bar on a terminal; plain log lines (at each evaluation) otherwise. An instance
    is a `prefixlab_common.progress.Progress` callback."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.bar = None

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn
            self.bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=None, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, step: int, total: int, info: dict) -> None:
        text = " ".join(f"{k} {v:.4f}" for k, v in info.items() if isinstance(v, float))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, info=text)
        elif info.get("eval"):
            print(f"[{self.label}] step {step}/{total} {text}", file=sys.stderr, flush=True)


def _train_opts(steps, lr, batch_size, seed, schedule, warmup, eval_every) -> dict:
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "schedule": schedule,
            "warmup": warmup, "eval_every": eval_every}


@command()
def tasks():
    """List the tasks, each with a one-line description and an example."""
    from toy_models.tasks import TASKS, example, task_names
    from rich.console import Console
    from rich.table import Table
    table = Table("task", "description", "example X -> Y")
    for name in task_names():
        desc = TASKS[name].description if name in TASKS else "each sample one of ascending, descending, add1, add2"
        x, y = example(name)
        table.add_row(name, desc, f"{' '.join(map(str, x))} -> {' '.join(map(str, y))}")
    Console().print(table)
    print("Compose tasks with '+', e.g. less_than+add1 (apply less_than, then add1).")


@command()
def methods():
    """List the tuning methods (the registry), each with its options and where their defaults came from."""
    from rich.console import Console
    from rich.table import Table
    from tuning.registry import METHODS
    table = Table("method", "what it trains", "options (default; source)")
    for name, cls in METHODS.items():
        opts = "\n".join(f"{o.flag}{' ' + o.short if o.short else ''}: {o.default!r}; {o.source}" for o in cls.options)
        table.add_row(name, cls.summary, opts or "(none)")
    Console().print(table)


@command()
def pretrain(task: str = typer.Option("mix4", help="task to pretrain on (see `prefixlab tasks`)"),
             preset: str = typer.Option("default", help="model size: micro, default, petrov-e1, petrov-e2, petrov-e3, petrov-large"),
             out: Path = typer.Option(..., help="run directory to write"),
             prompt_len: int = typer.Option(1, help="prompt slots P reserved before the content"),
             slots: Optional[str] = typer.Option(None, help="slot protocol: token (SLOT tokens fill the slots, as [P]; default) or empty"),
             seq_len: int = typer.Option(10, "--seq-len", help="sequence length L of X and Y"),
             num_digits: int = typer.Option(8, help="X digits are 0..num_digits-1"),
             steps: Optional[int] = typer.Option(None, help="training steps (default 3000)"),
             lr: Optional[float] = typer.Option(None, help="peak learning rate (default 3e-3)"),
             batch_size: Optional[int] = typer.Option(None, help="batch size (default 64)"),
             schedule: Optional[str] = typer.Option(None, help="cosine, constant, or decay (constant, then linear over the last 20 %)"),
             warmup: Optional[int] = typer.Option(None, help="warmup steps"),
             eval_every: Optional[int] = typer.Option(None, help="evaluate (and checkpoint) every N steps"),
             seed: int = typer.Option(0, help="seed of init, data and dropout"),
             overwrite: bool = typer.Option(False, help="replace an existing run directory"),
             resume: bool = typer.Option(False, help="continue an interrupted run"),
             device: str = typer.Option("cpu", help=DEVICE_HELP),
             precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
             json_out: bool = typer.Option(False, "--json", help="print the final metrics as JSON")):
    """Pretrain a toy model on a task and write a base run."""
    from toy_models.pipeline import PRETRAIN_DEFAULTS, pretrain as _pretrain
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
        params = [*self.params, *_method_params()]
        help_option = self.get_help_option(ctx)
        return params + [help_option] if help_option is not None else params

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
            defaults.setdefault((repr(o.default), o.source), []).append(m)
        text = escape("; ".join(helps) + ". Default: " + "; ".join(
            f"{'/'.join(ms)} {d} ({src})" for (d, src), ms in defaults.items()))
        decls = [first.flag] + ([first.short] if first.short else [])
        kind = str if first.many else first.type
        params.append(_get_param(ParamMeta(name=name, annotation=Optional[kind],
                                           default=typer.Option(None, *decls, help=text, rich_help_panel="Method options"))))
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
             base: Path = typer.Argument(..., help="base (pretrained) run directory"),
             method: str = typer.Option(..., help="the method (`prefixlab methods` lists them and their options)"),
             task: str = typer.Option(..., help="task to tune for; several (a,b,c): one run per task under --out"),
             out: Path = typer.Option(..., help="tuned run directory to write"),
             steps: Optional[int] = typer.Option(None, help="training steps (default 1000)"),
             lr: Optional[float] = typer.Option(None, help="learning rate (default: the method's)"),
             batch_size: Optional[int] = typer.Option(None),
             schedule: Optional[str] = typer.Option(None, help="cosine, constant, or decay (constant, then linear over the last 20 %)"),
             warmup: Optional[int] = typer.Option(None),
             eval_every: Optional[int] = typer.Option(None),
             seed: int = typer.Option(0),
             seeds: Optional[str] = typer.Option(None, help="repeat for these seeds, e.g. 0,1,2; reports mean ± std"),
             fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="train several seeds/tasks in one batched forward (default) or one by one"),
             overwrite: bool = typer.Option(False),
             resume: bool = typer.Option(False),
             device: str = typer.Option("cpu", help=DEVICE_HELP),
             precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
             json_out: bool = typer.Option(False, "--json")):
    """Tune a method on a task over a frozen base run and write a tuned run (the method options
    below come from the method registry; each applies to the methods named in its help)."""
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
def evaluate(runs: List[Path] = typer.Argument(..., help="base or tuned run directories"),
             task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="task(s); default: each run's own"),
             n: int = typer.Option(1000, help="size of the fixed test set"),
             device: str = typer.Option("cpu", help=DEVICE_HELP),
             json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Evaluate runs on tasks: a cross-task matrix of exact-sequence accuracy."""
    from toy_models.pipeline import evaluate_run
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
    from rich.console import Console
    from rich.table import Table
    cols = sorted({t for res in results.values() for t in res}, key=lambda t: (task or []).index(t) if task and t in task else 99)
    table = Table("run", "kind", *cols, title="exact-sequence accuracy (token accuracy)")
    for r in loaded:
        res = results[str(r.path)]
        kind = r.config["method"]["name"] if r.kind == "finetune" else "base"
        table.add_row(str(r.path), kind, *[
            (f"{res[t]['exact_acc']:.1%} ({res[t]['token_acc']:.1%})" + ("*" if res[t]["provide_first"] else ""))
            if t in res else "" for t in cols])
    Console().print(table)
    if any(v["provide_first"] for res in results.values() for v in res.values()):
        print("* y1 given: mix4 has no task indicator, so its first output is provided ([P]'s protocol).")


@command()
def probe(runs: List[Path] = typer.Argument(..., help="tuned run directories (one base)"),
          probe_: Optional[str] = typer.Option(None, "--probe", help="probes to run, e.g. invariance,bias (default: every registered probe: invariance, bias, clusters, drift)"),
          layers: Optional[str] = typer.Option(None, help="layers, e.g. 0,1 (default all)"),
          heads: Optional[str] = typer.Option(None, help="heads, e.g. 0,2 (default all)"),
          inputs: int = typer.Option(1000, help="number of test inputs"),
          out: Path = typer.Option(..., help="directory for probe.json and probe.safetensors"),
          overwrite: bool = typer.Option(False),
          device: str = typer.Option("cpu", help=DEVICE_HELP),
          json_out: bool = typer.Option(False, "--json")):
    """Probe tuned runs: attention invariance, bias decomposition, clusters, drift, hierarchy."""
    from probes.run import run_probes
    dev = _device(device)
    report = run_probes(runs, None if probe_ is None else [p.strip() for p in probe_.split(",") if p.strip()], out,
                        _ints(layers, "--layers"), _ints(heads, "--heads"), inputs, overwrite, device=dev)
    if report.get("device_note"):
        print(report["device_note"], file=sys.stderr)
    if json_out:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("run", "identity", "verdict", "max error", title="identities (fp32 tolerance 1e-5)")
    for v in report["verdicts"]:
        verdict = {True: "holds", False: "broken", None: "n/a"}[v["holds"]]
        table.add_row(v["run"], v["identity"], verdict, "" if v["value"] is None else f"{v['value']:.2e}")
    Console().print(table)
    for name, entry in report["runs"].items():
        print(f"{name}: {entry['hierarchy']['class']}")
    if "clusters" in report:
        c = report["clusters"]
        if c.get("nearest_centroid_acc_with_method") is not None:
            print(f"clusters: nearest-centroid task accuracy {c['nearest_centroid_acc_with_method']:.1%} with the "
                  f"methods, {c['nearest_centroid_acc_without_method']:.1%} without (chance {c['chance']:.1%})")
    print(f"wrote {out}/probe.json and {out}/probe.safetensors")


@command("llama-check")
def llama_check(model: str = typer.Option("tiny", help="tiny, tiny-gqa, smollm2, or a local HF checkpoint directory"),
                prefix: str = typer.Option("random", help="random, train, or a prefix file saved by prefixlab"),
                soft_prompt: Optional[str] = typer.Option(None, "--soft-prompt", help="check a soft prompt instead: random, or a soft-prompt file saved by prefixlab"),
                adapter: Optional[Path] = typer.Option(None, help="a PEFT adapter directory: prefix tuning or prompt tuning (read from adapter_config.json)"),
                layers: Optional[str] = typer.Option("0", help="layers to check, e.g. 0,1,2 (\"all\" for all)"),
                heads: Optional[str] = typer.Option(None, help="heads (default all)"),
                prefix_len: int = typer.Option(1, "--prefix-len", "-P", help="prefix slots / soft-prompt length"),
                dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
                text: Optional[str] = typer.Option(None, help="text to check on (default: papers.md's DART sample)"),
                seed: int = typer.Option(0),
                stream: bool = typer.Option(False, help="load one decoder layer at a time (checkpoints larger than memory)"),
                fig: Optional[Path] = typer.Option(None, help="write the model page (HTML): table, Fig. 5 panels of the first layer (+ --dilution)"),
                dilution: Optional[str] = typer.Option(None, help="with --fig: also measure prefix dilution at these lengths, e.g. 16,64,256"),
                overwrite: bool = typer.Option(False, help="replace an existing --fig file"),
                json_out: bool = typer.Option(False, "--json")):
    """Check the prefix or soft-prompt identities on a LLaMA-family model (papers.md §4, Fig. 5)."""
    from llama_checks.check import run_llama_check
    lay = None if layers in (None, "all") else _ints(layers, "--layers")
    if dilution is not None and fig is None:
        _fail("--dilution adds curves to the page: give --fig too")
    if fig is not None:
        from reports.llama_figures import check_new_output
        check_new_output(fig, overwrite)
    lengths = None
    if dilution is not None:
        from llama_checks.dilution import check_lengths, parse_lengths
        lengths = check_lengths(parse_lengths(dilution), None, prefix_len)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not json_out else None
    kept = []  # the model the check loaded, reused for --dilution (loaded once)
    res = run_llama_check(model, prefix, str(adapter) if adapter else None, lay, _ints(heads, "--heads"),
                          prefix_len, dtype, text, seed, stream, progress=say, soft_prompt=soft_prompt,
                          on_loaded=kept.append if lengths is not None else None)
    if fig is not None:
        from reports.llama_figures import write_page
        dil = None
        if lengths is not None:
            from llama_checks.dilution import dilution_loaded
            from llama_checks.models import load_model, resolve_dtype
            loaded = kept[0] if kept else load_model(model, resolve_dtype(dtype), seed=seed)  # stream mode loads here
            dil = dilution_loaded(loaded, prefix, str(adapter) if adapter else None, lengths, "mean", prefix_len, seed,
                                  say=say or (lambda m: None))
        write_page(fig, res, dil)
    if json_out:
        print(json.dumps(res.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    rows = res.table_rows()
    what = "soft prompt" if res.method == "soft_prompt" else "prefix"
    table = Table(*rows[0], title=f"{res.model} ({res.model_type}, {res.dtype}), P={res.prefix_len}, {what}: {res.prefix_source}")
    for r in rows[1:]:
        table.add_row(*r)
    Console().print(table)
    print(f"RoPE position-shift error (same pattern, no {what}, content shifted by P): {res.rope_shift_error:.2e}")
    if res.hierarchy:
        h = res.hierarchy
        print(f"hierarchy: soft prompt as its per-layer prefix reproduces the soft-prompt forward: max |Δ logits| "
              f"{h['logits_max_abs_diff']:.2e} (relative {h['logits_rel_diff']:.2e}), max |Δ final residual| "
              f"{h['resid_final_max_abs_diff']:.2e}")
    print(f"layer-0 identities {'hold' if res.passed else 'DO NOT hold'} within the {res.dtype} tolerance {res.tolerance}")
    if fig is not None:
        print(f"wrote {fig}")


@command("dilution")
def dilution_cmd(model: str = typer.Option("tiny", help="tiny, tiny-gqa, smollm2, or a local HF checkpoint directory"),
                 prefix: str = typer.Option("random", help="random, train, or a prefix file saved by prefixlab"),
                 adapter: Optional[Path] = typer.Option(None, help="a PEFT prefix-tuning or prompt-tuning adapter directory"),
                 lengths: Optional[str] = typer.Option(None, help="input lengths, e.g. 16,64,256,1024 (default 16..1024 within the context)"),
                 heads: str = typer.Option("mean", help="aggregate heads per layer: mean, max, all (each head drawn), or head indices 0,3"),
                 prefix_len: int = typer.Option(1, "--prefix-len", "-P"),
                 dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
                 text: Optional[str] = typer.Option(None, help="text to repeat as input (default: the shipped DART-style lines)"),
                 seed: int = typer.Option(0),
                 json_out: bool = typer.Option(False, "--json", help="print the curves and fits as JSON"),
                 json_path: Optional[Path] = typer.Option(None, "--json-file", help="write the curves and fits as JSON here"),
                 out: Optional[Path] = typer.Option(None, help="write the model page (HTML): dilution, sink, and a layer-0 Fig. 5 check"),
                 overwrite: bool = typer.Option(False, help="replace existing --json-file / --out files")):
    """Prefix dilution: attention mass on the prefix and on the sink as the input grows."""
    from llama_checks.dilution import check_lengths, parse_lengths, run_dilution
    from reports.llama_figures import check_new_output
    for path in (json_path, out):
        if path is not None:
            check_new_output(path, overwrite)
    if json_path is not None and out is not None and json_path.resolve() == out.resolve():
        _fail("--json-file and --out name the same file; give two different files")
    wanted = parse_lengths(lengths)
    if wanted is not None:
        check_lengths(wanted, None, prefix_len)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    kept = []  # the model dilution loaded, reused for the --out page's layer-0 check (loaded once)
    res = run_dilution(model, prefix, str(adapter) if adapter else None, wanted, heads, prefix_len, dtype, seed, text,
                       progress=say, on_loaded=kept.append)
    if json_path is not None:
        from reports.html import write_report
        write_report(json_path, json.dumps(res.to_json(), indent=1) + "\n")
    if out is not None:
        from llama_checks.check import check_loaded
        from llama_checks.soft_check import check_soft_loaded
        from reports.llama_figures import write_page
        from llama_checks.soft_prompt import adapter_kind
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
    from rich.console import Console
    from rich.table import Table
    rows = res.table_rows()
    table = Table(*rows[0], title=f"{res.model}: prefix dilution, P={res.prefix_len}, prefix {res.prefix_source}, heads {res.heads}")
    for r in rows[1:]:
        table.add_row(*r)
    Console().print(table)
    print(f"lengths {res.lengths}; alpha = mean prefix mass of the {res.window}; {res.timings['total_s']:.1f} s")
    for path in (json_path, out):
        if path is not None:
            print(f"wrote {path}")


construct_app = typer.Typer(help="Theorem 1 and 2 constructions, and the capacity count ([P] §3).", no_args_is_help=True)
app.add_typer(construct_app, name="construct")


@construct_app.command("thm1")
@_user_errors
def construct_thm1(text: str = typer.Option("I love transformers!", help="the sequence to generate"),
                   beta: Optional[float] = typer.Option(None, help="inverse temperature (default: the construction's)"),
                   json_out: bool = typer.Option(False, "--json")):
    """Generate TEXT from one virtual token with the hand-built Theorem-1 transformer."""
    from theory.constructions import thm1_text
    res = thm1_text(text, beta=beta)
    if json_out:
        print(json.dumps(res.to_json(), indent=2))
        return
    d = res.to_json()
    print(f"generated: {d.get('generated')!r}")
    print(f"verdict: {'exact' if d.get('exact') else 'MISMATCH'}")


@construct_app.command("thm2")
@_user_errors
def construct_thm2(map_: Optional[str] = typer.Option(None, "--map", help="a map [V]->[V], e.g. 1,2,0 (m(0)=1, m(1)=2, m(2)=0)"),
                   V: int = typer.Option(8, "--V", help="vocabulary size for random maps"),
                   n_maps: int = typer.Option(20, help="random maps to check when --map is not given"),
                   seed: int = typer.Option(0),
                   json_out: bool = typer.Option(False, "--json")):
    """Realise a map with one virtual token (context 2) and check it on every input."""
    from theory.constructions import parse_map, thm2_check
    mapping = parse_map(map_) if map_ else None
    res = thm2_check(len(mapping) if mapping else V, mapping, n_maps, seed)
    d = res.to_json()
    print(json.dumps(d, indent=2) if json_out else
          f"V={d.get('V')}: {d.get('n_maps')} map(s), success rate {100 * d.get('success_rate', 0):.1f} %")


@construct_app.command("capacity")
@_user_errors
def construct_capacity(json_out: bool = typer.Option(False, "--json")):
    """Distinct greedy completions from hard first tokens vs from virtual tokens."""
    from theory.constructions import capacity_count
    d = capacity_count().to_json()
    print(json.dumps(d, indent=2) if json_out else
          f"distinct completions: {d.get('hard_distinct')} from hard tokens, {d.get('virtual_distinct')} from virtual tokens")


@command("data-to-text")
def data_to_text_cmd(scale: str = typer.Option("quick", "--scale", help="micro (tiny model, seconds), quick (~30 min of one core) or paper (hours on the CPU, minutes on a GPU)"),
                     model: Optional[str] = typer.Option(None, help="smollm2, tiny, or a local HF checkpoint directory (default: the preset's)"),
                     shares: Optional[str] = typer.Option(None, help="prefix parameterizations, e.g. none,deep (of none, simple, deep)"),
                     sizes: Optional[str] = typer.Option(None, help="training-set sizes n, e.g. 16,64,256"),
                     steps: Optional[int] = typer.Option(None, help="training steps per run"),
                     lr: Optional[List[str]] = typer.Option(None, help="a share's lr grid, chosen on validation: --lr none=1e-2,3e-2 --lr deep=1e-4,3e-4"),
                     prefix_len: Optional[int] = typer.Option(None, "--prefix-len", "-P"),
                     seeds: Optional[str] = typer.Option(None, help="e.g. 0,1,2"),
                     batch_size: Optional[int] = typer.Option(None, "--batch-size"),
                     device: str = typer.Option("cpu", help=DEVICE_HELP),
                     cost: bool = typer.Option(False, "--cost", help="only measure seconds per training step and estimate the presets' cost"),
                     json_out: bool = typer.Option(False, "--json", help="print the result (or the cost) as JSON"),
                     json_path: Optional[Path] = typer.Option(None, "--json-file", help="write the result (or the cost) as JSON here"),
                     overwrite: bool = typer.Option(False, help="replace an existing --json-file")):
    """[L]'s language analogue: No- vs Deep-share prefix-tuning of SmolLM2 on data-to-text at several n (docs/llama.md)."""
    from llama_checks.data_to_text import PRESETS, estimate_seconds, measure_step_seconds, parse_lrs, run_preset
    from reports.llama_figures import check_new_output
    if json_path is not None:
        check_new_output(json_path, overwrite)
    if scale not in PRESETS:
        _fail(f"unknown scale {scale!r}; use one of {', '.join(PRESETS)}")
    dev = str(_device(device))
    over = {k: v for k, v in {"model": model, "steps": steps, "prefix_len": prefix_len, "batch_size": batch_size,
                              "shares": tuple(s.strip() for s in shares.split(",") if s.strip()) if shares else None,
                              "sizes": _ints(sizes, "--sizes"), "seeds": _ints(seeds, "--seeds"),
                              "lrs": parse_lrs(lr) or None}.items() if v is not None}
    if cost:
        cfg = {**PRESETS[scale], **over}
        res = measure_step_seconds(cfg["model"], cfg["shares"], cfg["batch_size"], cfg["prefix_len"],
                                   threads=(1,), device=dev)
        step = max(res["seconds_per_step"].values())
        res["estimate"] = {"preset": scale, **estimate_seconds(cfg, step)}
    else:
        with ProgressBar("data-to-text") as prog:
            res = run_preset(scale, device=dev, progress=lambda i, n, info: prog(i, n, {**info, "eval": True}), **over)
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
    from rich.console import Console
    from rich.table import Table
    table = Table("share", "n", "lr", "val NLL", "test NLL (mean ± std over seeds)", title=f"{res['model']}: data-to-text, P={res['config']['prefix_len']}, {res['config']['steps']} steps")
    for share, per_n in res["results"].items():
        for n, r in per_n.items():
            std = f" ± {r['test_loss_std']:.3f}" if r["test_loss_std"] is not None else ""
            table.add_row(share, n, f"{r['lr']:g}", f"{r['val_loss']:.3f}", f"{r['test_loss_mean']:.3f}{std}")
    Console().print(table)
    print(f"start prefix (no training): test NLL {res['base']['test_loss']:.3f}")
    row = res["table_row"]
    print(f"[L] language row: {VERDICT_WORD[row['holds']]} ({row['gap']})")
    if json_path is not None:
        print(f"wrote {json_path}")


@command("reparam-sim")
def reparam_sim(quick: bool = typer.Option(False, "--quick", help="n = 10^3..10^4, 20 replicates (about 1 min of one core)"),
                out: Path = typer.Option(Path("runs/reparam"), help="directory for reparam.json and reparam.html"),
                overwrite: bool = typer.Option(False)):
    """The reparameterization sample-efficiency study of [L] (papers.md §6)."""
    from reports.theory_figures import reparam_figure
    from theory.reparam import ReparamConfig, run_reparam_study
    from toy_models.runs import RunDir, write_json
    rd = RunDir(out)
    rd.check_new(overwrite, False)
    cfg = ReparamConfig.quick() if quick else ReparamConfig.full()
    with ProgressBar("reparam") as prog:
        res = run_reparam_study(cfg, progress=lambda i, n, msg: prog(i, n, {}))
    rd.prepare(overwrite, False)
    write_json(rd.path / "reparam.json", res.to_json())
    from reports.html import write_figure_html
    write_figure_html(reparam_figure(res), rd.path / "reparam.html")
    from theory.reparam import table_row
    data = res.to_json()
    fmt = lambda d: "n/a" if not d else f"{d['slope']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    print(f"{'model':14s} {'D':22s} {'split-cell D':22s} {'|f^-f*|':22s} certified")
    for model, s in data["slopes"].items():
        print(f"{model:14s} {fmt(s.get('D')):22s} {fmt(s.get('D_multi')):22s} {fmt(s.get('L2')):22s} "
              f"{sum(data['certified'].get(model, []))}")
    row = table_row(data)
    print(f"[L] §6: {VERDICT_WORD[row['holds']]}"
          + (f" ({row['gap']})" if row["gap"] else ""))
    print(f"wrote {out}/reparam.json and {out}/reparam.html")


@command()
def report(runs: List[Path] = typer.Argument(..., help="run directories (base and tuned)"),
           out: Path = typer.Option(Path("report.html"), help="the HTML file to write"),
           png: Optional[Path] = typer.Option(None, help="also export every figure as PNG here (needs chromium)"),
           inputs: int = typer.Option(200, help="test inputs for the probes"),
           overwrite: bool = typer.Option(False),
           device: str = typer.Option("cpu", help=DEVICE_HELP)):
    """Write one self-contained interactive HTML report for a set of runs."""
    from reports.build import build_report
    dev = _device(device)
    if out.exists() and not overwrite:
        _fail(f"{out} already exists; pass --overwrite to replace it")
    res = build_report(runs, out, png_dir=png, n_inputs=inputs, device=dev)
    for w in res.get("warnings", []):
        print(w, file=sys.stderr)
    print(f"wrote {out}")


@command()
def reproduce(scale: str = typer.Option("quick", "--scale", help="the study's size: quick (what make demo runs), paper (the papers' model sizes) or micro (seconds; its numbers mean nothing)"),
              out: Path = typer.Option(Path("runs/reproduce"), help="study directory (stages are cached here)"),
              stage: Optional[str] = typer.Option(None, help="run only these stages, e.g. E1,probes"),
              workers: int = typer.Option(1, help="run independent stages in parallel on a local Ray with N workers "
                                                  "(each pins its torch threads to cores/N)"),
              ray: Optional[str] = typer.Option(None, "--ray", envvar="RAY_ADDRESS",
                                                help="run the stages on an existing Ray cluster, host:port as `ray start --head` "
                                                     "prints it (out must be shared; a token: RAY_AUTH_TOKEN)"),
              device: str = typer.Option("cpu", help="where the toy runs train: auto, cpu, cuda or mps (probes stay fp32 on the CPU)"),
              precision: Optional[str] = typer.Option(None, help=REPRODUCE_PRECISION_HELP)):
    """Run the whole study as cached stages and write one report (paper vs lab first)."""
    from reports.study import render_study
    from study.reproduce import reproduce as _reproduce
    only = [s for s in stage.split(",")] if stage else None
    if workers < 1:
        _fail(f"--workers must be at least 1, got {workers}")
    from study.progress import StudyProgress
    with StudyProgress(sys.stderr) as sp:
        res = _reproduce(out, scale, sp.factory, only, workers, ray, sp.done, device=device, on_note=_note,
                         precision=precision)
    t = res.get("timing")
    if t:
        print(f"study: wall {t['wall_s']:.0f} s, stage work {t['work_s']:.0f} s, longest chain "
              f"{t['longest_chain_s']:.0f} s ({' -> '.join(t['longest_chain'])})", file=sys.stderr)
    report = render_study(out, res)
    failed = [n for n, r in res["records"].items() if r["status"] != "done"]
    for row in res["table"]:
        print(f"{row['source']:10s} {row['verdict']:12s} {row['claim']}: paper {row['paper']}, lab {row['lab']}")
    for n in failed:
        print(f"stage {n} FAILED: {res['records'][n].get('error')}", file=sys.stderr)
    print(f"report: {report}")
    if failed:
        raise typer.Exit(1)


@command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="where the study goes"),
         workers: int = typer.Option(2, help="parallel stage workers (local Ray)")):
    """The main job on its built-in default: `reproduce --scale quick`."""
    reproduce(scale="quick", out=out, stage=None, workers=workers, ray=None, device="cpu", precision=None)


if __name__ == "__main__":
    app()
