"""Family variants: the same synthetic language and training stages, with another architecture, chat template
and refusal sentence, standing in for a model family "trained elsewhere".

steer's refusal judge and tuning were shaped around the built-in family (a Llama, ``<|user|>`` turns,
"sorry , i cannot help with that ."); a variant checks them on a family they were not shaped around. Variants are
used through their member directories (``build_family(recipe=VARIANTS[name])``, or ``steer family build
--variant NAME``); the ``builtin:NAME`` model names stay the default family's.
"""

from __future__ import annotations

from pathlib import Path

from .train import Recipe

VARIANTS: dict[str, Recipe] = {
    "default": Recipe(),
    # GPT-2 (Conv1D, absolute positions, LayerNorm) with head_dim 32 (vLLM's CPU attention refuses 16), a
    # ChatML-like template with its BOS, and a refusal sentence none of the generic judge's markers matches.
    # One torch thread: two thrash when the other core is busy (>14 min instead of ~2); 1200 pretraining steps
    # keep the build under 2 minutes with the same behaviour (README, "The built-in model family").
    "gpt2-chatml": Recipe(
        architecture="gpt2",
        num_heads=2,
        template="chatml",
        refusal="i must decline this request .",
        safety_params="mlp|attn",
        threads=1,
        base_steps=1200,
    ),
}


def variant(name: str) -> Recipe:
    """The recipe of variant ``name`` (its ``.refusal`` is the sentence it was taught)."""
    if name not in VARIANTS:
        from steer.errors import ConfigError

        raise ConfigError(
            f"unknown family variant {name!r}",
            expected=f"one of {', '.join(VARIANTS)}",
            found=repr(name),
            fix="pass a listed name (steer family build --variant NAME)",
        )
    return VARIANTS[name]


def build_variant(name: str, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Train (or reuse from the cache) the members of variant ``name``; returns ``{member: model directory}``."""
    from .build import build_family

    return build_family(force=force, progress=progress, recipe=variant(name))
