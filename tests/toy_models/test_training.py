import json

import numpy as np

import pytest
import torch

from prefixlab_common.errors import UserError
from toy_models.pretraining import load_model, pretrain
from tuning.pipeline import load_run
from toy_models.runs import load_tensors
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


def tiny_train(**kw):
    return TrainConfig(**{"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup": 5, "eval_every": 10,
                          "eval_size": 64, **kw})


def test_pretrain_writes_a_complete_run(tmp_path):
    m = pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train())
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.json", "provenance.json", "metrics.jsonl", "metrics.json", "model.safetensors"} <= files
    assert not any(f.startswith("train_state") or f.endswith(".tmp") for f in files)
    prov = json.loads((tmp_path / "r" / "provenance.json").read_text())
    assert prov["seed"] == 0 and "torch" in prov["versions"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    # the metrics it returns are those of the saved checkpoint on the task's fixed test set
    assert m == json.loads((tmp_path / "r" / "metrics.json").read_text())
    again = reevaluate(tmp_path / "r", "add1", 64)
    assert (m["exact_acc"], m["token_acc"]) == (again["exact_acc"], again["token_acc"])


def reevaluate(path, task, n):
    from toy_models.tasks import fixed_test_set, resolve_task
    from toy_models.training import evaluate
    model, _ = load_model(path)
    return evaluate(model, None, fixed_test_set(resolve_task(task, SPEC), SPEC, n))


def test_checkpoint_round_trip(tmp_path):
    pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train(steps=10))
    model, config = load_model(tmp_path / "r")
    tensors = load_tensors(tmp_path / "r" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[k])
    # the checkpoint's own JSON config rebuilds the model
    from safetensors import safe_open
    with safe_open(str(tmp_path / "r" / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["prefixlab"])
    assert meta["config"] == config["model"]


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = pretrain(tmp_path / "full", "ascending", "micro", SPEC, tiny_train())

    def stop_at_20(step, total, info):
        if step == 20 and info.get("eval"):
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(tmp_path / "cut", "ascending", "micro", SPEC, tiny_train(), progress=stop_at_20)
    assert (tmp_path / "cut" / "train_state.json").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = pretrain(tmp_path / "cut", "ascending", "micro", SPEC, tiny_train(), resume=True)
    strip = lambda m: {k: v for k, v in m.items() if k != "timing"}
    assert strip(resumed) == strip(full)
    a, b = load_tensors(tmp_path / "full" / "model.safetensors"), load_tensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda p: [{k: v for k, v in json.loads(l).items()} for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")


def test_a_kill_between_the_checkpoints_two_files_resumes_exactly(tmp_path, monkeypatch):
    """SIGKILL after train_state.safetensors (step 20) but before train_state.json (still step 10):
    the resumed run continues from the step its tensors belong to and ends as the uninterrupted one
    (the failure guarded against: replaying steps 10-20 on step-20 tensors)."""
    from toy_models.runs import RunDir
    full = pretrain(tmp_path / "full", "ascending", "micro", SPEC, tiny_train())
    real = RunDir.write_json

    def killed_at_20(self, name, obj):
        if name == "train_state.json" and obj["step"] == 20:
            raise Interrupt
        return real(self, name, obj)

    monkeypatch.setattr(RunDir, "write_json", killed_at_20)
    with pytest.raises(Interrupt):
        pretrain(tmp_path / "cut", "ascending", "micro", SPEC, tiny_train())
    monkeypatch.setattr(RunDir, "write_json", real)
    assert json.loads((tmp_path / "cut" / "train_state.json").read_text())["step"] == 10
    resumed = pretrain(tmp_path / "cut", "ascending", "micro", SPEC, tiny_train(), resume=True)
    strip = lambda m: {k: v for k, v in m.items() if k != "timing"}
    assert strip(resumed) == strip(full)
    a, b = load_tensors(tmp_path / "full" / "model.safetensors"), load_tensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten(tmp_path):
    pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train(steps=10))
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train(steps=10, seed=1))
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train(steps=10, seed=1), overwrite=True)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() != before


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    pretrain(tmp_path / "r", "add1", "micro", SPEC, tiny_train(steps=10))
    ck = tmp_path / "r" / "model.safetensors"
    good = ck.read_bytes()
    ck.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_run(tmp_path / "r")
    ck.write_bytes(good)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["model"]["d_model"] = 32
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match"):
        load_run(tmp_path / "r")
    with pytest.raises(UserError, match="no run"):
        load_run(tmp_path / "nothing")


def test_learning_rate_schedules():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_frac=0.1)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert TrainConfig(schedule="constant", warmup=0, lr=0.5).lr_at(500) == 0.5


def test_greedy_exact_accuracy_matches_teacher_forced_identity(tmp_path):
    from toy_models.tasks import fixed_test_set, resolve_task
    from toy_models.training import evaluate
    pretrain(tmp_path / "r", "ascending", "micro", SPEC, tiny_train(steps=60))
    model, _ = load_model(tmp_path / "r")
    test = fixed_test_set(resolve_task("ascending", SPEC), SPEC, 200)
    m = evaluate(model, None, test)
    gen = model.generate(test.x, test.y.shape[1])
    assert m["exact_acc"] == pytest.approx((gen == test.y).all(1).float().mean().item())
    assert m["token_acc"] == pytest.approx((gen == test.y).float().mean().item())


def test_finite_training_set_draws_only_from_its_pool():
    from toy_models.tasks import resolve_task, sample_batch, step_rng
    from toy_models.training import next_batch
    task = resolve_task("add1", SPEC)
    cfg = TrainConfig(batch_size=8, train_size=5)
    pool = sample_batch(task, SPEC, 5, step_rng(0, 0, stream=1))
    rows = {tuple(r) for r in pool.x.tolist()}
    for step in range(20):
        b = next_batch(task, SPEC, cfg, step, pool)
        assert {tuple(r) for r in b.x.tolist()} <= rows
    assert next_batch(task, SPEC, cfg, 3, pool).x.tolist() == next_batch(task, SPEC, cfg, 3, pool).x.tolist()
    with pytest.raises(UserError, match="train-size"):
        TrainConfig(train_size=0)


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    """Results are written atomically through a temporary file; they end up as readable as any
    file the user writes (0644 under the usual umask 022), not 0600."""
    import os
    import stat
    from toy_models.runs import save_tensors, write_json
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "a.safetensors", {"t": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "a.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_training_at_two_threads_ends_in_the_same_bits_every_time(tmp_path):
    """At 2 threads some CPU backward kernels sum in a varying order; training takes torch's
    deterministic kernels, so a run repeats bit for bit (and the caller's setting comes back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for i in range(3):
            pretrain(tmp_path / f"r{i}", "mix4", "petrov-e3", TaskSpec(prompt_len=12),
                     tiny_train(steps=2, batch_size=64, eval_every=2, eval_size=16),
                     {"d_model": 32, "n_layers": 2})
    finally:
        torch.set_num_threads(threads)
    runs = [load_tensors(tmp_path / f"r{i}" / "model.safetensors") for i in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])
    assert not torch.are_deterministic_algorithms_enabled()


class Oracle(torch.nn.Module):
    """A mix4 predictor without a network: after y1..yk it predicts the next output of the
    answer most of the four alternatives still consistent with y1..yk share (ties: the first), the
    Bayes predictor of `exact_ceiling`. answers (x -> y): it knows the true answer instead.
    wrong_first: y1 is always predicted wrong."""

    def __init__(self, task, L, answers=None, wrong_first=False):
        super().__init__()
        self.task, self.L, self.answers, self.wrong_first = task, L, answers, wrong_first
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device off a parameter
        self.calls = []

    def forward(self, tokens, state=None, last=None):
        L, V = self.L, SPEC_MIX.vocab_size
        x = tokens[:, :L].numpy()
        outs = np.stack([self.task.solve(x, np.full(len(x), a)) for a in range(4)], 1)  # [B, 4, L]
        first = tokens.shape[1] - last
        self.calls.append((tokens.shape[1], last))
        logits = torch.zeros(tokens.shape[0], last, V)
        for j, p in enumerate(range(first, tokens.shape[1])):
            k = p + 1 - L  # outputs seen before this prediction
            if k < 0:
                continue
            seen = tokens[:, L:L + k].numpy()
            for b in range(len(x)):
                cand = [tuple(o) for o in outs[b] if (o[:k] == seen[b]).all()] or [tuple(outs[b][0])]
                best = max(cand, key=cand.count) if self.answers is None else self.answers[x[b].tobytes()]
                guess = (best[0] + 1) % SPEC_MIX.num_digits if (k == 0 and self.wrong_first) else best[k]
                logits[b, j, guess] = 1.0
        return logits

    @torch.no_grad()
    def generate(self, x, n_new, state=None):
        seq = x
        for _ in range(n_new):
            seq = torch.cat([seq, self(seq, state, last=1)[:, -1].argmax(-1, keepdim=True)], 1)
        return seq[:, x.shape[1]:]


SPEC_MIX = TaskSpec(prompt_len=1)


@pytest.fixture(scope="module")
def mix4_test():
    from toy_models.tasks import fixed_test_set, resolve_task
    task = resolve_task("mix4", SPEC_MIX)
    return task, fixed_test_set(task, SPEC_MIX, 400)


def test_evaluate_with_y1_given_scores_y2_to_yl_only(mix4_test):
    """[P]'s mix4 protocol: y1 is given and not scored. A predictor right on y2..yL and wrong on
    every y1 scores 100 % with provide_first, 0 % without; its greedy decoding starts after y1."""
    from toy_models.training import evaluate
    task, test = mix4_test
    answers = {x.tobytes(): tuple(y) for x, y in zip(test.x.numpy(), test.y.numpy())}
    assert len(answers) == len(test)
    oracle = Oracle(task, SPEC_MIX.length, answers, wrong_first=True)
    given = evaluate(oracle, None, test, provide_first=True)
    assert given["exact_acc"] == 1.0 and given["token_acc"] == 1.0 and given["teacher_forced_token_acc"] == 1.0
    assert given["provide_first"] is True and given["n"] == 400
    # the teacher-forced forward reads L logits; greedy decoding starts from X and y1 and makes L-1 tokens
    L = SPEC_MIX.length
    assert oracle.calls[0] == (2 * L - 1, L)  # X and y1..y(L-1)
    assert oracle.calls[1:] == [(L + 1 + i, 1) for i in range(L - 1)]
    oracle.calls.clear()
    blind = evaluate(oracle, None, test, provide_first=False)
    assert blind["exact_acc"] == 0.0 and blind["provide_first"] is False
    assert blind["teacher_forced_token_acc"] == pytest.approx((L - 1) / L)
    assert oracle.calls[1:] == [(L + i, 1) for i in range(L)]


def test_a_perfect_mix4_predictor_meets_the_ceiling(mix4_test):
    """The Bayes predictor's exact accuracy with y1 given is exact_ceiling up to its tie-breaking
    (it picks the first of tied answers; the ceiling counts each with its share), and far above
    the ceiling without y1."""
    from toy_models.tasks import exact_ceiling
    from toy_models.training import evaluate
    task, test = mix4_test
    oracle = Oracle(task, SPEC_MIX.length)
    got = evaluate(oracle, None, test, provide_first=True)
    ceiling = exact_ceiling(task, test, True)
    assert 0.9 < ceiling < 1.0
    assert abs(got["exact_acc"] - ceiling) <= 0.02
    assert got["token_acc"] >= got["exact_acc"]
    blind = evaluate(oracle, None, test, provide_first=False)
    assert abs(blind["exact_acc"] - exact_ceiling(task, test, False)) <= 0.05
    assert blind["exact_acc"] < 0.4 < got["exact_acc"]


# --------------------------------------------------------------------------------------------
# One run through `fit` and through the batched loop (toy_models/batched.py): the same run.


def _micro_model(dropout: float):
    from toy_models.model import preset_config
    from toy_models.pretraining import build_model
    from toy_models.training import Trainable
    cfg = preset_config("micro", d_vocab=SPEC.vocab_size, n_ctx=SPEC.n_ctx, n_prompt=SPEC.prompt_len, dropout=dropout)
    model = build_model(cfg, 0)
    return model, Trainable(dict(model.named_parameters()), lambda: None,
                            no_decay=lambda n, p: p.ndim < 2 or n.endswith(("W_E", "W_pos")))


def _train_one(path, via: str, cfg: TrainConfig, resume: bool = False, stop_at_step: int | None = None):
    """One micro pretraining run, by `fit` or by `fit_many` with one member; returns its
    result (timing dropped), progress calls, final parameters and optimizer checkpoint."""
    from toy_models.batched import Member, fit_many
    from toy_models.runs import RunDir
    from toy_models.tasks import resolve_task
    from toy_models.training import fit
    model, tr = _micro_model(dropout=0.1)
    task, run, calls = resolve_task("add1", SPEC), RunDir(path), []
    run.path.mkdir(exist_ok=True)

    def progress(step, total, info):
        calls.append((step, total, info))
        if step == stop_at_step:
            raise Interrupt

    if via == "fit":
        result = fit(model, tr, task, SPEC, cfg, run=run, resume=resume, progress=progress)
    else:
        result = fit_many(model, [Member(tr, task, cfg, run, resume)], SPEC, progress)[0]
    timing = result.pop("timing")
    assert timing["fused_runs"] == 1 and timing["seqs_per_s"] > 0
    return result, calls, {k: v.clone() for k, v in tr.params.items()}, load_tensors(path / "train_state.safetensors")


@pytest.mark.parametrize("kw", [dict(), dict(train_size=24, stop_at=0.0, eval_every=7)],
                         ids=["fresh-samples-dropout", "finite-pool-early-stop"])
def test_fit_and_the_batched_loop_train_one_run_identically(tmp_path, kw):
    """Same seed, fp32: `fit` and `fit_many([one run])` give the same losses, learning rates,
    evaluations, progress calls, final metrics, parameters and optimizer state, bit for bit."""
    cfg = tiny_train(**kw)
    a = _train_one(tmp_path / "fit", "fit", cfg)
    b = _train_one(tmp_path / "batched", "batched", cfg)
    assert a[0] == b[0] and a[1] == b[1]
    assert (tmp_path / "fit" / "metrics.jsonl").read_text() == (tmp_path / "batched" / "metrics.jsonl").read_text()
    for got, want in ((a[2], b[2]), (a[3], b[3])):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert len({info["loss"] for _, _, info in a[1]}) == len(a[1]) > 1  # it trained: the loss moved every step
    if "stop_at" in kw:  # stopped at its first evaluation
        assert a[0]["steps"] == 7 and [c[0] for c in a[1]] == list(range(1, 8))


def test_a_run_checkpointed_by_fit_resumes_in_the_batched_loop_and_back(tmp_path):
    """Interrupted after its step-20 checkpoint, a run resumed by the other loop ends exactly as
    the uninterrupted one: both loops read and write the same checkpoints."""
    cfg = tiny_train()
    full = _train_one(tmp_path / "full", "fit", cfg)
    for first, then in (("fit", "batched"), ("batched", "fit")):
        with pytest.raises(Interrupt):
            _train_one(tmp_path / first, first, cfg, stop_at_step=20)
        resumed = _train_one(tmp_path / first, then, cfg, resume=True)
        assert resumed[0] == full[0] and [c[0] for c in resumed[1]] == list(range(21, 41))
        assert all(torch.equal(resumed[2][k], full[2][k]) for k in full[2])
        assert (tmp_path / first / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
