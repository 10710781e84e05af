"""The running batch of ``steer serve``'s step-level scheduler: rows (requests) with their KV cache, attention
mask, next token and position, which rows can join (:meth:`Rows.join`) and leave (:meth:`Rows.keep`) between
decode steps.

Rows are left-padded to a common cache length. Joining pads the shorter side on the left (zeros in the cache,
zeros in the mask) and concatenates along the batch; leaving selects rows; afterwards cache columns that are
padding in every remaining row are cut, so the cache is as long as the longest row still running. This needs
the cache's per-layer key/value tensors: transformers' ``DynamicCache`` with full-attention layers
(``cache.layers[i].keys/.values``, rebuilt with the public ``DynamicCache(ddp_cache_data=...)``). Any other
cache (sliding windows, linear attention, an unknown layout) is refused by :func:`kv_tensors` with
:class:`CacheLayoutError`, and the engine then admits new rows only when the batch is empty and keeps finished
rows parked in it until it empties (batch-level scheduling, as ``generate`` does: correct for every cache, since
nothing is cut out of it).

How a model is called is read from its ``forward`` signature once (:class:`ModelIO`): transformers 5.24 renamed
the cache argument ``past_key_values`` to ``cache`` (and the output field with it), so both are looked up and a
model that takes neither is refused with a clear error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from steer.errors import ConfigError


class CacheLayoutError(ConfigError):
    """The model's KV cache cannot be padded and merged row-wise."""


@dataclass(frozen=True)
class ModelIO:
    """How to call ``model.forward`` with a cache: the argument names it accepts."""

    cache_arg: str
    position_ids: bool
    logits_to_keep: str | None

    @classmethod
    def of(cls, model) -> "ModelIO":
        params = inspect.signature(model.forward).parameters
        cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        if cache_arg is None:
            raise ConfigError(
                "steer serve cannot feed this model a KV cache",
                expected="a forward(...) taking `cache` or `past_key_values` (every transformers causal LM)",
                found=f"{type(model).__name__}.forward{inspect.signature(model.forward)}",
                fix="serve a transformers causal LM (AutoModelForCausalLM)",
            )
        keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
        return cls(cache_arg, "position_ids" in params, keep)

    def forward(self, model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        """Last-position logits [B, V] and the updated cache."""
        kw = {"input_ids": ids, "attention_mask": mask, "use_cache": True, self.cache_arg: cache}
        if self.position_ids:
            kw["position_ids"] = pos
        if self.logits_to_keep is not None:
            kw[self.logits_to_keep] = 1
        out = model(**kw)
        new_cache = out.get("cache", None)
        if new_cache is None:
            new_cache = out.get("past_key_values", None)
        if new_cache is None:
            raise ConfigError(
                "the model returned no KV cache",
                expected="an output with `cache` or `past_key_values` when called with use_cache=True",
                found=f"output fields {list(out.keys())}",
                fix="serve a transformers causal LM; please report this with your transformers version",
            )
        return out["logits"][:, -1, :], new_cache


def kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) ``[B, heads, T, d]``, or :class:`CacheLayoutError` if the cache is not made of
    plain full-attention layers."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError as exc:  # pragma: no cover - transformers too old or reorganised
        raise CacheLayoutError(
            "cannot merge KV caches", expected="transformers.cache_utils.DynamicLayer", found=str(exc), fix="-"
        ) from None
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers:
        raise CacheLayoutError(
            "cannot merge KV caches row-wise",
            expected="a DynamicCache of full-attention layers",
            found=type(cache).__name__,
            fix="none needed: requests join a running batch only when it is empty (batch-level scheduling)",
        )
    out = []
    for i, layer in enumerate(layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (
            type(layer) is not DynamicLayer
            or getattr(layer, "is_sliding", False)
            or not isinstance(k, torch.Tensor)
            or not isinstance(v, torch.Tensor)
            or k.dim() != 4
            or v.dim() != 4
        ):
            raise CacheLayoutError(
                "cannot merge KV caches row-wise",
                expected="full-attention DynamicLayer key/value tensors [batch, heads, length, dim] in every layer",
                found=f"layer {i}: {type(layer).__name__}",
                fix="none needed: requests join a running batch only when it is empty (batch-level scheduling)",
            )
        out.append((k, v))
    return out


def _cache(kv):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Rows:
    """Rows in flight: ``cache``, ``mask`` [B, L] over cached positions, ``next_ids`` [B] (sampled, not yet fed),
    ``pos`` [B] (the position of ``next_ids``), ``mergeable`` (whether rows can join a non-empty batch)."""

    def __init__(self, cache, mask: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor, mergeable: bool):
        self.cache, self.mask, self.next_ids, self.pos, self.mergeable = cache, mask, next_ids, pos, mergeable

    @classmethod
    def from_prefill(cls, cache, mask: torch.Tensor, next_ids: torch.Tensor) -> "Rows":
        try:
            kv_tensors(cache)
            mergeable = True
        except CacheLayoutError:
            mergeable = False
        return cls(cache, mask, next_ids, mask.sum(1), mergeable)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def join(self, other: "Rows") -> None:
        """Append ``other``'s rows (after this batch's rows)."""
        a, b = kv_tensors(self.cache), kv_tensors(other.cache)
        la, lb = self.mask.shape[1], other.mask.shape[1]
        n = max(la, lb)
        kv = [
            (torch.cat([_pad_left(ka, n - la, 2), _pad_left(kb, n - lb, 2)]),
             torch.cat([_pad_left(va, n - la, 2), _pad_left(vb, n - lb, 2)]))
            for (ka, va), (kb, vb) in zip(a, b)
        ]  # fmt: skip
        self.cache = _cache(kv)
        self.mask = torch.cat([_pad_left(self.mask, n - la, 1), _pad_left(other.mask, n - lb, 1)])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.pos = torch.cat([self.pos, other.pos])

    def step_mask(self) -> torch.Tensor:
        """The attention mask of a decode step: the cached positions and the token fed now."""
        return torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)

    def advance(self, cache, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        """After a decode step fed with ``mask`` (:meth:`step_mask`): the cache holds the fed tokens;
        ``next_ids`` are the new samples."""
        self.cache, self.mask, self.next_ids = cache, mask, next_ids
        self.pos = self.pos + 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); cut cache columns that are padding in every row kept (mergeable
        caches only)."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.mask, self.next_ids, self.pos = (t[idx.to(t.device)] for t in (self.mask, self.next_ids, self.pos))
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        self.cache = _cache(
            [(k[idx.to(k.device), :, start:], v[idx.to(v.device), :, start:]) for k, v in kv_tensors(self.cache)]
        )
        self.mask = self.mask[:, start:]
