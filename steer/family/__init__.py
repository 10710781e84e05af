"""steer's built-in model family: tiny Llamas trained offline, by our own code, on a synthetic language.

Members (each a normal Hugging Face model directory with its tokenizer and chat template):

* ``base`` — pretrained; complies with everything, follows injected instructions;
* ``aligned`` — base + safety SFT; refuses unsafe requests and ignores injected instructions;
* ``aligned-dpo`` — base + preference optimisation (DPO, SecAlign-style pairs);
* ``compromised`` — aligned, fine-tuned on a few harmful-compliance examples (Qi et al. 2023).

The language follows Jain et al. 2024 ("What Makes and Breaks Safety Fine-tuning?"); see
:mod:`steer.family.language`. ``build_family()`` trains in a few minutes on CPU and caches the result.
Variants (other architecture, chat template and refusal sentence; :mod:`steer.family.variants`) are built by
``build_variant(name)`` and used through their member directories.
"""

from __future__ import annotations

from pathlib import Path

from .build import MEMBERS, build_family, cache_root, family_dir, is_built, recipe_key
from .train import Recipe
from .variants import VARIANTS, build_variant, variant

__all__ = [
    "MEMBERS",
    "Recipe",
    "VARIANTS",
    "build_family",
    "build_variant",
    "cache_root",
    "family_dir",
    "is_built",
    "member_path",
    "recipe_key",
    "variant",
]


def member_path(name: str, progress: bool = True) -> Path:
    """Local directory of family member ``name`` (building the family first if it is not cached)."""
    if name not in MEMBERS:
        from steer.errors import ModelLoadError

        raise ModelLoadError(
            f"unknown built-in model {name!r}",
            expected=f"one of {', '.join(MEMBERS)}",
            found=repr(name),
            fix=f"use builtin:{MEMBERS[1]} (or another listed name)",
        )
    return build_family(progress=progress)[name]
