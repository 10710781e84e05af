"""Shared fixtures."""

from __future__ import annotations

import pytest

FAMILY_FIXTURES = {"family", "variant_family"}


def pytest_collection_modifyitems(items):
    """Tests that need a trained family (the fixtures below, directly or through another fixture) get the
    ``family`` marker, so ``-m 'not family'`` runs the suite without training anything."""
    for item in items:
        if FAMILY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.family)


@pytest.fixture(scope="session")
def family():
    """The built-in model family (built once per test session, reused from the cache when present)."""
    from steer.family import build_family

    return build_family(progress=False)


@pytest.fixture(scope="session")
def variant_family():
    """The ``gpt2-chatml`` family variant (GPT-2, ChatML-like template, another refusal sentence), built once per
    test session like ``family``; ``{member: Path}``. Its refusal sentence is ``VARIANTS["gpt2-chatml"].refusal``."""
    from steer.family import build_variant

    return build_variant("gpt2-chatml", progress=False)


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


@pytest.fixture
def sm():
    """A SteeredModel around the tiny Llama with the tiny tokenizer (modules may override)."""
    from tiny_models import tiny_model, tiny_tokenizer

    from steer import SteeredModel

    return SteeredModel(tiny_model("llama"), tiny_tokenizer())


@pytest.fixture
def vec():
    """A 4-layer add vector for the tiny Llama (seeded)."""
    import torch
    from tiny_models import D

    from steer import SteeringVector

    torch.manual_seed(3)
    return SteeringVector({i: torch.randn(D) * 4 for i in range(4)})
