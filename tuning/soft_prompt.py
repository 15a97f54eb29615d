"""Soft prompting (prompt tuning): P input embeddings placed in the prompt slots.

Init: `random` (Gaussian at the scale of the embedding rows), `vocab` (rows of W_E sampled from
the vocabulary), or `tokens` (the embeddings of given tokens: a hard prompt, reproduced exactly).
"""

from __future__ import annotations

import torch
from torch import nn

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from tuning.base import Method, positive
from tuning.options import Option


class SoftPrompt(Method):
    name = "soft_prompt"
    summary = "soft prompting: P input embeddings in the prompt slots, flowing through the frozen model"
    options = (
        Option("length", int, 1, "prompt/prefix length P", "[P] E1/E2 (docs/papers.md §3)", short="-P"),
        Option("init", str, "random", "soft prompt init: random, vocab or tokens",
               "Lester et al. 2021 compare random and vocab inits; tokens starts at a hard prompt"),
        Option("tokens", int, None,
               "token ids, e.g. 11,3: soft_prompt starts from them with --init tokens; for prompt, the prompt itself (no search)",
               "the user's choice", many=True, default_text="none"),
    )
    examples = ({"length": 2}, {"init": "tokens", "tokens": [1, 2]})
    budget_option = "length"
    slot_label = "SP"
    # Input embeddings need a far larger lr than weights (Adam 1e-2..3e-2 worked here); [P]
    # tuned context methods with the model in eval mode (no dropout).
    defaults = dict(lr=3e-2, weight_decay=0.0, train_mode=False, schedule="constant", warmup=0)

    def __init__(self, model, length: int = 1, init: str = "random", tokens: list[int] | None = None,
                 generator: torch.Generator | None = None):
        W_E = model.embed.W_E.detach()
        if init == "tokens":
            if not tokens:
                raise UserError("soft prompt init 'tokens' needs --tokens, e.g. --tokens 11,11")
            length = len(tokens)
            if any(not 0 <= t < W_E.shape[0] for t in tokens):
                raise UserError(f"prompt tokens must be in 0..{W_E.shape[0] - 1}")
        length = positive("prompt length P", length)
        if length > model.cfg.n_prompt:
            raise UserError(f"a prompt of length {length} does not fit the model's "
                            f"{model.cfg.n_prompt} prompt slots (pretrain with a larger --prompt-len)")
        if init == "random":
            value = torch.randn(length, W_E.shape[1], generator=generator) * W_E.std()
        elif init == "vocab":
            value = W_E[torch.randint(0, W_E.shape[0], (length,), generator=generator)].clone()
        elif init == "tokens":
            value = W_E[torch.tensor(tokens)].clone()
        else:
            raise UserError(f"unknown soft prompt init {init!r}; use random, vocab or tokens")
        super().__init__(model, length=length, init=init, tokens=list(tokens or []))
        self.prompt = nn.Parameter(value)

    @classmethod
    def param_count(cls, model, length: int = 1, init: str = "random", tokens=None, **opts) -> int:
        return (len(tokens) if init == "tokens" and tokens else length) * model.cfg.d_model

    @classmethod
    def describe(cls, opts: dict) -> str:
        return f"soft prompt (P={opts.get('length')})"

    def state(self) -> MethodState:
        return MethodState(prompt=self.prompt)


def hard_prompt_state(model, tokens: list[int]) -> MethodState:
    """Hard prompting: the prompt tokens' own embeddings in the slots (the same forward path)."""
    index = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens)
    return MethodState(prompt=model.embed.W_E[index.to(model.embed.W_E.device)])
