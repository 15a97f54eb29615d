"""Fixtures shared by the LLaMA-check tests: one torch thread, and the tiny random LLaMAs."""

import pytest
import torch

from model_checks.models import tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models are far too small for intra-op threads; on a busy 2-core box two OpenMP
    # threads make every small matmul ~100x slower. Restored after each module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0, gqa=False)


@pytest.fixture(scope="module")
def tiny_gqa():
    return tiny_llama(seed=0, gqa=True)


@pytest.fixture(scope="module")
def tiny_gemma():
    from model_checks.models import tiny_gemma3
    return tiny_gemma3(seed=0)
