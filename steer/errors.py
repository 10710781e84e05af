"""Errors raised on bad user input.

Every error subclasses :class:`SteerError` (itself a ``ValueError``, as PEFT's config errors are) and its
message says three things: what was expected, what was found, and how to fix it. They are raised before
anything is changed on the model, so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations


class SteerError(ValueError):
    """Base class of steer's user-facing errors (the CLI prints these without a traceback)."""

    def __init__(self, what: str, *, expected: str | None = None, found: str | None = None, fix: str | None = None):
        parts = [what]
        if expected is not None:
            parts.append(f"expected: {expected}")
        if found is not None:
            parts.append(f"found: {found}")
        if fix is not None:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))


class VectorFileError(SteerError):
    """The file is not a steer vector file (not safetensors, pickle, no steer metadata, wrong version)."""


class ModelMismatchError(SteerError):
    """A vector (or config) does not fit the model: hidden size, layer count or architecture."""


class LayerError(SteerError):
    """Unknown layer index, or the decoder layers of a model cannot be found."""


class AlphaError(SteerError):
    """A steering strength that is NaN, infinite, or of the wrong count for the batch."""


class PromptFileError(SteerError):
    """A prompt file that is missing, unreadable, empty or malformed."""


class ModelLoadError(SteerError):
    """A model path that does not exist or cannot be loaded offline."""


class ConfigError(SteerError):
    """An invalid steering configuration (mode, scope, site, condition)."""


class StateError(SteerError):
    """The runtime cannot tell where a forward sits in its sequence (prompt or continuation)."""
