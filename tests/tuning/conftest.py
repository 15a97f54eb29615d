"""Micro add1 bases for the tuning tests (one pretraining per module)."""

import pytest

from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig

MICRO_SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


def pretrain_micro_add1(tmp_path_factory, steps: int):
    """A micro add1 base pretrained for `steps` (the tuning tests' bases differ only in steps)."""
    path = tmp_path_factory.mktemp("base") / "add1"
    pretrain(path, "add1", "micro", MICRO_SPEC, TrainConfig(steps=steps, batch_size=32, lr=1e-2, warmup=10,
                                                             eval_every=steps, eval_size=64))
    return path


@pytest.fixture(scope="module")
def micro_add1_base(tmp_path_factory):
    return pretrain_micro_add1(tmp_path_factory, 120)
