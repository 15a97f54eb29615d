"""Task registry, sequence layout, stable-hash split and datasets (docs/papers.md §2).

Encoding (one sequence of the lab, [P]'s minGPT layout with a dedicated slot token):

    [S S ... S] x1 .. xL y1 .. yL          S = SLOT, P slots; X, Y of length L

- X holds digits 0..num_digits-1 (default 0..7, L = 10). Half of the inputs are rejection-sampled
  to at most L//2 distinct values, as in [P] (repeats are what models struggle with).
- The vocabulary holds every value a task can output: values 0..max_value with
  max_value = max(num_digits + 1, L) (add2 of the top digit, and double_hist counts up to L),
  then the SLOT token. A task whose outputs could leave that range is refused, never clipped.
- The model reads the content `x1..xL y1..y(L-1)` at positions P.. and predicts y1 at the last X
  position; the loss is on Y only. What sits in the P slots is the base run's slot protocol
  (toy_models/model.py): `token` (the default, [P]'s pads) fills them with S, and a method takes
  the first slots (a prefix's keys/values, a soft or hard prompt's embeddings); `empty` leaves
  them out unless a method fills them, so the base model never sees S.
- Train/test split by a stable hash of X (splitmix64 folded over the elements of X),
  never Python's salted `hash()`; the split depends on X alone, so no test input is ever trained
  on, whatever the task. Evaluation uses one fixed, seeded test set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from prefixlab_common.errors import UserError

# --------------------------------------------------------------------------------------------
# Task functions: int64 arrays [batch, L] -> [batch, L]. `x[:, :1]` is x[0] of each sample.


def _ascending(x: np.ndarray) -> np.ndarray:
    return np.sort(x, axis=1)


def _descending(x: np.ndarray) -> np.ndarray:
    return -np.sort(-x, axis=1)


def _histogram(x: np.ndarray) -> np.ndarray:
    return (x[:, :, None] == x[:, None, :]).sum(axis=2)


def modulo(x: np.ndarray) -> np.ndarray:
    d = x[:, :1]
    # Convention for a zero divisor (only reachable inside compositions): x mod 0 = x.
    return np.where(d == 0, x, np.remainder(x, np.maximum(d, 1)))


def divisible_mask(x: np.ndarray) -> np.ndarray:
    d = x[:, :1]
    # Convention: a is divisible by 0 iff a == 0.
    return np.where(d == 0, x == 0, np.remainder(x, np.maximum(d, 1)) == 0)


@dataclass(frozen=True)
class Task:
    """One task. `fn` maps X to Y; `out_max(in_max, L)` bounds its outputs (for the vocabulary).
    `divisor_first` draws x[0] from 2..num_digits//2 (x[0] is a divisor or count, as in [P]'s
    extended branch); `binary` draws X from {0, 1}."""

    name: str
    description: str
    fn: Callable[[np.ndarray], np.ndarray]
    out_max: Callable[[int, int], int]
    divisor_first: bool = False
    binary: bool = False


def _half(num_digits: int) -> int:
    return max(2, num_digits // 2)


TASKS: dict[str, Task] = {}


def _register(task: Task) -> None:
    TASKS[task.name] = task


_register(Task("ascending", "sort X ascending", _ascending, lambda m, L: m))
_register(Task("descending", "sort X descending", _descending, lambda m, L: m))
_register(Task("add1", "add 1 to every element", lambda x: x + 1, lambda m, L: m + 1))
_register(Task("add2", "add 2 to every element", lambda x: x + 2, lambda m, L: m + 2))
_register(Task("ascending_add1", "sort ascending, then add 1 (new compositional task)",
               lambda x: _ascending(x) + 1, lambda m, L: m + 1))
_register(Task("double_hist", "each element's count in X (new attention pattern)",
               _histogram, lambda m, L: L))
_register(Task("modulo", "x mod x[0]", modulo, lambda m, L: m, divisor_first=True))
_register(Task("less_than", "keep x if x < x[0], else 0",
               lambda x: np.where(x < x[:, :1], x, 0), lambda m, L: m))
_register(Task("more_than_equal", "keep x if x >= x[0], else 0",
               lambda x: np.where(x >= x[:, :1], x, 0), lambda m, L: m))
_register(Task("divisible", "keep x if x[0] divides x, else 0",
               lambda x: np.where(divisible_mask(x), x, 0), lambda m, L: m, divisor_first=True))
_register(Task("not_divisible", "keep x if x[0] does not divide x, else 0",
               lambda x: np.where(divisible_mask(x), 0, x), lambda m, L: m, divisor_first=True))
_register(Task("inverse_binary", "(x + 1) mod 2; as a first stage X is drawn from {0, 1}",
               lambda x: np.remainder(x + 1, 2),
               lambda m, L: 1, binary=True))
_register(Task("filter_at_least_n", "keep x if it occurs at least x[0] times, else 0",
               lambda x: np.where(_histogram(x) >= x[:, :1], x, 0), lambda m, L: m, divisor_first=True))

MIX4 = ("ascending", "descending", "add1", "add2")


@dataclass(frozen=True)
class TaskSpec:
    """Sizes of the sequence layout. Defaults are docs/papers.md §2's."""

    length: int = 10
    num_digits: int = 8
    prompt_len: int = 1

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise UserError(f"length must be positive, got {self.length}")
        if self.num_digits < 2:
            raise UserError(f"num_digits must be at least 2, got {self.num_digits}")
        if self.prompt_len < 0:
            raise UserError(f"prompt length must be >= 0, got {self.prompt_len}")

    @property
    def max_value(self) -> int:
        return max(self.num_digits + 1, self.length)

    @property
    def slot_token(self) -> int:
        return self.max_value + 1

    @property
    def vocab_size(self) -> int:
        return self.max_value + 2

    @property
    def content_len(self) -> int:
        """Tokens the model reads: X and Y without its last element."""
        return 2 * self.length - 1

    @property
    def n_ctx(self) -> int:
        return self.prompt_len + self.content_len

    def to_dict(self) -> dict:
        return asdict(self)

    def token_str(self, t: int) -> str:
        return "S" if t == self.slot_token else str(t)


# --------------------------------------------------------------------------------------------
# Resolved tasks: a name, possibly mix4 or a composition a+b+c.


@dataclass(frozen=True)
class ResolvedTask:
    name: str
    stages: tuple[tuple[Task, ...], ...]  # mix of alternatives; each alternative is a pipeline

    @property
    def ambiguous_first(self) -> bool:
        """A mixture (mix4) has no indicator: y1 is what reveals the task, so it is given."""
        return len(self.stages) > 1

    def solve(self, x: np.ndarray, which: np.ndarray) -> np.ndarray:
        """Y for each row of X; `which` picks the alternative per row (mix4)."""
        y = np.empty_like(x)
        for a, pipeline in enumerate(self.stages):
            rows = which == a
            if not rows.any():
                continue
            out = x[rows]
            for t in pipeline:
                out = t.fn(out)
            y[rows] = out
        return y


def task_names() -> list[str]:
    return list(TASKS) + ["mix4"]


def resolve_task(name: str, spec: TaskSpec) -> ResolvedTask:
    """'add1', 'mix4' or a composition 'less_than+add1'. Refuses tasks the vocabulary cannot hold."""
    name = name.strip()
    if name == "mix4":
        stages = tuple((TASKS[n],) for n in MIX4)
    else:
        parts = [p.strip() for p in name.split("+")]
        unknown = [p for p in parts if p not in TASKS]
        if unknown or not parts:
            raise UserError(f"unknown task {unknown[0] if unknown else name!r}; known: "
                            + ", ".join(task_names()) + " (compose with '+', e.g. less_than+add1)")
        stages = (tuple(TASKS[p] for p in parts),)
    for pipeline in stages:
        m = 1 if pipeline[0].binary else spec.num_digits - 1
        for t in pipeline:
            m = t.out_max(m, spec.length)
        if m > spec.max_value:
            raise UserError(f"task {name!r} outputs values up to {m}, but the vocabulary holds "
                            f"0..{spec.max_value} (num_digits={spec.num_digits}, "
                            f"length={spec.length}); use fewer stages or a larger num_digits")
    return ResolvedTask(name, stages)


# --------------------------------------------------------------------------------------------
# Stable split.

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def input_hash(x: np.ndarray) -> np.ndarray:
    """A stable 64-bit hash of each row of X (independent of Python's salted hash())."""
    h = np.full(x.shape[0], np.uint64(x.shape[1]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(x.shape[1]):
            h = _splitmix64(h ^ x[:, j].astype(np.uint64))
    return h


TEST_FRACTION_DEN = 8  # 1/8 of all inputs are test inputs


def is_test_input(x: np.ndarray) -> np.ndarray:
    return (input_hash(x) % np.uint64(TEST_FRACTION_DEN)) == 0


# --------------------------------------------------------------------------------------------
# Sampling.


def _sample_inputs(rng: np.random.Generator, n: int, spec: TaskSpec, pipeline: tuple[Task, ...],
                   split: str) -> np.ndarray:
    """n inputs of `split`, [P]'s recipe: half rejection-sampled to <= L//2 distinct values."""
    L, D = spec.length, spec.num_digits
    out = np.empty((0, L), dtype=np.int64)
    first = pipeline[0]
    while out.shape[0] < n:
        m = max(2 * (n - out.shape[0]), 64)
        if first.binary:
            x = rng.integers(0, 2, size=(m, L))
        else:
            x = rng.integers(0, D, size=(m, L))
        if first.divisor_first:
            x[:, 0] = rng.integers(2, _half(D) + 1, size=m)
        few = rng.random(m) < 0.5
        srt = np.sort(x, axis=1)
        n_distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
        keep = ~few | (n_distinct <= max(1, L // 2))
        test = is_test_input(x)
        keep &= test if split == "test" else ~test
        out = np.concatenate([out, x[keep]])
    return out[:n]


@dataclass
class Batch:
    x: torch.Tensor  # [batch, L] inputs
    y: torch.Tensor  # [batch, L] targets
    which: torch.Tensor  # [batch] which alternative (mix4 index), 0 otherwise

    @property
    def content(self) -> torch.Tensor:
        """What the model reads: [batch, 2L-1] = X and Y[:-1]."""
        return torch.cat([self.x, self.y[:, :-1]], dim=1)

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device), self.which.to(device))


def sample_batch(task: ResolvedTask, spec: TaskSpec, n: int, rng: np.random.Generator,
                 split: str = "train") -> Batch:
    if n <= 0:
        raise UserError(f"batch size must be positive, got {n}")
    which = rng.integers(0, len(task.stages), size=n)
    x = np.empty((n, spec.length), dtype=np.int64)
    for a, pipeline in enumerate(task.stages):
        rows = np.nonzero(which == a)[0]
        if len(rows):
            x[rows] = _sample_inputs(rng, len(rows), spec, pipeline, split)
    y = task.solve(x, which)
    return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(which))


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one training step: stateless, so a resumed run sees the same data."""
    return np.random.default_rng([seed, stream, step])


def fixed_test_set(task: ResolvedTask, spec: TaskSpec, n: int = 1000, seed: int = 1234) -> Batch:
    """The fixed, seeded test set of a task (same inputs at every evaluation)."""
    return sample_batch(task, spec, n, np.random.default_rng([seed, 0xE7A1]), split="test")


def example(name: str, spec: TaskSpec | None = None, seed: int = 0) -> tuple[list[int], list[int]]:
    spec = spec or TaskSpec()
    b = sample_batch(resolve_task(name, spec), spec, 1, np.random.default_rng(seed))
    return b.x[0].tolist(), b.y[0].tolist()


def exact_ceiling(task: ResolvedTask, batch: Batch, provide_first: bool) -> float:
    """The best expected exact accuracy any predictor can reach on `batch`: 1 for a single task.
    A mixture (mix4) has no indicator; with y1 given, the alternatives whose output starts with
    that y1 stay possible, and a Bayes predictor (alternatives equally likely) picks the output
    most of them share. docs/papers.md §3b: 94.0 % for mix4 on the fixed test set."""
    if len(task.stages) == 1:
        return 1.0
    x = batch.x.numpy()
    outs = np.stack([task.solve(x, np.full(len(x), a)) for a in range(len(task.stages))], axis=1)  # [n, A, L]
    true = task.solve(x, batch.which.numpy())
    total = 0.0
    for i in range(len(x)):
        cand = outs[i] if not provide_first else outs[i][outs[i][:, 0] == true[i, 0]]
        groups: dict[bytes, int] = {}
        for y in cand:
            groups[y.tobytes()] = groups.get(y.tobytes(), 0) + 1
        total += max(groups.values()) / len(cand)
    return total / len(x)
