import numpy as np
import pytest
import torch

from tests.conftest import micro_model
from tests.tuning.conftest import pretrain_micro_add1
from prefixlab_common.errors import UserError
from tuning.pipeline import load_run
from toy_models.tasks import TaskSpec, resolve_task, sample_batch
from toy_models.training import TrainConfig, Trainable, fit, loss_on
from tuning import METHODS, Prefix, SoftPrompt, hard_prompt_state, make_method
from tuning.pipeline import budget_match, finetune

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)

# every gradient-trained registered method, with each of its declared examples (the searched
# hard prompt: tests/tuning/test_prompt.py), plus variants that exercise more options
VARIANTS = [(name, ex) for name, cls in METHODS.items() if not cls.searched for ex in cls.examples] + [
    ("prefix", {"length": 3, "share": "none", "init": "slot"}),
    ("prefix", {"length": 2, "share": "deep", "hidden": 8, "init": "slot"}),
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A micro model that solves add1; tuning it towards add2 is a shifted output it can reach."""
    return pretrain_micro_add1(tmp_path_factory, 150)  # SPEC is conftest's MICRO_SPEC


@pytest.mark.parametrize("method,opts", VARIANTS, ids=lambda v: str(v))
def test_every_method_trains_and_freezes_the_base(base_run, tmp_path, method, opts):
    run = load_run(base_run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    task = resolve_task("add2", SPEC)
    batch = sample_batch(task, SPEC, 256, np.random.default_rng(9))
    m = make_method(method, run.model, generator=torch.Generator().manual_seed(0), **opts)
    with torch.no_grad():
        loss0 = loss_on(run.model, batch, m.state()).item()
    cfg = TrainConfig(**{"warmup": 3, **METHODS[method].defaults, "steps": 30, "batch_size": 32,
                         "eval_every": 30, "eval_size": 32})
    fit(run.model, Trainable(dict(m.named_parameters()), m.state, m.no_decay), task, SPEC, cfg)
    with torch.no_grad():
        loss1 = loss_on(run.model, batch, m.state()).item()
    assert loss1 < loss0, "the loss must fall"
    # only the method's parameters changed: every base weight is bit-identical
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the pipeline writes a run that loads back (its logits against the method's own state before
    # saving: tests/tuning/test_methods.py::test_saved_and_reloaded_run_gives_the_same_logits)
    out = finetune(base_run, method, "add2", tmp_path / "t", opts,
                   {"steps": 5, "batch_size": 8, "eval_every": 5, "eval_size": 16, "warmup": 1})
    tuned = load_run(tmp_path / "t")
    assert len(tuned.config["base"]["sha256"]) == 64
    assert out["n_params"] == tuned.method.n_params == m.n_params


@pytest.mark.parametrize("method,opts", [("lora", {"rank": 2}), ("lora", {"rank": 1, "targets": ["q", "k"]})])
def test_zero_init_is_a_no_op(model, spec, method, opts):
    toks = sample_batch(resolve_task("add1", spec), spec, 4, np.random.default_rng(0)).content
    m = make_method(method, model, **opts)
    assert torch.equal(model(toks, m.state()), model(toks))
    assert torch.equal(model(toks, make_method("full", model).state()), model(toks))


def test_soft_prompt_from_hard_tokens_equals_hard_prompting(model, spec):
    toks = sample_batch(resolve_task("add1", spec), spec, 4, np.random.default_rng(0)).content
    hard = [spec.slot_token, 3]
    sp = SoftPrompt(model, init="tokens", tokens=hard)
    assert torch.equal(model(toks, sp.state()), model(toks, hard_prompt_state(model, hard)))


@pytest.mark.parametrize("mlp", ["shared", "per_layer"])
def test_deep_share_folded_equals_unfolded(spec, mlp):
    model = micro_model(spec, n_layers=2)
    toks = sample_batch(resolve_task("add1", spec), spec, 4, np.random.default_rng(0)).content
    p = Prefix(model, length=3, share="deep", hidden=8, mlp=mlp, generator=torch.Generator().manual_seed(1))
    folded = p.fold()
    assert folded.opts["share"] == "none"
    assert torch.allclose(model(toks, p.state()), model(toks, folded.state()), atol=1e-6)
    layout = p.export_layout()
    assert layout["blocks.1.prefix_k"].shape == (model.cfg.n_heads, 3, model.cfg.d_head)


def test_shallow_prefix_only_touches_layer_0(spec):
    model = micro_model(spec, n_layers=2)
    st = Prefix(model, length=2, depth="shallow").state()
    assert st.prefix_k[0] is not None and st.prefix_k[1] is None


def test_parameter_budget_helper_reproduces_papers_e4():
    from toy_models.model import ToyTransformer, preset_config
    spec = TaskSpec(prompt_len=12)
    model = ToyTransformer(preset_config("petrov-e3", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=12))
    lora = make_method("lora", model, rank=1)
    assert lora.n_params == 12_288
    assert budget_match(model, lora.n_params, "prefix", share="simple") == (12, 12_288)
    assert budget_match(model, 12_288, "lora") == (1, 12_288)


@pytest.mark.parametrize("method,opts,match", [
    ("dance", {}, "unknown method"),
    ("prefix", {"length": 0}, "positive"),
    ("lora", {"rank": 0}, "positive"),
    ("soft_prompt", {"length": -1}, "positive"),
    ("prefix", {"length": 4}, "does not fit"),
    ("soft_prompt", {"length": 4}, "does not fit"),
    ("prefix", {"share": "everything"}, "unknown prefix share"),
    ("lora", {"targets": ["w"]}, "unknown LoRA target"),
])
def test_bad_method_input(model, method, opts, match):
    with pytest.raises(UserError, match=match):
        make_method(method, model, **opts)


def test_mismatched_or_changed_base_is_refused(base_run, tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    finetune(base, "prefix", "add2", tmp_path / "t", {"length": 1},
             {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_size": 8, "warmup": 1})
    ck = base / "model.safetensors"
    from toy_models.runs import load_tensors, save_tensors
    t = load_tensors(ck)
    t["unembed.b_U"] = t["unembed.b_U"] + 1
    save_tensors(ck, t)
    with pytest.raises(UserError, match="changed since it was tuned"):
        load_run(tmp_path / "t")


@pytest.mark.parametrize("share", ["simple", "none", "deep"])
def test_slot_init_prefix_starts_as_the_base(share):
    """Under the token protocol, a prefix started from the base's own slot inputs is a no-op,
    with any P up to the slots; the [P] N(0,1) init is not."""
    spec = TaskSpec(length=4, num_digits=4, prompt_len=5)
    model = micro_model(spec, slots="token", n_layers=2)
    toks = torch.randint(0, spec.vocab_size - 1, (4, spec.content_len))
    base = model.content_logits(toks)
    for P in (1, 3, 5):
        m = make_method("prefix", model, length=P, share=share, init="slot", hidden=8)
        assert (model.content_logits(toks, m.state()) - base).abs().max() <= 1e-5
        if share == "deep":  # the start is exact, and training moves it (the output layer gets gradients)
            m.state().prefix_k[0].sum().backward()
            assert m.mlps[0][2].weight.grad.abs().max() > 0
    m = make_method("prefix", model, length=3, share=share, generator=torch.Generator().manual_seed(0))
    assert (model.content_logits(toks, m.state()) - base).abs().max() > 1e-3


def test_slot_init_and_protocol_mismatch_are_refused(base_run, tmp_path):
    empty = micro_model(SPEC, slots="empty")
    with pytest.raises(UserError, match="--slots token"):
        make_method("prefix", empty, length=1, init="slot")
    with pytest.raises(UserError, match="slot protocol"):
        finetune(base_run, "prefix", "add2", tmp_path / "x", {"length": 1}, {"steps": 2}, slots="empty")
    assert not (tmp_path / "x").exists()


def test_tuned_run_of_another_protocol_is_refused(base_run, tmp_path):
    import json
    out = tmp_path / "p"
    finetune(base_run, "prefix", "add2", out, {"length": 1}, {"steps": 2, "eval_every": 2, "eval_size": 16})
    load_run(out)  # its own protocol: fine
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "slots": "empty"}))
    with pytest.raises(UserError, match="'empty' slot protocol"):
        load_run(out)
