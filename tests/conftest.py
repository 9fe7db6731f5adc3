"""Test set-up: without CUDA, kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so this file decides it first thing, using
torch's CUDA query (which does not initialise a device) at the time pytest loads it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where the tests run: cuda when present, else cpu (through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Each test draws fresh inputs, reproducibly per test.
    torch.manual_seed(0x7CE5)
    yield


@pytest.fixture(autouse=True)
def _fresh_plan_caches():
    # Plans, launch sites, programs and checked calls are caches over metadata: a test that
    # patches a planning knob or a kernel must not see (or leave) ones made without the patch.
    from tkern.ops import _op

    _op.clear_plan_caches()
    yield
