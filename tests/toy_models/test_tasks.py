import numpy as np
import pytest

from prefixlab_common.errors import UserError
from toy_models.tasks import (TASKS, TaskSpec, input_hash, is_test_input, resolve_task, sample_batch,
                              step_rng, fixed_test_set)

SPEC = TaskSpec()
X = np.array([[3, 1, 4, 1, 5, 0, 2, 6, 5, 3]])


@pytest.mark.parametrize("name,expected", [
    ("ascending", [0, 1, 1, 2, 3, 3, 4, 5, 5, 6]),
    ("descending", [6, 5, 5, 4, 3, 3, 2, 1, 1, 0]),
    ("add1", [4, 2, 5, 2, 6, 1, 3, 7, 6, 4]),
    ("add2", [5, 3, 6, 3, 7, 2, 4, 8, 7, 5]),
    ("ascending_add1", [1, 2, 2, 3, 4, 4, 5, 6, 6, 7]),
    ("double_hist", [2, 2, 1, 2, 2, 1, 1, 1, 2, 2]),
    ("modulo", [0, 1, 1, 1, 2, 0, 2, 0, 2, 0]),
    ("less_than", [0, 1, 0, 1, 0, 0, 2, 0, 0, 0]),
    ("more_than_equal", [3, 0, 4, 0, 5, 0, 0, 6, 5, 3]),
    ("divisible", [3, 0, 0, 0, 0, 0, 0, 6, 0, 3]),
    ("not_divisible", [0, 1, 4, 1, 5, 0, 2, 0, 5, 0]),
    ("filter_at_least_n", [0] * 10),
    ("less_than+add1", [1, 2, 1, 2, 1, 1, 3, 1, 1, 1]),
    ("add1+descending", [7, 6, 6, 5, 4, 4, 3, 2, 2, 1]),
])
def test_tasks_on_hand_written_examples(name, expected):
    t = resolve_task(name, SPEC)
    assert t.solve(X, np.zeros(1, dtype=int))[0].tolist() == expected


def test_inverse_binary_and_filter():
    x = np.array([[2, 1, 1, 0, 3, 3, 3, 0, 1, 1]])
    assert resolve_task("filter_at_least_n", SPEC).solve(x, np.zeros(1, int))[0].tolist() == \
        [0, 1, 1, 0, 3, 3, 3, 0, 1, 1]
    b = np.array([[0, 1, 1, 0, 0, 0, 1, 1, 1, 0]])
    assert resolve_task("inverse_binary", SPEC).solve(b, np.zeros(1, int))[0].tolist() == \
        [1, 0, 0, 1, 1, 1, 0, 0, 0, 1]


def test_vocabulary_holds_every_output():
    assert SPEC.max_value == 10 and SPEC.slot_token == 11 and SPEC.vocab_size == 12
    for name in list(TASKS) + ["mix4"]:
        b = sample_batch(resolve_task(name, SPEC), SPEC, 500, np.random.default_rng(1))
        assert int(b.y.max()) <= SPEC.max_value
        assert int(b.x.max()) < SPEC.num_digits
    # double_hist reaches L when all elements are equal, add2 reaches num_digits + 1
    allsame = np.full((1, 10), 7)
    assert resolve_task("double_hist", SPEC).solve(allsame, np.zeros(1, int)).max() == 10
    assert resolve_task("add2", SPEC).solve(allsame, np.zeros(1, int)).max() == 9


def test_composition_out_of_vocabulary_is_refused():
    with pytest.raises(UserError, match="vocabulary"):
        resolve_task("add2+add2", SPEC)
    with pytest.raises(UserError, match="unknown task"):
        resolve_task("sort_everything", SPEC)


def test_mix4_covers_four_tasks():
    b = sample_batch(resolve_task("mix4", SPEC), SPEC, 400, np.random.default_rng(2))
    assert set(b.which.tolist()) == {0, 1, 2, 3}
    asc = b.which == 0
    assert (b.y[asc] == b.x[asc].sort(dim=1).values).all()


def test_split_is_stable_and_disjoint():
    # the hash is a fixed function (not Python's salted hash())
    assert int(input_hash(X)[0]) == int(input_hash(X.copy())[0])
    task = resolve_task("mix4", SPEC)
    train = np.concatenate([sample_batch(task, SPEC, 2000, step_rng(0, s)).x.numpy() for s in range(20)])
    test = fixed_test_set(task, SPEC, 2000).x.numpy()
    assert not is_test_input(train).any()
    assert is_test_input(test).all()
    train_rows = {r.tobytes() for r in train}
    assert not any(r.tobytes() in train_rows for r in test)
    # about 1/8 of all inputs are test inputs
    frac = is_test_input(np.random.default_rng(5).integers(0, 8, (20000, 10))).mean()
    assert 0.10 < frac < 0.15


def test_test_set_is_fixed():
    task = resolve_task("add1", SPEC)
    a, b = fixed_test_set(task, SPEC, 100), fixed_test_set(task, SPEC, 100)
    assert (a.x == b.x).all() and (a.y == b.y).all()


def test_half_the_draws_are_rejection_sampled_to_few_distinct_values():
    # [P]'s sampler: each draw flips a coin; on heads a draw with > L//2 distinct values is redrawn.
    # Accepted share with <= 5 distinct values is then p / (0.5 + 0.5 p), p that of uniform draws.
    b = sample_batch(resolve_task("ascending", SPEC), SPEC, 8000, np.random.default_rng(3))
    few = np.array([len(set(r)) <= 5 for r in b.x.tolist()]).mean()
    uni = np.random.default_rng(4).integers(0, 8, (8000, 10))
    p = np.array([len(set(r)) <= 5 for r in uni.tolist()]).mean()
    assert abs(few - p / (0.5 + 0.5 * p)) < 0.03
    assert few > p + 0.1


def test_divisor_tasks_draw_a_divisor_first():
    b = sample_batch(resolve_task("modulo", SPEC), SPEC, 300, np.random.default_rng(4))
    assert ((b.x[:, 0] >= 2) & (b.x[:, 0] <= 4)).all()


@pytest.mark.parametrize("kw", [dict(length=0), dict(num_digits=1), dict(prompt_len=-1)])
def test_bad_sizes(kw):
    with pytest.raises(UserError):
        TaskSpec(**kw)


def test_exact_ceiling_of_mix4():
    """docs/papers.md §3b: with y1 given a perfect predictor reaches 94.0 % on mix4's fixed test set
    (y1 cannot tell descending from add1/add2 on some inputs); without y1, about 1/4."""
    from toy_models.tasks import MIX4, exact_ceiling, fixed_test_set
    spec = TaskSpec(prompt_len=1)
    mix = resolve_task("mix4", spec)
    test = fixed_test_set(mix, spec, 1000)
    with_y1, without = exact_ceiling(mix, test, True), exact_ceiling(mix, test, False)
    assert abs(with_y1 - 0.940) < 1e-9
    assert 0.24 < without < 0.27 < with_y1
    for name in MIX4:
        single = resolve_task(name, spec)
        assert exact_ceiling(single, fixed_test_set(single, spec, 200), False) == 1.0


def test_task_edges_conventions_and_helpers():
    """A zero or unit divisor, the divisor range, TaskSpec's limits and messages, the task list,
    step and test-set generators, and the small helpers the CLI prints with."""
    from toy_models.tasks import divisible_mask, modulo, example, task_names
    x = np.array([[0, 0, 3, 5], [1, 0, 3, 5], [3, 0, 3, 5]])
    assert modulo(x).tolist() == [[0, 0, 3, 5], [0, 0, 0, 0], [0, 0, 0, 2]]
    assert divisible_mask(x).tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    for n, top in ((4, 2), (6, 3), (9, 4), (3, 2)):
        spec = TaskSpec(length=4, num_digits=n, prompt_len=1)
        first = sample_batch(resolve_task("modulo", spec), spec, 400, np.random.default_rng(n)).x[:, 0]
        assert (int(first.min()), int(first.max())) == (2, top), n
    assert TaskSpec(length=1, num_digits=2, prompt_len=0).length == 1  # the smallest valid spec
    for kw, msg in ((dict(length=0), "length must be positive, got 0"),
                    (dict(num_digits=1), "num_digits must be at least 2, got 1"),
                    (dict(prompt_len=-1), "prompt length must be >= 0, got -1")):
        with pytest.raises(UserError, match=f"^{msg}$"):
            TaskSpec(**kw)
    assert "mix4" in task_names() and set(TASKS) < set(task_names())
    assert TaskSpec(**SPEC.to_dict()) == SPEC
    assert (SPEC.token_str(SPEC.slot_token), SPEC.token_str(3)) == ("S", "3")
    xs, ys = example("add1", SPEC, seed=3)
    assert len(xs) == SPEC.length and ys == [v + 1 for v in xs]
    assert example("add1", SPEC, seed=3) == (xs, ys) and example("add1", None, seed=4) != (xs, ys)
    assert step_rng(0, 5).integers(1 << 30) == step_rng(0, 5).integers(1 << 30)
    assert len({step_rng(s, t, u).integers(1 << 30) for s, t, u in ((0, 5, 0), (1, 5, 0), (0, 6, 0), (0, 5, 1))}) == 4
    t = resolve_task("add1", SPEC)
    full = fixed_test_set(t, SPEC)
    assert len(full) == 1000 and torch_equal(full.x, fixed_test_set(t, SPEC, 1000, 1234).x)
    assert not torch_equal(full.x[:10], fixed_test_set(t, SPEC, 10, 99).x)


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_the_data_a_seed_gives_is_pinned():
    """Regression anchor of the data: the inputs, alternatives and dtypes a seed draws, the split
    hash, and the errors for a bad task name or batch size. A change here changes every study."""
    import torch
    from toy_models.tasks import input_hash
    spec = TaskSpec(length=6, num_digits=8, prompt_len=1)
    b = sample_batch(resolve_task("mix4", spec), spec, 4, np.random.default_rng(11))
    assert b.x.tolist() == [[4, 4, 5, 0, 3, 1], [3, 7, 4, 0, 4, 1], [7, 0, 6, 5, 7, 7], [6, 0, 0, 5, 1, 6]]
    assert b.which.tolist() == [0, 0, 3, 1] and len(b) == 4
    assert b.x.dtype == b.y.dtype == torch.int64
    b = sample_batch(resolve_task("inverse_binary+add1", spec), spec, 4, np.random.default_rng(11))
    assert b.x.tolist() == [[0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1]]
    assert int(input_hash(np.array([[1, 2, 3, 4]]))[0]) == 2524909480129631697
    known = ("ascending, descending, add1, add2, ascending_add1, double_hist, modulo, less_than, "
             "more_than_equal, divisible, not_divisible, inverse_binary, filter_at_least_n, mix4 "
             "(compose with '+', e.g. less_than+add1)")
    for name, bad in (("sort_all", "sort_all"), ("add1+nope", "nope")):
        with pytest.raises(UserError) as e:
            resolve_task(name, spec)
        assert str(e.value) == f"unknown task '{bad}'; known: {known}"
    with pytest.raises(UserError, match="^batch size must be positive, got 0$"):
        sample_batch(resolve_task("add1", spec), spec, 0, np.random.default_rng(0))
