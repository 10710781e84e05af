"""steer — inference-time safety steering for Hugging Face language models.

Public API (imported lazily so that ``import steer`` and ``steer --help`` stay fast)::

    from steer import SteeredModel, SteeringVector, SteeringConfig, Condition
"""

from __future__ import annotations

import importlib

_LAZY = {
    "SteeredModel": "steer.model",
    "resolve_model_path": "steer.model",
    "SteeringVector": "steer.vector",
    "SteeringConfig": "steer.config",
    "Condition": "steer.config",
    "Steering": "steer.hooks",
    "get_layers": "steer.layers",
    "load_prompts": "steer.prompts",
    "SteerError": "steer.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steer' has no attribute {name!r}")
