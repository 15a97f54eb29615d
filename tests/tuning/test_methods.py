"""Every method's numbers against a hand computation (docs/papers.md §1), its defaults pinned, and a
saved and reloaded run that gives the logits it gave before saving.

`reference_logits` is the toy model written out from its definition (pre-LN GPT-2 block, the
slot protocols, prefix keys/values before the content keys), independent of toy_models/model.py's
fused projections, masks, shared head and functional_call. Each method's state is rebuilt by hand
from the method's own parameters (`hand_state`), so a method that hands the forward anything else,
or a forward that uses it otherwise, fails here."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import micro_model
from toy_models.model import MethodState
from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig
from tuning import METHODS, FullFinetune, LoRA, Prefix, SoftPrompt, make_method
from tuning.lora import DEFAULT_TARGETS, TARGETS
from tuning.jobs import TUNE_DEFAULTS, finish_job, prepare_job, start_job
from tuning.pipeline import load_run

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_logits(model, tokens, state: MethodState | None = None):
    """[batch, prompt slots + T, vocab], computed from the definitions, one position at a time."""
    cfg, st = model.cfg, state or MethodState()
    W = {**dict(model.named_parameters()), **st.weights}
    B, T = tokens.shape
    P = 0 if st.prompt is None else st.prompt.shape[-2]
    rows = [W["embed.W_E"][tokens]]
    if cfg.slots == "token":  # prefix slots, vacant slots, prompt, then SLOT tokens to n_prompt
        taken = st.max_prefix_len + st.vacant + P
        first = taken - P
        rows.insert(0, W["embed.W_E"][cfg.d_vocab - 1].expand(B, cfg.n_prompt - taken, -1))
    else:
        first = cfg.n_prompt - P
    if P:
        rows.insert(0, st.prompt.expand(B, P, -1))
    x = torch.cat(rows, 1)
    x = x + W["pos_embed.W_pos"][first:first + x.shape[1]]
    N = x.shape[1]
    for l in range(cfg.n_layers):
        g = lambda n: W[f"blocks.{l}.{n}"]
        h = ln(x, g("ln1.w"), g("ln1.b"), cfg.layer_norm_eps) if cfg.ln_before_attn else x
        q, k, v = (torch.einsum("bnd,hde->bhne", h, g(f"attn.W_{c}")) + g(f"attn.b_{c}")[:, None]
                   for c in "QKV")
        pk = None if st.prefix_k is None else st.prefix_k[l]
        if pk is not None:  # [head, P, d_head]: keys every query sees, before the content's
            k = torch.cat([pk.expand(B, *pk.shape), k], 2)
            v = torch.cat([st.prefix_v[l].expand(B, *pk.shape), v], 2)
        Pk = k.shape[2] - N
        out = torch.zeros_like(x)
        for i in range(N):
            s = (q[:, :, i:i + 1] @ k[:, :, :Pk + i + 1].transpose(-1, -2)) / math.sqrt(cfg.d_head)
            z = s.softmax(-1) @ v[:, :, :Pk + i + 1]  # [B, head, 1, d_head]
            out[:, i] = torch.einsum("bhe,hed->bd", z[:, :, 0], g("attn.W_O")) + g("attn.b_O")
        x = x + out
        if not cfg.attn_only:
            x = x + gelu(ln(x, g("ln2.w"), g("ln2.b"), cfg.layer_norm_eps) @ g("mlp.W_in") + g("mlp.b_in")) \
                @ g("mlp.W_out") + g("mlp.b_out")
    return ln(x, W["ln_final.w"], W["ln_final.b"], cfg.layer_norm_eps) @ W["unembed.W_U"] + W["unembed.b_U"]


def lora_delta(target, A, B, like):
    """(A @ B) as the change of the parameter `like` that the linear map in -> out is stored in."""
    d = A @ B
    H = like.shape[0]
    if target in ("q", "k", "v"):  # [head, d_model, d_head]: d_model -> head*d_head
        return d.view(like.shape[1], H, like.shape[2]).permute(1, 0, 2)
    if target == "o":  # [head, d_head, d_model]: head*d_head -> d_model
        return d.view(H, like.shape[1], like.shape[2])
    return d


def hand_state(m) -> MethodState:
    """The method's state, rebuilt from its parameters by the formulas of docs/papers.md §1."""
    base = dict(m.base.named_parameters())
    cfg = m.base.cfg
    if isinstance(m, FullFinetune):
        return MethodState(weights={k.replace("__", "."): v for k, v in m.weights.items()})
    if isinstance(m, LoRA):
        s = m.opts["alpha"] / m.opts["rank"]
        w = {}
        for l in range(cfg.n_layers):
            for t in m.opts["targets"]:
                name = f"blocks.{l}.{TARGETS[t]}"
                key = name.replace(".", "__")
                w[name] = base[name] + s * lora_delta(t, m.A[key], m.B[key], base[name])
        return MethodState(weights=w)
    if isinstance(m, SoftPrompt):
        return MethodState(prompt=m.prompt)
    L, (H, Dh) = m.n_prefix_layers, (cfg.n_heads, cfg.d_head)
    share = m.opts["share"]
    if share == "none":
        ks, vs = list(m.k), list(m.v)
    elif share == "simple":  # p^K = W_K LN(p) + b_K, p^V = W_V LN(p) + b_V, the layer's frozen maps
        ks, vs = [], []
        for l in range(L):
            g = lambda n: base[f"blocks.{l}.{n}"]
            h = ln(m.p[l], g("ln1.w"), g("ln1.b"), cfg.layer_norm_eps) if cfg.ln_before_attn else m.p[l]
            ks.append(torch.einsum("pd,hde->hpe", h, g("attn.W_K")) + g("attn.b_K")[:, None])
            vs.append(torch.einsum("pd,hde->hpe", h, g("attn.W_V")) + g("attn.b_V")[:, None])
    else:  # [p^K; p^V] = Linear(h -> 2d)(tanh(Linear(d -> h)(p'))), per layer or one for all
        mlp = lambda net, x: torch.tanh(x @ net[0].weight.T + net[0].bias) @ net[2].weight.T + net[2].bias
        if m.opts["mlp"] == "shared":
            out = mlp(m.mlps[0], m.p).view(-1, L, 2, H, Dh).permute(1, 2, 3, 0, 4)  # [L, 2, H, P, Dh]
        else:
            out = torch.stack([mlp(net, m.p[l]).view(-1, 2, H, Dh).permute(1, 2, 0, 3) for l, net in enumerate(m.mlps)])
        if hasattr(m, "kv0"):
            out = out + m.kv0
        ks, vs = list(out[:, 0]), list(out[:, 1])
    pad = [None] * (cfg.n_layers - L)
    return MethodState(prefix_k=ks + pad, prefix_v=vs + pad)


VARIANTS = [
    ("full", {}),
    ("lora", {}),
    ("lora", {"rank": 2, "alpha": 3.0}),
    ("lora", {"rank": 2, "targets": ["q", "k", "v", "o", "mlp_in", "mlp_out"]}),
    ("soft_prompt", {"length": 2}),
    ("prefix", {"length": 2, "share": "none"}),
    ("prefix", {"length": 2, "share": "simple"}),
    ("prefix", {"length": 3, "share": "simple", "depth": "shallow"}),
    ("prefix", {"length": 2, "share": "deep", "hidden": 8}),
    ("prefix", {"length": 2, "share": "deep", "hidden": 8, "mlp": "per_layer"}),
    ("prefix", {"length": 2, "share": "simple", "init": "slot"}),
    ("prefix", {"length": 1, "share": "none", "init": "slot"}),
    ("prefix", {"length": 2, "share": "deep", "hidden": 8, "init": "slot"}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in VARIANTS]


def scramble(m, seed):
    """Every trainable tensor moved to random, nonzero values: no default init is left."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 + p.detach().abs().mean()))
    return m


def two_layers(slots="token"):
    spec = TaskSpec(length=4, num_digits=4, prompt_len=4)
    return spec, micro_model(spec, seed=3, n_layers=2, slots=slots)


@pytest.mark.parametrize("method,opts", VARIANTS, ids=IDS)
def test_every_method_matches_its_hand_computation(method, opts):
    spec, model = two_layers()
    toks = torch.randint(0, spec.vocab_size - 1, (3, spec.content_len), generator=torch.Generator().manual_seed(1))
    m = scramble(make_method(method, model, generator=torch.Generator().manual_seed(0), **opts), 5)
    want = reference_logits(model, toks, hand_state(m))
    with torch.no_grad():
        st = m.state()
        fast = model(toks, st)
        tail = model.content_logits(toks, st)  # the shared-head path, when it applies
        explicit, _ = model.run_with_cache(toks, st)  # with a hook: the explicit softmax, every position
    assert (fast - want).abs().max() < 1e-4
    assert (explicit - want).abs().max() < 1e-4
    assert (tail - want[:, -toks.shape[1]:]).abs().max() < 1e-4
    hooked = model(toks, st)  # no hooks again: same numbers
    assert torch.equal(hooked, fast)
    # and the method changes the base's logits, so the comparison above is not the base's
    T = toks.shape[1]
    assert (want[:, -T:] - reference_logits(model, toks)[:, -T:]).abs().max() > 1e-2


def test_reference_forward_is_the_base_model_under_both_slot_protocols():
    for slots in ("token", "empty"):
        spec, model = two_layers(slots)
        toks = torch.randint(0, spec.vocab_size - 1, (2, spec.content_len), generator=torch.Generator().manual_seed(2))
        assert (model(toks) - reference_logits(model, toks)).abs().max() < 1e-4
        sp = scramble(SoftPrompt(model, length=2), 1)
        assert (model(toks, sp.state()) - reference_logits(model, toks, hand_state(sp))).abs().max() < 1e-4


@pytest.mark.parametrize("rank,alpha", [(1, None), (2, None), (2, 5.0), (3, 0.5)])
def test_lora_is_w_plus_alpha_over_r_a_b_on_each_default_target(rank, alpha):
    spec, model = two_layers()
    m = LoRA(model, rank=rank, alpha=alpha, generator=torch.Generator().manual_seed(0))
    scramble(m, 2)
    scale = (alpha if alpha is not None else rank) / rank  # alpha defaults to r: scale 1
    assert m.scale == scale
    base = dict(model.named_parameters())
    got = m.state().weights
    assert set(got) == {f"blocks.{l}.{n}" for l in range(2) for n in ("attn.W_O", "mlp.W_in", "mlp.W_out")}
    for l in range(2):
        H, Dh, D = base[f"blocks.{l}.attn.W_O"].shape
        a, b = (x[f"blocks__{l}__attn__W_O"] for x in (m.A, m.B))
        assert a.shape == (H * Dh, rank) and b.shape == (rank, D)
        for h in range(H):  # head h's rows of the (head, d_head) -> d_model map
            want = base[f"blocks.{l}.attn.W_O"][h] + scale * a[h * Dh:(h + 1) * Dh] @ b
            assert torch.allclose(got[f"blocks.{l}.attn.W_O"][h], want, atol=1e-6)
        for n in ("mlp.W_in", "mlp.W_out"):
            a, b = (x[f"blocks__{l}__{n.replace('.', '__')}"] for x in (m.A, m.B))
            assert torch.allclose(got[f"blocks.{l}.{n}"], base[f"blocks.{l}.{n}"] + scale * a @ b, atol=1e-6)


def test_lora_on_query_key_value_maps_d_model_to_each_head():
    spec, model = two_layers()
    m = scramble(LoRA(model, rank=2, targets=["q", "k", "v"]), 4)
    base = dict(model.named_parameters())
    for c in "QKV":
        name = f"blocks.1.attn.W_{c}"
        a, b = m.A[name.replace(".", "__")], m.B[name.replace(".", "__")]
        H, D, Dh = base[name].shape
        for h in range(H):
            want = base[name][h] + (a @ b)[:, h * Dh:(h + 1) * Dh]
            assert torch.allclose(m.state().weights[name][h], want, atol=1e-6)


def test_method_defaults_are_the_documented_ones():
    """docs/methods.md and docs/papers.md §3b: LoRA rank 1 on attention output and both MLP layers
    (never q/k/v), alpha = r, A ~ N(0, 1/d_in), B = 0; the training recipes per method."""
    assert DEFAULT_TARGETS == ("o", "mlp_in", "mlp_out")
    assert TARGETS == {"q": "attn.W_Q", "k": "attn.W_K", "v": "attn.W_V", "o": "attn.W_O",
                       "mlp_in": "mlp.W_in", "mlp_out": "mlp.W_out"}
    sig = lambda cls: {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                       if v.default is not inspect.Parameter.empty}
    assert sig(LoRA) == {"rank": 1, "alpha": None, "targets": DEFAULT_TARGETS, "init_b": "zero", "generator": None}
    assert sig(SoftPrompt) == {"length": 1, "init": "random", "tokens": None, "generator": None}
    assert sig(Prefix) == {"length": 1, "share": "simple", "depth": "deep", "hidden": None, "mlp": None,
                           "init_scale": 1.0, "init": "normal", "generator": None}
    ctx = dict(weight_decay=0.0, train_mode=False, schedule="constant", warmup=0)
    assert LoRA.defaults == dict(lr=5e-3, **ctx)
    assert SoftPrompt.defaults == dict(lr=3e-2, **ctx)
    assert Prefix.defaults == dict(lr=1e-2, **ctx)
    assert FullFinetune.defaults == dict(lr=1e-3, weight_decay=0.1, train_mode=True)
    assert TUNE_DEFAULTS == dict(steps=1000, warmup=50, schedule="cosine", eval_every=100)
    assert set(METHODS) == {"full", "lora", "soft_prompt", "prefix", "prompt", "prefix_plus"}


def test_lora_init_and_what_each_method_trains():
    spec = TaskSpec(prompt_len=4)
    from toy_models.model import ToyTransformer, preset_config
    model = ToyTransformer(preset_config("default", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=4))
    m = LoRA(model, generator=torch.Generator().manual_seed(0))
    assert m.opts == {"rank": 1, "alpha": 1.0, "targets": ["o", "mlp_in", "mlp_out"], "init_b": "zero"}
    for key in m.A:
        d_in = m.A[key].shape[0]
        assert torch.count_nonzero(m.B[key]) == 0
        assert 0.7 < m.A[key].std().item() * math.sqrt(d_in) < 1.3, key  # N(0, 1/d_in)
    D, Hid = model.cfg.d_model, model.cfg.mlp_width
    assert m.n_params == 2 * (D + D + D + Hid + Hid + D)  # per layer: o (D->D), W_in (D->4D), W_out (4D->D)
    assert FullFinetune(model).n_params == sum(p.numel() for p in model.parameters())
    assert SoftPrompt(model, length=3).n_params == 3 * D
    assert Prefix(model, length=2).n_params == 2 * 2 * D  # one residual vector per slot per layer
    assert Prefix(model, length=2, share="none").n_params == 2 * 2 * 2 * D  # keys and values
    assert Prefix(model, length=2, depth="shallow").n_params == 2 * D
    assert Prefix(model, length=2, share="deep").opts["hidden"] == 2 * D
    # the no-decay rule: context methods never decay; full FT decays matrices but not embeddings
    ft = FullFinetune(model)
    assert [n for n, p in ft.named_parameters() if not ft.no_decay(n, p)] == \
        [n for n, p in ft.named_parameters() if p.ndim >= 2 and not n.endswith(("W_E", "W_pos"))]
    assert all(m.no_decay(n, p) for n, p in m.named_parameters())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "b"
    pretrain(path, "add1", "micro", SPEC, TrainConfig(steps=2, batch_size=8, eval_every=2, eval_size=8, warmup=1))
    return path


@pytest.mark.parametrize("method,opts", VARIANTS, ids=IDS)
def test_saved_and_reloaded_run_gives_the_same_logits(base_run, tmp_path, method, opts):
    """A tuned run with random, nonzero tensors, saved by the pipeline's own writer and loaded
    back, gives the logits its method gave before saving (not those of a fresh method)."""
    from toy_models.pretraining import load_model
    model, base_config = load_model(base_run)
    job = prepare_job(model, base_config, base_run, method, "add2", tmp_path / "t", opts, {"steps": 1})
    start_job(job, overwrite=False, resume=False, device=torch.device("cpu"))
    scramble(job.method, 7)
    toks = torch.from_numpy(np.random.default_rng(0).integers(0, SPEC.num_digits, (4, SPEC.content_len)))
    with torch.no_grad():
        before = model(toks, job.method.state())
        fresh = model(toks, make_method(method, model, generator=torch.Generator().manual_seed(0), **opts).state())
    assert (before - fresh).abs().max() > 1e-3  # a reload that ignored the file would show
    finish_job(job, {"exact_acc": 0.0})
    run = load_run(tmp_path / "t")
    with torch.no_grad():
        after = run.model(toks, run.state)
    assert torch.equal(after, before)
    assert run.method.n_params == job.method.n_params
    for k, v in job.method.state_dict().items():
        assert torch.equal(run.method.state_dict()[k], v), k


def test_lora_options_and_their_errors():
    """Bad ranks and targets are one-line errors naming the option; an attention-only model drops
    the MLP targets; the init is the generator's (same seed, same tensors); init_b 'normal' is
    N(0, 0.02²)."""
    from prefixlab_common.errors import UserError
    spec, model = two_layers()
    with pytest.raises(UserError, match=r"^LoRA rank r must be positive, got 0$"):
        LoRA(model, rank=0)
    known = "q, k, v, o, mlp_in, mlp_out"
    with pytest.raises(UserError, match=rf"^unknown LoRA target 'w'; known: {known}$"):
        LoRA(model, targets=["o", "w"])
    with pytest.raises(UserError, match=rf"^unknown LoRA target ''; known: {known}$"):
        LoRA(model, targets=[])
    attn = micro_model(spec, n_layers=2, attn_only=True)
    m = LoRA(attn)
    assert m.opts["targets"] == ["o"] and set(m.state().weights) == {"blocks.0.attn.W_O", "blocks.1.attn.W_O"}
    same = [LoRA(model, rank=2, init_b="normal", generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    other = LoRA(model, rank=2, init_b="normal", generator=torch.Generator().manual_seed(5))
    for key in same[0].A:
        assert torch.equal(same[0].A[key], same[1].A[key]) and torch.equal(same[0].B[key], same[1].B[key])
        assert not torch.equal(same[0].A[key], other.A[key]) and not torch.equal(same[0].B[key], other.B[key])
    big = LoRA(micro_model(TaskSpec(prompt_len=2), d_model=64), rank=8, init_b="normal",
               generator=torch.Generator().manual_seed(0))
    assert 0.015 < torch.cat([b.flatten() for b in big.B.values()]).std().item() < 0.025
