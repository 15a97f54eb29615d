import numpy as np
import pytest
import torch

from toy_models.model import ToyConfig, ToyTransformer, preset_config
from toy_models.tasks import TaskSpec

torch.set_num_threads(1)  # micro models: one thread is as fast, and far faster on a loaded machine


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, restored after it (opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")` or an autouse fixture that requests it):
    the tiny models are far too small for intra-op threads, and on a busy 2-core box two OpenMP
    threads make every small matmul ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LLaMA of the model checks (4 heads)."""
    from model_checks.models import tiny_llama  # transformers: only for the tests that ask for it
    return tiny_llama(seed=0, gqa=False)


@pytest.fixture(scope="module")
def tiny_gqa():
    """The tiny random LLaMA with grouped-query attention (2 key/value heads)."""
    from model_checks.models import tiny_llama
    return tiny_llama(seed=0, gqa=True)


@pytest.fixture
def spec():
    return TaskSpec(length=4, num_digits=4, prompt_len=3)


def micro_model(spec, seed=0, **overrides):
    cfg = preset_config("micro", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=spec.prompt_len,
                        **overrides)
    g = torch.Generator().manual_seed(seed)
    m = ToyTransformer(cfg)
    m.reset_parameters(generator=g)
    # init_std 0.02 makes patterns nearly uniform; scale weights up so identities are not trivial
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(20)
    return m.eval()


def tiny_model(**over) -> ToyTransformer:
    """The mutation tests' small model: 2 heads, d_model 8, no dropout, in eval mode, drawn after
    torch.manual_seed(0) (their hand computations read its weights); over: other ToyConfig fields."""
    torch.manual_seed(0)
    return ToyTransformer(ToyConfig(**{"n_heads": 2, "d_model": 8, "n_ctx": 10, "dropout": 0.0, **over})).eval()


@pytest.fixture
def model(spec):
    return micro_model(spec)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_terminal_summary(terminalreporter):
    """Name the skipped browser tests and the one command that enables them (make test on a
    machine without chromium skips them; CI installs it)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "browser" in getattr(r, "keywords", {})]
    if skipped:
        names = ", ".join(sorted({r.nodeid.split("::")[-1].split("[")[0] for r in skipped}))
        terminalreporter.write_line(f"{len(skipped)} browser tests skipped ({names}): no headless chromium. "
                                    "Enable them with `make browser` (sudo apt-get install chromium).", yellow=True)
