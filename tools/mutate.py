"""`make mutate`: mutation testing (mutmut 3) of the modules that carry the science.

Each module is mutated alone, in a copy of the tree under runs/mutate/work/<module>/, and each of
its mutants runs only the fast test files that matter for it (MODULES below; mutmut narrows that
further to the tests that call the mutated function), at one torch thread. The report lists the
surviving mutants per module: runs/mutate/report.json (with each survivor's diff) and
runs/mutate/report.txt (the table that docs/tests.md copies).

    python tools/mutate.py                      # every module in MODULES
    python tools/mutate.py study/table.py ...   # some of them
    python tools/mutate.py --list               # the module -> tests mapping
    python tools/mutate.py --only 'toy_models.training.x_evaluate*' toy_models/training.py
                                                # only the mutants of some functions (fnmatch)
    python tools/mutate.py --tests tests/toy_models/test_mutants_runs.py toy_models/runs.py
                                                # other test files than the mapped ones
    python tools/mutate.py --collect --keep MODULE   # statuses of a kept (even stopped) run

mutmut mutates code inside functions and methods only: module constants and class attributes
(LoRA's DEFAULT_TARGETS, the methods' `defaults`) are pinned by tests of their own instead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["toy_models", "tuning", "probes", "model_checks", "theory", "engine", "study", "reports"]
# the bottom package every package imports (UserError); copied with the others where it exists
PACKAGES += [p for p in ("prefixlab_common",) if (ROOT / p).is_dir()]
# the methods against hand computations; test_tuning.py trains every variant (minutes per mutant)
_TUNE = ["tests/tuning/test_methods.py"]
_LLAMA = ["tests/model_checks/test_llama.py", "tests/model_checks/test_soft_prompt_dilution.py"]
# the table's rows by hand (every verdict at its threshold) and the experiment modules' wiring
_TABLE = ["tests/study/test_table.py", "tests/study/test_table_l.py", "tests/study/test_experiment_modules.py",
          "tests/study/test_mutants_table.py"]
_PROBES = ["tests/probes/test_probes.py", "tests/probes/test_probe_registry.py"]
# module -> the fast test files that exercise it (never the whole suite: one mutant would take minutes)
MODULES: dict[str, list[str]] = {
    "toy_models/model.py": ["tests/toy_models/test_model.py", "tests/toy_models/test_mutants_model.py",
                            "tests/tuning/test_methods.py"],
    "toy_models/tasks.py": ["tests/toy_models/test_tasks.py"],
    "toy_models/training.py": ["tests/toy_models/test_training.py", "tests/toy_models/test_mutants_training.py",
                               "tests/toy_models/test_tasks.py"],
    "toy_models/batched.py": ["tests/toy_models/test_training.py", "tests/tuning/test_fused.py"],
    # test_tuning.py trains every method (minutes per mutant): the store's own tests instead
    "toy_models/runs.py": ["tests/toy_models/test_mutants_runs.py", "tests/toy_models/test_training.py"],
    "tuning/lora.py": _TUNE,
    "tuning/base.py": _TUNE + ["tests/tuning/test_method_registry.py", "tests/tuning/test_mutants_full.py"],
    "tuning/full.py": _TUNE + ["tests/tuning/test_method_registry.py", "tests/tuning/test_mutants_full.py"],
    "tuning/soft_prompt.py": _TUNE + ["tests/tuning/test_prompt.py", "tests/tuning/test_mutants_soft_prompt.py"],
    "tuning/prefix.py": _TUNE + ["tests/tuning/test_prefix_fold.py", "tests/tuning/test_method_registry.py",
                                 "tests/tuning/test_mutants_prefix_tuning.py"],
    "tuning/prompt.py": ["tests/tuning/test_prompt.py"] + _TUNE + ["tests/tuning/test_mutants_prompt.py"],
    # study/table.py assembles the rows the experiment modules write (study/experiments/e1 ...
    # sample_eff, rows); their `run`s train the micro study (tests/study/test_reproduce.py): measure
    # the rows with --only
    "study/table.py": _TABLE,
    "study/rows.py": _TABLE,
    "study/experiments/e1.py": _TABLE,
    "study/experiments/e2.py": _TABLE,
    "study/experiments/e3.py": _TABLE,
    "study/experiments/e4.py": _TABLE,
    "study/experiments/sample_eff.py": _TABLE,
    "probes/common.py": _PROBES,
    "probes/invariance.py": _PROBES + ["tests/probes/test_mutants_invariance.py"],
    "probes/bias.py": _PROBES + ["tests/probes/test_mutants_bias.py"],
    "probes/clusters.py": _PROBES,
    "probes/drift.py": _PROBES + ["tests/probes/test_mutants_drift.py"],
    "probes/compute.py": _PROBES,
    "probes/hierarchy.py": _PROBES + ["tests/model_checks/test_soft_prompt_dilution.py",
                                      "tests/probes/test_mutants_hierarchy.py"],
    "model_checks/prefix.py": _LLAMA + ["tests/model_checks/test_mutants_prefix.py"],
    "model_checks/soft_prompt.py": _LLAMA + ["tests/model_checks/test_mutants_soft_prompt_llama.py"],
    "theory/reparam.py": ["tests/theory/test_reparam.py", "tests/theory/test_mutants_reparam.py"],
}
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "killed"}
OUT = ROOT / "runs" / "mutate"


def workdir_for(module: str, tests: list[str]) -> Path:
    """A fresh copy of the packages, the module's tests (and every conftest) and a pyproject.toml
    whose [tool.mutmut] mutates this one module and selects these tests."""
    work = OUT / "work" / module.replace("/", "__").removesuffix(".py")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for p in PACKAGES:
        shutil.copytree(ROOT / p, work / p, ignore=ignore)
    shutil.copy2(ROOT / "cli.py", work / "cli.py")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)  # data files beside the tests too
    toml = (ROOT / "pyproject.toml").read_text()
    toml = toml.split("[tool.mutmut]")[0]  # ours below replaces any in the project's file
    sel = ", ".join(json.dumps(t) for t in tests)
    toml += (f"\n[tool.mutmut]\nsource_paths = {json.dumps(PACKAGES)}\nonly_mutate = [{json.dumps(module)}]\n"
             f"pytest_add_cli_args_test_selection = [{sel}]\n"
             # slow tests need chromium or real weights; -x: one failing test kills the mutant
             "pytest_add_cli_args = [\"-x\", \"-m\", \"not slow and not browser\", \"-p\", \"no:cacheprovider\"]\n"
             "use_git_change_detection = false\n")
    (work / "pyproject.toml").write_text(toml)
    return work


def mutmut(work: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)


def diffs(work: Path, module: str, names: list[str]) -> dict[str, str]:
    """Each mutant's changed lines, from the mutated copy mutmut writes (its `show` command
    costs a process per mutant): the `<name>` function against `<function>__mutmut_orig`."""
    src = (work / "mutants" / module).read_text()
    lines = src.splitlines()
    funcs = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(src))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = {}
    for name in names:
        short = name.split(".")[-1]
        orig, mut = funcs.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"), funcs.get(short)
        if orig is None or mut is None:
            out[name] = "?"
            continue
        body = lambda t: [l.strip() for l in t.splitlines()[1:]]
        out[name] = "\n".join(l for l in difflib.unified_diff(body(orig), body(mut), lineterm="", n=0)
                              if l[:1] in "+-" and not l.startswith(("+++", "---")))
    return out


def collect(work: Path, module: str) -> dict:
    """Statuses from mutmut's .meta file, and the diff of every mutant not killed."""
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    by = {k: STATUS.get(v, "suspicious" if v is not None else "not checked") for k, v in meta["exit_code_by_key"].items()}
    counts: dict[str, int] = {}
    for s in by.values():
        counts[s] = counts.get(s, 0) + 1
    left = sorted(k for k, s in by.items() if s not in ("killed", "not checked"))
    d = diffs(work, module, left)
    # with --only, the other functions' mutants are "not checked": they count in neither column
    return {"total": len(by) - counts.get("not checked", 0), "counts": counts,
            "survivors": {k: {"status": by[k], "diff": d[k]} for k in left}}


def run_module(module: str, tests: list[str], keep: bool, previous: dict | None = None,
               only: list[str] | None = None) -> dict:
    """Mutate one module and collect; with `previous` (its entry of an earlier report, run with
    --keep), only collect again from the kept work directory. only: fnmatch patterns of mutant
    names (`toy_models.model.xǁAttentionǁforward*`, `toy_models.training.x_evaluate*`): run
    those mutants only."""
    if previous is not None:
        work = OUT / "work" / module.replace("/", "__").removesuffix(".py")
        res = {k: previous[k] for k in ("module", "tests", "wall_s", "cpu_s", "returncode") if k in previous}
        if previous.get("only"):
            res["only"] = previous["only"]
    else:
        work = workdir_for(module, tests)
        t0, c0 = time.time(), os.times()
        proc = mutmut(work, "run", "--max-children", "1", *(only or []))
        c1 = os.times()
        res = {"module": module, "tests": tests, "wall_s": round(time.time() - t0, 1),
               "cpu_s": round((c1.children_user + c1.children_system) - (c0.children_user + c0.children_system), 1),
               "returncode": proc.returncode, **({"only": only} if only else {})}
        if proc.returncode or not (work / "mutants" / (module + ".meta")).exists():
            res["error"] = (proc.stdout + proc.stderr)[-3000:]
            return res
    res.update(collect(work, module))
    s = res["total"] - res["counts"].get("killed", 0)
    res["surviving"], res["surviving_pct"] = s, round(100 * s / max(res["total"], 1), 1)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def table(results: list[dict]) -> str:
    lines = [f"{'module':28} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'timeout':>7} "
             f"{'surv %':>6} {'time':>7}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['module']:28} error (see report.json)")
            continue
        c = r["counts"]
        name = r["module"] + (" (part)" if r.get("only") else "")
        lines.append(f"{name:28} {r['total']:7} {c.get('killed', 0):6} {c.get('survived', 0):8} "
                     f"{c.get('no tests', 0):8} {c.get('timeout', 0):7} {r['surviving_pct']:6.1f} {r['wall_s'] or 0:6.0f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="modules to mutate (default: all of MODULES)")
    ap.add_argument("--list", action="store_true", help="print the module -> tests mapping")
    ap.add_argument("--keep", action="store_true", help="keep runs/mutate/work/<module> (for `mutmut show`)")
    ap.add_argument("--collect", action="store_true", help="only collect again from kept work directories")
    ap.add_argument("--tests", action="append", metavar="FILE",
                    help="a test file to run instead of the module's mapped ones (repeatable; recorded in "
                         "the report)")
    ap.add_argument("--only", action="append", metavar="PATTERN",
                    help="run only the mutants whose names match (fnmatch; repeatable), e.g. "
                         "'toy_models.training.x_evaluate*'; the report says so")
    args = ap.parse_args(argv)
    if args.list:
        for m, t in MODULES.items():
            print(f"{m}: {' '.join(t)}")
        return 0
    if args.tests and len(args.modules) != 1:
        print("--tests needs exactly one module", file=sys.stderr)
        return 2
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"unknown module {unknown[0]!r}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    report_path = OUT / "report.json"
    old = json.loads(report_path.read_text()) if report_path.exists() else {}
    t0 = time.time()
    for m in args.modules or list(MODULES):
        # --collect of an interrupted run (no report entry yet): statuses as far as it got
        tests = args.tests or MODULES[m]
        previous = old.get(m, {"module": m, "tests": tests, "wall_s": None}) if args.collect else None
        r = run_module(m, tests, args.keep, previous, args.only)
        old[m] = r  # one module at a time: an interrupted run keeps what it measured
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(old, indent=1))
        tmp.replace(report_path)
        print(table([r]).splitlines()[-1], flush=True)
    text = table([old[m] for m in MODULES if m in old])
    (OUT / "report.txt").write_text(text + "\n")
    print(text)
    print(f"mutation testing took {time.time() - t0:.0f} s; report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
