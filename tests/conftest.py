"""Shared pytest configuration for the sparsek CPU test suite."""

import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter (SPEC section 6). This must
# happen before sparsek's kernels are imported: triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Small shapes everywhere: more threads only add overhead (and CI has 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))

for profile, examples in (("default", 40), ("thorough", 400)):
    settings.register_profile(
        profile,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
settings.load_profile(os.environ.get("SPARSEK_HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = torch.cuda.is_available()

#: Skip marker for tests that need a CUDA device: ``@requires_cuda``.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test needs a CUDA device (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed (each test gets a fresh one)."""
    import numpy as np

    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Deterministic torch RNG in every test."""
    torch.manual_seed(0)
    yield
