"""Fused runs (tuning/fused.py, toy_models.batched.fit_many): K runs trained in one forward and
backward must end exactly where the same runs trained alone end, within fp32 rounding."""

import json

import pytest
import torch

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from toy_models.runs import load_tensors
from toy_models.batched import fold_states, runs_logits
from toy_models.tasks import TaskSpec
from tuning.fused import finetune_many, fusion_groups
from tuning.jobs import prepare_job
from tuning.pipeline import finetune, load_run
from tuning.registry import METHODS as REGISTRY
from tuning.sweep import sweep

from tests.tuning.conftest import pretrain_micro_add1

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
TRAIN = {"steps": 6, "batch_size": 16, "eval_every": 2, "eval_size": 32, "warmup": 2}
# runs of one group differ in task, seed, learning rate and clipping (the last one always clips,
# so a norm taken over the group instead of per run would show)
RUNS = [("add2", 0, {}), ("ascending", 1, {"lr": 3e-2}), ("add2", 2, {"lr": 2e-3, "grad_clip": 1e-3})]

# every gradient-trained registered method, with each of its declared examples (a searched method,
# the hard prompt, has no step to fuse: it trains alone, test_searched_method_trains_alone)
FUSABLE = [(name, ex) for name, cls in REGISTRY.items() if not cls.searched for ex in cls.examples]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrain_micro_add1(tmp_path_factory, 60)  # SPEC is conftest's MICRO_SPEC


def jobs_for(root, method, opts, train=TRAIN):
    return [dict(method=method, task=t, out=root / f"{method}-{t}-s{s}", opts=opts,
                 train={**train, **extra}, seed=s) for t, s, extra in RUNS]


def alone(base, job, out):
    return finetune(base, job["method"], job["task"], out, job["opts"], {**job["train"], "seed": job["seed"]})


def strip(m):
    return {k: v for k, v in m.items() if k != "timing"}


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(fused_dir, alone_dir):
    a, b = rows(fused_dir), rows(alone_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert {k: v for k, v in ra.items() if k != "loss"} == {k: v for k, v in rb.items() if k != "loss"}
    ta, tb = load_tensors(fused_dir / "method.safetensors"), load_tensors(alone_dir / "method.safetensors")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5)
    assert json.loads((fused_dir / "config.json").read_text()) == json.loads((alone_dir / "config.json").read_text())


@pytest.mark.parametrize("method,opts", FUSABLE, ids=lambda v: str(v))
def test_fused_runs_equal_runs_alone(base, tmp_path, method, opts):
    jobs = jobs_for(tmp_path / "fused", method, opts)
    calls = []
    fused = finetune_many(base, jobs, progress=lambda s, n, info: calls.append(info))
    k = 1 if REGISTRY[method].defaults.get("train_mode", True) else 3  # dropout on (full): each run alone
    assert calls and all(c.get("runs", 1) == k for c in calls), f"the three runs train in groups of {k}"
    for job, m in zip(jobs, fused):
        out = tmp_path / "alone" / job["out"].name
        assert strip(m) == strip(alone(base, job, out))
        assert_same_run(job["out"], out)
        assert m["timing"]["fused_runs"] == k
        loaded = load_run(job["out"])  # load_run reads a fused run unchanged
        assert loaded.config["task"] == job["task"] and loaded.state is not None


def test_runs_logits_folds_and_vmaps_to_the_runs_alone(base):
    run = load_run(base)
    model = run.model
    toks = torch.randint(0, SPEC.vocab_size - 1, (3, 5, SPEC.content_len))
    g = torch.Generator().manual_seed(0)
    prompts = [MethodState(prompt=torch.randn(2, model.cfg.d_model, generator=g)) for _ in range(3)]
    alone_ = torch.stack([model(toks[k], s) for k, s in enumerate(prompts)])
    torch.testing.assert_close(runs_logits(model, toks, prompts), alone_, rtol=1e-5, atol=1e-5)
    weights = [MethodState(weights={"blocks.0.mlp.W_in": model.blocks[0].mlp.W_in + 0.1 * torch.randn(
        model.blocks[0].mlp.W_in.shape, generator=g)}) for _ in range(3)]
    alone_ = torch.stack([model(toks[k], s) for k, s in enumerate(weights)])
    torch.testing.assert_close(runs_logits(model, toks, weights), alone_, rtol=1e-5, atol=1e-5)
    # a wrong fold (the runs' rows swapped) is caught
    assert not torch.allclose(runs_logits(model, toks.flip(0), prompts), alone_)
    with pytest.raises(ValueError):
        fold_states([prompts[0], MethodState(prompt=torch.zeros(1, model.cfg.d_model))], 5)


class Interrupt(Exception):
    pass


def test_interrupted_group_resumes_to_the_uninterrupted_result(base, tmp_path):
    method, opts = "prefix", {"length": 2, "share": "simple"}
    full = finetune_many(base, jobs_for(tmp_path / "full", method, opts))

    def stop_at_4(step, total, info):
        if step == 4 and info.get("eval"):
            raise Interrupt

    cut = jobs_for(tmp_path / "cut", method, opts)
    with pytest.raises(Interrupt):
        finetune_many(base, cut, progress=stop_at_4)
    assert all((j["out"] / "train_state.json").is_file() and not (j["out"] / "metrics.json").exists() for j in cut)
    resumed = finetune_many(base, cut)
    for a, b, j in zip(resumed, full, cut):
        assert strip(a) == strip(b)
        assert_same_run(j["out"], tmp_path / "full" / j["out"].name)
    # complete runs are reused, not retrained
    calls = []
    again = finetune_many(base, cut, progress=lambda *a: calls.append(a))
    assert not calls and [strip(a) for a in again] == [strip(a) for a in resumed]


def test_bad_jobs_are_refused_before_anything_is_written(base, tmp_path):
    good = jobs_for(tmp_path, "prefix", {"length": 2})
    for bad, match in [(dict(good[0], opts={"length": 9}), "does not fit"),
                       (dict(good[0], task="nope"), "unknown task"),
                       (dict(good[0], colour="red"), "unknown keys"),
                       (dict(good[1], out=good[0]["out"]), "same run directory")]:
        with pytest.raises(UserError, match=match):
            finetune_many(base, [good[0], bad])
        assert not any(tmp_path.iterdir())
    finetune_many(base, good[:1])
    with pytest.raises(UserError, match="other options"):  # a complete run with other options
        finetune_many(base, [dict(good[0], opts={"length": 1})])


def test_grouping(base):
    model = load_run(base).model
    from toy_models.pretraining import load_model
    m, bc = load_model(base)

    def job(method, opts, **train):
        return (0, prepare_job(m, bc, base, method, "add2", "/tmp/x", opts, {**TRAIN, **train}), False)

    items = [job("prefix", {"length": 2}), job("prefix", {"length": 2}, lr=1.0, seed=3),
             job("prefix", {"length": 1}), job("prefix", {"length": 2}, steps=8),
             job("lora", {"rank": 1}), job("full", {}),
             (0, prepare_job(m, bc, base, "prompt", "add2", "/tmp/x", {"length": 1}, {}), False),
             (0, prepare_job(m, bc, base, "prompt", "add2", "/tmp/x", {"length": 1}, {}), False)]
    sizes = sorted(len(g) for g in fusion_groups(items, model, True, None))
    # same structure and schedule length fuse; full (dropout) and searched prompts alone
    assert sizes == [1, 1, 1, 1, 1, 1, 2]
    assert all(len(g) == 1 for g in fusion_groups(items, model, False, None))
    assert sorted(len(g) for g in fusion_groups(items[:2], model, True, 1)) == [1, 1]


def test_sweep_writes_one_run_per_task_and_seed(base, tmp_path):
    res = sweep(base, "prefix", ["add2", "ascending"], tmp_path / "g", [0, 1], {"length": 1}, TRAIN)
    assert set(res) == {"add2", "ascending"}
    for t in res:
        assert (tmp_path / "g" / t / "summary.json").is_file()
        for s in (0, 1):
            assert load_run(tmp_path / "g" / t / f"seed{s}").config["seed"] == s
    one = sweep(base, "prefix", ["add2", "ascending"], tmp_path / "h", None, {"length": 1}, TRAIN, fuse=False)
    assert strip(one["add2"]) == strip(json.loads((tmp_path / "h" / "add2" / "metrics.json").read_text()))
    with pytest.raises(UserError, match="already exists"):
        sweep(base, "prefix", ["add2", "ascending"], tmp_path / "h", None, {"length": 1}, TRAIN)
    # one task: out/seed<N> and out/summary.json, fused or not, the same numbers
    a = sweep(base, "prefix", ["add2"], tmp_path / "s1", [0, 1], {"length": 1}, TRAIN)
    b = sweep(base, "prefix", ["add2"], tmp_path / "s2", [0, 1], {"length": 1}, TRAIN, fuse=False)
    assert a["add2"]["exact_acc"] == b["add2"]["exact_acc"]
    assert (tmp_path / "s1" / "seed1" / "metrics.json").is_file() and (tmp_path / "s1" / "summary.json").is_file()
    for bad, match in [(dict(seeds=[0, 0]), "repeats a seed"), (dict(seeds=[]), "at least one seed"),
                       (dict(tasks=["add2", "add2"]), "repeats a task"), (dict(method="dance"), "unknown method"),
                       (dict(opts={"rank": 2}), "does not apply to method prefix")]:
        args = dict(base=base, method="prefix", tasks=["add2", "ascending"], out=tmp_path / "bad", seeds=[0],
                    opts={"length": 1}, train=TRAIN) | bad
        with pytest.raises(UserError, match=match):
            sweep(**args)
        assert not (tmp_path / "bad").exists()


def test_searched_method_trains_alone_in_a_sweep(base, tmp_path):
    res = sweep(base, "prompt", ["add2", "ascending"], tmp_path / "p", [0, 1], {"length": 1},
                {"batch_size": 16, "eval_size": 32})
    for t in ("add2", "ascending"):
        for s in (0, 1):
            m = json.loads((tmp_path / "p" / t / f"seed{s}" / "metrics.json").read_text())
            assert m["search"]["kind"] == "exhaustive" and m["timing"]["fused_runs"] == 1
        assert res[t]["seeds"] == [0, 1]


def test_cli_finetune_several_tasks_and_seeds(base, tmp_path):
    from typer.testing import CliRunner
    from cli import app
    common = ["finetune", str(base), "--method", "prefix", "-P", "1", "--steps", "4", "--batch-size", "8",
              "--eval-every", "2"]
    r = CliRunner().invoke(app, common + ["--task", "add2,ascending", "--seeds", "0,1", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert all((tmp_path / "a" / t / f"seed{s}" / "metrics.json").is_file() for t in ("add2", "ascending") for s in (0, 1))
    r = CliRunner().invoke(app, common + ["--task", "add2", "--seeds", "0,1", "--no-fuse", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    fused = json.loads((tmp_path / "a" / "add2" / "summary.json").read_text())
    alone_ = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert fused["exact_acc"] == alone_["exact_acc"]
    r = CliRunner().invoke(app, common + ["--task", "add2", "--seeds", "0,1", "--resume", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and not (tmp_path / "c").exists()


def test_planned_groups_trained_apart_equal_one_call(base, tmp_path):
    """plan_groups names the groups finetune_many trains; each trained by a call of its own (as a
    parallel study does), then one call over all jobs reuses them and returns the same metrics."""
    from tuning.fused import plan_groups
    jobs = (jobs_for(tmp_path / "a" / "p2", "prefix", {"length": 2}) + jobs_for(tmp_path / "a" / "lora", "lora", {"rank": 1})
            + jobs_for(tmp_path / "a" / "p1", "prefix", {"length": 1}, {**TRAIN, "steps": 4}))
    groups = plan_groups(base, jobs)
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    for g in groups:
        finetune_many(base, [jobs[i] for i in g])
    calls = []
    apart = finetune_many(base, jobs, progress=lambda *a: calls.append(a))
    assert not calls, "the collecting call retrained a run"
    together = finetune_many(base, [dict(j, out=tmp_path / "b" / j["out"].parent.name / j["out"].name) for j in jobs])
    assert [strip(m) for m in apart] == [strip(m) for m in together]
    assert plan_groups(base, jobs) == []  # every run complete: nothing left to train


def test_cpu_caps_fused_groups(base, tmp_path):
    """On the CPU a group holds at most CPU_MAX_FUSED runs (fusing more was slower there); an
    explicit max_fused wins, and one below 1 is refused."""
    from tuning.fused import CPU_MAX_FUSED, plan_groups
    jobs = [dict(method="prefix", task="add2", out=tmp_path / f"s{s}", opts={"length": 1}, train=TRAIN, seed=s)
            for s in range(CPU_MAX_FUSED + 2)]
    assert [len(g) for g in plan_groups(base, jobs)] == [CPU_MAX_FUSED, 2]
    assert [len(g) for g in plan_groups(base, jobs, max_fused=100)] == [CPU_MAX_FUSED + 2]
    with pytest.raises(UserError, match="max_fused"):
        plan_groups(base, jobs, max_fused=0)
