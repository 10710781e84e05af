"""The plugin's per-request hook: a vLLM V1 logits processor that never changes logits.

vLLM documents logits processors as the place for per-request state: ``validate_params`` runs when a request
arrives (in the frontend), ``update_state`` runs in the worker before every forward with the persistent
batch's changes (requests added at a row, removed, moved), and row i of that batch is the i-th request
segment of the packed forward (``query_start_loc``). This class parses each request's
``extra_args["steer"]`` (a JSON string: ``steer serve``'s ``steer`` field) and mirrors the batch into
:class:`steer.vllm.state.SteerState`'s slot buffers.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from steer.errors import ConfigError
from steer.serve.protocol import APIError, Policy, parse_steer

from .state import ENV, check_conditional_scope, get_state, load_vectors, request_layers, steerable_layers

_policies: dict[str, Policy] = {}


def _frontend_policy() -> Policy:
    """The vectors as the frontend process sees them (names and recommended values, to check requests), loaded
    once per value of ``STEER_VECTORS``."""
    spec = os.environ.get(ENV, "")
    if spec not in _policies:
        _policies[spec] = Policy(vectors=load_vectors(spec))
    return _policies[spec]


def parse_request(extra_args, policy: Policy):
    """The request's steer specs (empty tuple: unsteered); ValueError naming what is wrong."""
    raw = (extra_args or {}).get("steer")
    if raw is None:
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"steer: extra_args['steer'] is not valid JSON ({exc})") from None
    try:
        specs = parse_steer(raw, policy)
    except APIError as exc:
        raise ValueError(f"steer: {exc.message}") from None
    for s in specs:
        vec = policy.vectors[s.vector]
        check_conditional_scope(s.vector, vec, s.scope)
        allowed = steerable_layers(vec)
        asked = request_layers(vec, s)
        if not set(asked) <= set(allowed):
            raise ValueError(
                f"steer: vector {s.vector!r} cannot steer layers {sorted(set(asked) - set(allowed))}; "
                f"it can steer {allowed}"
            )
        if s.mode is not None:
            raise ValueError(
                f"steer: the vLLM plugin applies each vector in its file's mode; a request cannot set mode "
                f"({s.mode!r}) yet"
            )
    return specs


class SteerBatch(LogitsProcessor):
    """Mirrors the persistent batch into the steering slot buffers (logits are returned unchanged)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_request(getattr(sampling_params, "extra_args", None), _frontend_policy())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from . import ARCHITECTURES

        self.vllm_config = vllm_config
        archs = list(getattr(vllm_config.model_config, "architectures", None) or [])
        steering = any(p.strip() for p in os.environ.get(ENV, "").split(","))  # no need to load the files here
        if steering and not set(archs) & set(ARCHITECTURES):
            raise ConfigError(
                f"steer's vLLM plugin cannot steer {', '.join(archs) or 'this model'}",
                expected=f"one of {', '.join(ARCHITECTURES)}",
                found=", ".join(archs) or "no architecture",
                fix=f"unset {ENV} to serve this model unsteered, or steer it with `steer serve` (any transformers "
                "causal LM)",
            )

    def is_argmax_invariant(self) -> bool:
        return True  # logits are never changed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        state = get_state()
        if batch_update is None or state is None:
            return
        for index in batch_update.removed:
            state.release(index)
        for index, params, prompt_ids, _ in batch_update.added:
            specs = parse_request(getattr(params, "extra_args", None), state.policy)
            state.set_slot(index, specs, len(prompt_ids) if prompt_ids is not None else 0, params)
        for a, b, direction in batch_update.moved:
            state.move(a, b, swap=direction == MoveDirectionality.SWAP)
