"""A micro add1 base shared by the registry and prompt tests (one pretraining per module)."""

import pytest

from toy_models.pipeline import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig

MICRO_SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


@pytest.fixture(scope="module")
def micro_add1_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "add1"
    pretrain(path, "add1", "micro", MICRO_SPEC, TrainConfig(steps=120, batch_size=32, lr=1e-2, warmup=10,
                                                             eval_every=120, eval_size=64))
    return path
