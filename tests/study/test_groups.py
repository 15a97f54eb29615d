"""A parallel study trains a stage's independent groups of runs as tasks of their own
(`engine.groups`, installed by `engine.parallel` inside a Ray stage task)."""

from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig
from engine.groups import use_group_runner
from study.experiments.toy import run_jobs
from tuning.fused import finetune_many

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=2)
TRAIN = {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_size": 16}


def test_run_jobs_hands_its_groups_to_the_runner(tmp_path):
    base = tmp_path / "base"
    pretrain(base, "add1", "micro", SPEC, TrainConfig(steps=10, batch_size=16, eval_every=10, eval_size=16))
    jobs = [{"name": f"{m}{s}", "method": m, "task": "add2", "out": tmp_path / "runs" / f"{m}-{s}",
             "opts": o, "train": {**TRAIN, "steps": n}, "seed": s}
            for m, o, n in (("prefix", {"length": 1}, 4), ("lora", {"rank": 1}, 6)) for s in (0, 1)]
    seen = []

    def runner(base_, groups, device):  # what a Ray study does, here in-process
        seen.append(sorted(j["out"].name for j in g) for g in groups)
        for g in groups:
            finetune_many(base_, g, None, device)

    with use_group_runner(runner):
        metrics = run_jobs(base, jobs)
    # the longest group first
    assert [sorted(g) for g in seen[0]] == [["lora-0", "lora-1"], ["prefix-0", "prefix-1"]]
    alone = run_jobs(base, [dict(j, out=tmp_path / "seq" / j["out"].name) for j in jobs])
    strip = lambda m: {k: v for k, v in m.items() if k != "timing"}  # noqa: E731
    assert [strip(m) for m in metrics] == [strip(m) for m in alone]
