"""Devices: --device auto|cpu|cuda|mps, runs that record where they trained, checkpoints that load
anywhere, and the attention fast path (SDPA) against the explicit softmax that hooks read."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from tests.conftest import micro_model
from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from toy_models.pretraining import load_model, pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig, resolve_device
from tuning.pipeline import finetune, load_run

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
TINY = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup=2, eval_every=3, eval_size=16)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    for bad in ("tpu", "cuda:x", "gpu", ""):
        with pytest.raises(UserError):
            resolve_device(bad)


@no_cuda
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="cuda is not available"):
        resolve_device("cuda")


@no_cuda
@pytest.mark.parametrize("argv", [["pretrain", "--preset", "micro", "--steps", "2", "--out", "OUT"],
                                  ["finetune", "RUN", "--method", "prefix", "--task", "add1", "--out", "OUT"],
                                  ["evaluate", "RUN"], ["probe", "RUN", "--out", "OUT"],
                                  ["report", "RUN", "--html", "OUT"]])
def test_cli_bad_device_is_one_line_exit_2_nothing_written(tmp_path, argv):
    out = tmp_path / "out"
    names = {"RUN": str(tmp_path / "missing"), "OUT": str(out)}
    argv = [names.get(a, a) for a in argv] + ["--device", "cuda"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "cuda is not available" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def keys(d) -> set:
    return set(d) | {k for v in d.values() if isinstance(v, dict) for k in keys(v)} if isinstance(d, dict) else set()


def test_runs_record_the_device_outside_config(tmp_path):
    pretrain(tmp_path / "b", "add1", "micro", SPEC, TINY, device="cpu")
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert prov["device"] == "cpu" and prov["autocast"] is None
    assert prov["torch_threads"] == torch.get_num_threads()  # float order depends on it
    assert "device" not in keys(json.loads((tmp_path / "b" / "config.json").read_text()))
    finetune(tmp_path / "b", "prefix", "add2", tmp_path / "t", {"length": 1},
             {"steps": 3, "batch_size": 8, "eval_every": 3, "eval_size": 16}, device="auto")
    prov = json.loads((tmp_path / "t" / "provenance.json").read_text())
    assert prov["device"] == str(resolve_device("auto"))
    assert "device" not in keys(json.loads((tmp_path / "t" / "config.json").read_text()))


def test_fast_attention_equals_the_explicit_path_and_hooks_force_the_explicit_one(spec):
    model = micro_model(spec)
    toks = torch.randint(0, spec.vocab_size - 1, (4, spec.content_len))
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    states = [None, MethodState(prompt=torch.randn(2, cfg.d_model, generator=g)),
              MethodState(prefix_k=[torch.randn(cfg.n_heads, 2, cfg.d_head, generator=g) for _ in range(cfg.n_layers)],
                          prefix_v=[torch.randn(cfg.n_heads, 2, cfg.d_head, generator=g) for _ in range(cfg.n_layers)])]
    for st in states:
        assert not model.has_hooks()
        fast = model(toks, st)
        model.fast_attention = False
        explicit = model(toks, st)
        model.fast_attention = True
        torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)
        logits, cache = model.run_with_cache(toks, state=st)  # hooks attached: the explicit path
        assert torch.equal(logits, explicit)
        P = 0 if st is None or st.prefix_k is None else 2
        slots = model.cfg.n_prompt if model.cfg.slots == "token" else (st.prompt_len if st else 0)
        T = toks.shape[1] + slots
        assert cache["blocks.0.attn.hook_pattern"].shape == (4, cfg.n_heads, T, P + T)
        assert not model.has_hooks()
    seen = []
    model.blocks[0].attn.hook_pattern.add_hook(lambda x, hook: seen.append(x.shape))
    assert model.has_hooks()
    model(toks)
    model.reset_hooks()
    assert seen and not model.has_hooks()


def test_checkpoints_are_cpu_tensors_and_load_on_the_cpu(tmp_path):
    from toy_models.runs import load_tensors
    pretrain(tmp_path / "b", "add1", "micro", SPEC, TINY)
    assert all(t.device.type == "cpu" for t in load_tensors(tmp_path / "b" / "model.safetensors").values())
    model, _ = load_model(tmp_path / "b", device="cpu")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_loads_on_the_cpu_and_resumes_across_devices(tmp_path):
    m = pretrain(tmp_path / "b", "add1", "micro", SPEC, TINY, device="cuda")
    assert json.loads((tmp_path / "b" / "provenance.json").read_text())["device"].startswith("cuda")
    model, _ = load_model(tmp_path / "b")  # trained on the GPU, loads on the CPU
    assert next(model.parameters()).device.type == "cpu"
    finetune(tmp_path / "b", "prefix", "add2", tmp_path / "t", {"length": 1},
             {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_size": 16}, device="cuda")
    run = load_run(tmp_path / "t")  # on the CPU
    assert run.state.prefix_k[0].device.type == "cpu"
    gpu = load_run(tmp_path / "t", device="cuda")
    toks = torch.randint(0, SPEC.vocab_size - 1, (2, SPEC.content_len))
    torch.testing.assert_close(gpu.model(toks.cuda(), gpu.state).cpu(), run.model(toks, run.state),
                               rtol=1e-4, atol=1e-4)
    # what the GPU run reported is what its checkpoint scores, within one of the 16 test samples
    from tests.toy_models.test_training import reevaluate
    assert abs(m["exact_acc"] - reevaluate(tmp_path / "b", "add1", 16)["exact_acc"]) <= 1 / 16


def test_bf16_autocast_on_the_cpu_is_opt_in_and_trains(tmp_path, monkeypatch):
    # bf16 is asked for by name; the CPU is told it has native bf16, so the test runs on any CPU
    monkeypatch.setattr("toy_models.precision.cpu_bf16_flags", lambda *a: ("avx512_bf16",))
    base = pretrain(tmp_path / "fp32", "add1", "micro", SPEC, TINY)
    bf16 = pretrain(tmp_path / "bf16", "add1", "micro", SPEC, TINY, precision="bf16")
    assert json.loads((tmp_path / "fp32" / "provenance.json").read_text())["autocast"] is None
    assert json.loads((tmp_path / "bf16" / "provenance.json").read_text())["autocast"] == "bf16"
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    fp = [json.loads(line) for line in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] * 1.5 and rows[-1]["loss"] != fp[-1]["loss"]  # bf16 really ran
    assert base["steps"] == bf16["steps"]
    # its reported accuracy is its checkpoint's (evaluated here in fp32), within one test sample
    from tests.toy_models.test_training import reevaluate
    assert abs(bf16["exact_acc"] - reevaluate(tmp_path / "bf16", "add1", TINY.eval_size)["exact_acc"]) <= 1 / TINY.eval_size


@pytest.mark.parametrize("slots,ln,attn_only", [("token", True, False), ("token", False, False),
                                                ("token", True, True), ("empty", True, False)])
def test_shared_head_is_computed_once_and_equals_the_explicit_path(slots, ln, attn_only, monkeypatch):
    """Leading positions that are the same in every sequence (SLOT tokens, a shared soft prompt)
    run once at batch 1 in the fast path, their keys/values a prefix for the content: logits and
    gradients equal the explicit path's. Per-sequence prompts, dropout in training and wanting
    the head's own logits take the ordinary forward."""
    from toy_models.model import ToyConfig, ToyTransformer
    cfg = ToyConfig(n_layers=3, n_heads=2, d_model=16, d_vocab=12, n_ctx=20, n_prompt=5, slots=slots,
                    ln_before_attn=ln, attn_only=attn_only)
    torch.manual_seed(0)
    model = ToyTransformer(cfg).eval()
    shared = []
    real = model._forward_shared_head
    monkeypatch.setattr(model, "_forward_shared_head", lambda *a: shared.append(a[2]) or real(*a))
    toks = torch.randint(0, 11, (6, 9))
    g = torch.Generator().manual_seed(1)
    pk = [torch.randn(2, 2, 8, generator=g, requires_grad=True) for _ in range(3)]
    pv = [torch.randn(2, 2, 8, generator=g, requires_grad=True) for _ in range(3)]
    pr = torch.randn(2, 16, generator=g, requires_grad=True)
    name = "blocks.1.attn.W_Q"
    w = (model.get_parameter(name) + 0.1 * torch.randn(model.get_parameter(name).shape, generator=g)).requires_grad_()
    leaves = [pr, *pk, *pv, w]
    states = {"none": None, "prompt": MethodState(prompt=pr), "prefix": MethodState(prefix_k=pk, prefix_v=pv),
              "prompt+prefix": MethodState(prompt=pr, prefix_k=pk, prefix_v=pv),
              "weights": MethodState(weights={name: w}),
              "per-sequence prompt": MethodState(prompt=pr.expand(6, 2, 16))}
    for label, st in states.items():
        for last in (9, 2, None):
            outs = []
            for fast in (True, False):
                model.fast_attention = fast
                shared.clear()
                y = model(toks, st, last=last)
                outs.append((y, torch.autograd.grad(y.square().sum(), leaves, allow_unused=True), list(shared)))
            model.fast_attention = True
            (a, ga, sa), (b, gb, sb) = outs
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            for x, y in zip(ga, gb):
                assert (x is None) == (y is None)
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
            # token: the slots a prefix does not take (its keys/values replace them); empty: the prompt
            taken = st.max_prefix_len if st is not None else 0
            head = cfg.n_prompt - taken if slots == "token" else (2 if st is not None and st.prompt is not None else 0)
            expect = head if last is not None and label != "per-sequence prompt" and head else None
            assert sa == ([expect] if expect else []), (label, last)
            assert not sb
    model.train()  # dropout on: every sequence has its own masks, so nothing is shared
    shared.clear()
    model(toks, None, last=9)
    assert not shared
