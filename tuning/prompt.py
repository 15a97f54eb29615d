"""Prompting (a hard prompt): P real tokens of the toy vocabulary in the prompt slots; nothing is
trained. [P]'s hierarchy (docs/papers.md §1): prompting ⊆ soft prompting ⊆ prefix-tuning; a hard prompt
is the soft prompt whose embeddings are rows of W_E, so its state takes the soft prompt's path.

The vocabulary is small (V = 12 at [P]'s sizes), so the prompt is found by search, scored by the
training loss on one batch: every one of the V^P prompts when that is at most `max_candidates`
(exhaustive), else greedy coordinate search (each sweep tries every token at each position in
turn, keeping a change only if it lowers the loss; at most `sweeps` sweeps, from SLOT tokens).
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from toy_models.tasks import Batch, sample_batch, step_rng
from tuning.base import Method, positive
from tuning.options import Option
from tuning.soft_prompt import hard_prompt_state

SEARCHES = ("auto", "exhaustive", "greedy")


class HardPrompt(Method):
    name = "prompt"
    summary = "prompting: P real tokens in the prompt slots, found by search (nothing trained)"
    options = (
        Option("length", int, 1, "prompt/prefix length P", "[P] E1/E2 (docs/papers.md §3)", short="-P"),
        Option("tokens", int, None,
               "token ids, e.g. 11,3: soft_prompt starts from them with --init tokens; for prompt, the prompt itself (no search)",
               "the user's choice", many=True, default_text="none: the prompt is searched"),
        Option("search", str, "auto", "prompt: exhaustive, greedy, or auto (exhaustive when V^P <= --max-candidates)",
               "the lab's choice"),
        Option("max_candidates", int, 20_000, "prompt: the most prompts an exhaustive search scores",
               "the lab's choice: V^P for P <= 3 at [P]'s V = 12 (1,728), a few seconds on a micro model"),
        Option("sweeps", int, 3, "prompt: greedy coordinate sweeps at most", "the lab's choice"),
    )
    examples = ({"length": 1}, {"length": 2, "search": "greedy"}, {"tokens": [1, 2]})
    slot_label = "HP"
    searched = True
    # the search reads one batch of the training stream: its seed and size; the test set's size
    train_options = ("seed", "batch_size", "train_size", "eval_size")
    defaults = dict(steps=1, batch_size=256, warmup=0, schedule="constant", train_mode=False)

    def __init__(self, model, length: int = 1, tokens: list[int] | None = None, search: str = "auto",
                 max_candidates: int = 20_000, sweeps: int = 3, generator: torch.Generator | None = None):
        V = model.cfg.d_vocab
        if search not in SEARCHES:
            raise UserError(f"unknown prompt search {search!r}; use one of {', '.join(SEARCHES)}")
        if tokens:
            if search != "auto":
                raise UserError("--tokens gives the prompt: it is not searched (drop --search)")
            if any(not 0 <= t < V for t in tokens):
                raise UserError(f"prompt tokens must be in 0..{V - 1}")
            length = len(tokens)
        length = positive("prompt length P", length)
        if length > model.cfg.n_prompt:
            raise UserError(f"a prompt of length {length} does not fit the model's "
                            f"{model.cfg.n_prompt} prompt slots (pretrain with a larger --prompt-len)")
        max_candidates = positive("--max-candidates", max_candidates)
        sweeps = positive("--sweeps", sweeps)
        if search == "exhaustive" and V ** length > max_candidates:
            raise UserError(f"an exhaustive search of P={length} scores V^P = {V ** length:,} prompts, over "
                            f"--max-candidates {max_candidates:,}: raise it or use --search greedy")
        super().__init__(model, length=length, tokens=list(tokens or []), search=search,
                         max_candidates=max_candidates, sweeps=sweeps)
        start = tokens or [V - 1] * length  # the SLOT token (the last of the vocabulary)
        self.register_buffer("tokens", torch.tensor(start, dtype=torch.long))

    @classmethod
    def param_count(cls, model, **opts) -> int:
        return 0  # P discrete choices, no trained tensor

    @classmethod
    def describe(cls, opts: dict) -> str:
        return f"hard prompt (P={opts.get('length')})"

    def state(self) -> MethodState:
        return hard_prompt_state(self.base, self.tokens)

    def search(self, model, task, spec, cfg) -> dict:
        """Find the prompt of least training loss on one batch (the batch a fit with
        train_size = its size would train on); returns the search's record."""
        t0 = time.perf_counter()
        batch = search_batch(task, spec, cfg)
        batch = Batch(*(t.to(self.tokens.device) for t in (batch.x, batch.y, batch.which)))
        if self.opts["tokens"]:
            kind, best, scored = "given", self.tokens.clone(), 1
            loss = prompt_losses(model, best[None], batch)[0].item()
        elif self.opts["search"] == "greedy" or (self.opts["search"] == "auto" and
                                                  model.cfg.d_vocab ** self.opts["length"] > self.opts["max_candidates"]):
            kind = "greedy"
            best, loss, scored = greedy_search(model, batch, self.tokens.clone(), self.opts["sweeps"])
        else:
            kind = "exhaustive"
            best, loss, scored = exhaustive_search(model, batch, self.opts["length"])
        self.tokens.copy_(best)
        return {"kind": kind, "tokens": best.tolist(), "train_loss": loss, "candidates": scored,
                "batch": len(batch), "seconds": time.perf_counter() - t0}


def search_batch(task, spec, cfg) -> Batch:
    """The batch a search scores: the finite pool a fit with train_size = n draws (training.py)."""
    n = cfg.train_size or cfg.batch_size
    return sample_batch(task, spec, n, step_rng(cfg.seed, 0, stream=1))


@torch.no_grad()
def prompt_losses(model, candidates: torch.Tensor, batch: Batch, max_rows: int = 8192) -> torch.Tensor:
    """[C] mean cross-entropy on Y of each candidate prompt [C, P] over `batch`: the candidates'
    embeddings fold into the batch as per-sequence prompts (as fused runs fold their states)."""
    model.eval()
    B, L = len(batch), batch.y.shape[1]
    W_E = model.embed.W_E
    per = max(1, max_rows // B)
    out = []
    for i in range(0, candidates.shape[0], per):
        c = candidates[i:i + per]
        prompt = W_E[c].repeat_interleave(B, 0)  # [c*B, P, d_model]
        logits = model(batch.content.repeat(c.shape[0], 1), MethodState(prompt=prompt), last=L)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.repeat(c.shape[0], 1).reshape(-1),
                             reduction="none")
        out.append(ce.view(c.shape[0], B * L).mean(1))
    return torch.cat(out)


def exhaustive_search(model, batch: Batch, length: int) -> tuple[torch.Tensor, float, int]:
    """Every prompt of `length` tokens; the first of least loss (in lexicographic order)."""
    V = model.cfg.d_vocab
    cands = torch.tensor(list(itertools.product(range(V), repeat=length)), dtype=torch.long,
                         device=batch.x.device)
    losses = prompt_losses(model, cands, batch)
    i = int(torch.argmin(losses))  # argmin returns the first minimum
    return cands[i], float(losses[i]), len(cands)


def greedy_search(model, batch: Batch, start: torch.Tensor, sweeps: int) -> tuple[torch.Tensor, float, int]:
    """Coordinate descent over positions: a token changes only if it lowers the loss."""
    V = model.cfg.d_vocab
    cur = start.clone()
    loss = float(prompt_losses(model, cur[None], batch)[0])
    scored = 1
    for _ in range(sweeps):
        changed = False
        for pos in range(len(cur)):
            cands = cur.repeat(V, 1)
            cands[:, pos] = torch.arange(V, device=cur.device)
            losses = prompt_losses(model, cands, batch)
            scored += V
            i = int(torch.argmin(losses))
            if float(losses[i]) < loss:
                cur, loss, changed = cands[i].clone(), float(losses[i]), True
        if not changed:
            break
    return cur, loss, scored
