"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def family():
    """The built-in model family (built once per test session, reused from the cache when present)."""
    from steer.family import build_family

    return build_family(progress=False)


@pytest.fixture
def exact_and_one_thread():
    """The reference kernel (exact comparisons) on one torch thread (reproducible reductions)."""
    import torch

    import steer.kernels as K

    old, prev = torch.get_num_threads(), K.use("reference")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    K.use(prev)
