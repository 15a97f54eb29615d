"""Fixtures of the model-check tests: one torch thread in every module (tests/conftest.py has
`one_thread` and the tiny random LLaMAs `tiny`, `tiny_gqa`), and the tiny random Gemma 3."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def every_module_on_one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny_gemma():
    from model_checks.models import tiny_gemma3
    return tiny_gemma3(seed=0)
