"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def family():
    """The built-in model family (built once per test session, reused from the cache when present)."""
    from steer.family import build_family

    return build_family(progress=False)
