"""Every registered method (tuning/registry.py), with each of its declared examples, through the
same checks: its declarations agree with its code, it trains (or searches) on a micro task,
leaves the base byte-identical, saves and loads back to the same logits, and folds to the common
prefix layout where it has one. A new method is covered here by its registry line alone."""

import inspect

import numpy as np
import pytest
import torch

from prefixlab_common.errors import UserError
from toy_models.pretraining import load_model
from toy_models.runs import load_tensors
from toy_models.tasks import TaskSpec, resolve_task, sample_batch
from toy_models.training import loss_on
from tuning.jobs import TUNE_DEFAULTS
from tuning.pipeline import budget_match, finetune, load_run
from tuning.registry import METHODS, make_method, method_class, options_by_flag

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)  # the conftest base's spec
CASES = [(name, ex) for name, cls in METHODS.items() for ex in cls.examples]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}" for m, o in CASES]
TRAIN = {"steps": 12, "batch_size": 16, "eval_every": 12, "eval_size": 32, "warmup": 2}


def train_for(cls) -> dict:
    """The shared training options, less those the method does not read (a searched prompt)."""
    return {k: v for k, v in TRAIN.items() if cls.train_options is None or k in cls.train_options}


@pytest.fixture(scope="module")
def base_run(micro_add1_base):
    return micro_add1_base  # tests/tuning/conftest.py


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_options_are_the_constructor_s(name):
    """Each declared option is a constructor keyword with the declared default, and back."""
    cls = METHODS[name]
    sig = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
           if k not in ("self", "model", "generator")}
    assert {o.name: o.default for o in cls.options} == sig
    assert cls.summary and all(o.help and o.source for o in cls.options)
    assert cls.examples, "every method declares at least one example"
    assert cls.budget_option is None or cls.budget_option in sig


def test_one_flag_per_option_name_means_the_same_everywhere():
    for name, users in options_by_flag().items():
        kinds = {(o.type, o.many, o.short) for _, o in users}
        assert len(kinds) == 1, f"--{name} is declared differently by {[m for m, _ in users]}"


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_declared_parameter_count_is_the_built_one(base_run, method, opts):
    model, _ = load_model(base_run)
    m = make_method(method, model, generator=torch.Generator().manual_seed(0), **opts)
    assert METHODS[method].param_count(model, **opts) == m.n_params


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_every_method_tunes_saves_loads_and_leaves_the_base(base_run, tmp_path, method, opts):
    cls = METHODS[method]
    before = (base_run / "model.safetensors").read_bytes()
    model, _ = load_model(base_run)
    task = resolve_task("add2", SPEC)
    batch = sample_batch(task, SPEC, 128, np.random.default_rng(9))
    with torch.no_grad():
        start = make_method(method, model, generator=torch.Generator().manual_seed(0), **opts)
        loss0 = loss_on(model, batch, start.state()).item()
    m = finetune(base_run, method, "add2", tmp_path / "t", opts, train_for(cls))
    run = load_run(tmp_path / "t")
    assert (base_run / "model.safetensors").read_bytes() == before, "the base checkpoint is untouched"
    assert m["n_params"] == run.method.n_params == cls.param_count(run.model, **opts)
    assert run.config["method"]["name"] == method
    saved = load_tensors(tmp_path / "t" / "method.safetensors")
    for k, v in run.method.state_dict().items():
        assert torch.equal(saved[k], v), k
    with torch.no_grad():
        loss1 = loss_on(run.model, batch, run.state).item()
        again = make_method(method, run.model, **opts)
        again.load_export(saved)
        assert torch.equal(run.model(batch.content, again.state()), run.model(batch.content, run.state))
    if not opts.get("tokens"):  # a given hard prompt is fixed: nothing to improve
        assert loss1 < loss0, "tuning lowers the loss on the new task"
    if hasattr(run.method, "export_layout"):  # the common per-layer prefix layout
        layout = run.method.export_layout()
        cfg = run.model.cfg
        assert all(v.shape == (cfg.n_heads, run.method.opts["length"], cfg.d_head) for v in layout.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_options_of_other_methods_are_refused_by_name(base_run, name):
    model, _ = load_model(base_run)
    with pytest.raises(UserError, match=rf"^option --no-such-option does not apply to method {name}"):
        make_method(name, model, no_such_option=1)
    with pytest.raises(UserError, match="unknown method 'dance'"):
        method_class("dance")


def test_budget_match_reads_the_registry(base_run):
    model, _ = load_model(base_run)
    for name, cls in METHODS.items():
        if cls.budget_option is None:
            with pytest.raises(UserError, match="no size option"):
                budget_match(model, 100, name)
        else:
            v, n = budget_match(model, 100, name)
            assert n == cls.param_count(model, **{cls.budget_option: v})
    assert TUNE_DEFAULTS["steps"] == 1000
