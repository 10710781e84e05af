"""Where a forward sits in its sequence: the past (KV-cache) length, read from what every generate path passes.

Token scopes and the conditional gate need to tell a prompt's forward (prefill, past length 0) from a decode
step. transformers has renamed how a model learns its past more than once (``past_key_value``,
``past_key_values``, ``cache_position``, and since 5.24 a ``cache`` argument with no ``cache_position``), so
no single argument name can be trusted. :func:`past_length` reads every independent source there is:

1. ``cache_position`` (transformers 4.36 – 5.23): the absolute position of the first input token;
2. a cache object under *any* argument name (anything with ``get_seq_length()``: every ``Cache`` class),
   or a legacy tuple-of-tuples cache under a name containing ``past``;
3. a 2-D attention mask longer than the input: generate always passes the mask of the whole sequence so far,
   so ``mask_length - input_length`` is the past length;
4. ``position_ids``: the last position of the longest (unpadded) row is ``past + input_length - 1``.

The first available source gives the answer and the others cross-check it (position ids are read only when
no other source exists: reading them is a device sync on every forward). If
the sources disagree about whether this is a prompt or a continuation (say a cache of an unknown kind that
reports 0 while the mask says 40 tokens precede the input), :class:`~steer.errors.StateError` is raised: a
steering decision on a guessed position would be silently wrong. With no source at all the model has no way
to see a past (no cache, no mask), so the forward is a fresh sequence and the past length is 0.
"""

from __future__ import annotations

import torch

from .errors import StateError


def is_cache(value) -> bool:
    """Whether ``value`` is a KV-cache object (anything with ``get_seq_length()``: every ``Cache`` class)."""
    return callable(getattr(value, "get_seq_length", None))


def _legacy_length(value) -> int | None:
    """Length of a legacy ``((k, v), ...)`` cache (k: ``[B, heads, T, d]``), or None if ``value`` is not one."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0]:
        k = value[0][0]
        if isinstance(k, torch.Tensor) and k.dim() >= 3:
            return int(k.shape[-2])
    return None


def _from_cache(args: tuple, kwargs: dict) -> int | None:
    for name, value in kwargs.items():
        if value is None:
            continue
        if is_cache(value):
            return int(value.get_seq_length())
        if "past" in name:
            n = _legacy_length(value)
            if n is not None:
                return n
    for value in args[1:]:  # positional caches (a forward called as model(ids, mask, pos, cache))
        if is_cache(value):
            return int(value.get_seq_length())
    return None


def _from_mask(kwargs: dict, seq: int) -> int | None:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= seq:
        return int(mask.shape[-1]) - seq
    return None


def _from_positions(kwargs: dict, seq: int) -> int | None:
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.numel() and pos.shape[-1] == seq:
        return max(0, int(pos.reshape(-1, seq)[:, -1].max()) + 1 - seq)
    return None


def past_length(args: tuple, kwargs: dict, seq: int) -> int:
    """The number of tokens that precede this forward's ``seq`` input tokens (0 for a prompt's forward)."""
    cache_position = kwargs.get("cache_position")
    sources: list[tuple[str, int]] = []
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        sources.append(("cache_position", int(cache_position.reshape(-1)[0])))
    cached = _from_cache(args, kwargs)
    if cached is not None:
        sources.append(("cache", cached))
    masked = _from_mask(kwargs, seq)
    if masked is not None:
        sources.append(("attention_mask", masked))
    if not sources:  # position ids last: reading them syncs with the device, so only when nothing else tells
        positioned = _from_positions(kwargs, seq)
        if positioned is None:
            return 0
        sources.append(("position_ids", positioned))
    name, past = sources[0]
    for other, value in sources[1:]:
        if (value == 0) != (past == 0):
            raise StateError(
                "cannot tell whether this forward starts a prompt or continues one",
                expected="the KV cache, the attention mask and the position ids to agree on the past length",
                found=", ".join(f"{n}={v}" for n, v in sources),
                fix="pass the attention mask of the whole sequence (past and new tokens) and the model's cache "
                "object, as transformers' generate does; please report this with your transformers version",
            )
    return past
