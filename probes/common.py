"""The one mechanism every probe uses: two forwards of the frozen model on the same inputs, one
without and one with a method state, read through the same hooks, in batches (memory grows
linearly with the number of inputs; no full cache is ever held for all of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyTransformer, base_view
from toy_models.pretraining import LoadedRun
from toy_models.tasks import fixed_test_set, resolve_task


@dataclass
class Pair:
    """Caches of one batch: base and method forward, plus the layout of the method forward:
    `n_pre` keys that the method adds (prefix slots, or soft-prompt positions) come first, and the
    base's queries (its remaining SLOT tokens under the `token` protocol, then the content) are
    the last T rows. The base forward is `base_view(state)`: no method, same SLOT tokens."""

    base: dict[str, Tensor]
    method: dict[str, Tensor]
    tokens: Tensor
    base_logits: Tensor
    method_logits: Tensor

    @property
    def T(self) -> int:
        """Positions of the base forward (remaining SLOT tokens, then content)."""
        return self.base_logits.shape[1]

    def n_pre(self, layer: int) -> int:
        return self.method[f"blocks.{layer}.attn.hook_pattern"].shape[-1] - self.T

    def content_pattern(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(A^pt over content keys, prefix mass alpha, base pattern A), content queries only:
        [batch, head, T, T], [batch, head, T], [batch, head, T, T]."""
        A = self.base[f"blocks.{layer}.attn.hook_pattern"]
        Apt = self.method[f"blocks.{layer}.attn.hook_pattern"][:, :, -self.T:]
        n = self.n_pre(layer)
        return Apt[..., n:], Apt[..., :n].sum(-1), A

    def renormalized(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(A^pt over content / (1 - alpha), alpha, A). 1 - alpha is taken as the content mass
        itself, which equals it exactly but avoids cancellation when alpha is close to 1."""
        Apt, alpha, A = self.content_pattern(layer)
        return Apt / Apt.sum(-1, keepdim=True), alpha, A


def require_state(state: MethodState | None) -> MethodState:
    if state is None:
        raise UserError("a probe compares a method with its base model; this is a base run with no "
                        "method (pass a tuned run)")
    return state


def hook_names(model: ToyTransformer, kinds: tuple[str, ...], layers: list[int] | None = None) -> list[str]:
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    names = []
    for l in layers:
        for k in kinds:
            names.append(f"blocks.{l}.{k}")
    return names


@torch.no_grad()
def paired_forwards(model: ToyTransformer, state: MethodState, tokens: Tensor, names: list[str],
                    batch_size: int = 250) -> Iterator[Pair]:
    model.eval()
    keep = set(names)
    base = base_view(model.cfg, state)
    for i in range(0, tokens.shape[0], batch_size):
        toks = tokens[i:i + batch_size]
        bl, bc = model.run_with_cache(toks, state=base, names_filter=lambda n: n in keep)
        ml, mc = model.run_with_cache(toks, state=state, names_filter=lambda n: n in keep)
        yield Pair(dict(bc), dict(mc), toks, bl, ml)


class Accumulator:
    """One probe's running statistics: the hooks it reads, an update per batch of paired
    forwards, and a finish. Several probes share one pass (`accumulate`), so each batch's base
    and method forwards run once for all of them."""

    names: list[str]

    def update(self, pair: Pair) -> None:
        raise NotImplementedError

    def finish(self):
        raise NotImplementedError


def accumulate(model: ToyTransformer, state: MethodState, tokens: Tensor, accs: list[Accumulator],
               batch_size: int = 250) -> list:
    names = sorted({n for a in accs for n in a.names})
    for pair in paired_forwards(model, state, tokens, names, batch_size):
        for a in accs:
            a.update(pair)
    return [a.finish() for a in accs]


def check_layers_heads(model: ToyTransformer, layers: list[int] | None, heads: list[int] | None):
    cfg = model.cfg
    layers = list(range(cfg.n_layers)) if layers is None else layers
    heads = list(range(cfg.n_heads)) if heads is None else heads
    for l in layers:
        if not 0 <= l < cfg.n_layers:
            raise UserError(f"layer {l} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    for h in heads:
        if not 0 <= h < cfg.n_heads:
            raise UserError(f"head {h} is out of range: the model has heads 0..{cfg.n_heads - 1}")
    return layers, heads


def tolist(x):
    if isinstance(x, Tensor):
        return x.tolist()
    return x


def probe_inputs(run: LoadedRun, n: int, seed: int = 4321) -> Tensor:
    """Content tokens of n fixed test inputs of the run's task."""
    if n <= 0:
        raise UserError(f"--inputs must be positive, got {n}")
    return fixed_test_set(resolve_task(run.config["task"], run.spec), run.spec, n, seed).content


@dataclass(frozen=True)
class Probe:
    """What a probe declares about itself (one per probe file; probes/registry.py lists them).

    Per run (`accumulator`): its statistics over the paired base/method forwards of a run's own
    test inputs, sharing one pass with the other per-run probes; `verdict(result)` gives the
    identity it checks as (name, holds, value), or None when it checks none.
    Across runs (`across`): one result over several runs of one base, (runs, n_inputs, key) ->
    result, where key(run) names each run's points."""

    name: str
    summary: str
    accumulator: Callable | None = None  # (model, layers, heads, n_inputs) -> Accumulator
    verdict: Callable | None = None
    across: Callable | None = None
