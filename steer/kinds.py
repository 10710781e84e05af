"""The kind table: which handle applies a vector, looked up by the vector's kind and the requested mode, and
the :class:`SteeringHandle` protocol every handle keeps. Organised like PEFT's tuner registry: one module per
kind, one table that maps to it, no string branches elsewhere.

=====================  ==========================  =====================  ==============================
entry                  vector kinds                modes                  handle (module)
=====================  ==========================  =====================  ==============================
``activation``         refusal, sae, custom        the ops, conditional   :class:`steer.hooks.Steering`
``task_per_request``   task                        per_request (default), :class:`steer.lowrank.TaskSteering`
                                                   conditional
``task_merged``        task                        merged                 :class:`steer.params.MergedTaskSteering`
``sae_clamp``          sae                         clamp                  :class:`steer.sae_clamp.FeatureClamp`
``stack``              stack                       per_request,           :class:`steer.stack.StackSteering`
                                                   conditional
=====================  ==========================  =====================  ==============================

``resolve`` (:mod:`steer.resolve`) validates everything and settles every choice without touching the model;
``attach`` registers hooks (or writes weights) from the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .bake import bake_ablation, bake_task
from .errors import ConfigError
from .hooks import Steering
from .lowrank import TaskSteering
from .ops import OPS
from .params import TASK_LAYOUT, MergedTaskSteering
from .resolve import Resolved, resolve_activation, resolve_clamp, resolve_stack, resolve_task
from .sae_clamp import FeatureClamp
from .stack import STACK_LAYOUT, StackSteering


@runtime_checkable
class SteeringHandle(Protocol):
    """A live intervention. ``with sm.steer(vec) as h:`` … ``h.begin(prompt_length)`` before each new batch of
    requests (the padded prompt length; None lets the handle infer it at prefill), ``h.set_alphas([...])``
    one strength per batch row (0 = that row unsteered; for an SAE clamp the clamp value, None = unclamped),
    ``h.remove()`` takes everything off (idempotent; also on leaving the ``with``, errors included)."""

    alpha: float

    @property
    def active(self) -> bool: ...

    def set_alphas(self, alphas) -> None: ...

    def begin(self, prompt_length: int | None = None) -> None: ...

    def remove(self) -> None: ...

    def __enter__(self): ...

    def __exit__(self, *exc) -> None: ...


@dataclass(frozen=True)
class Kind:
    """One entry of the table. ``modes()``: the modes it takes (None: the default when no mode is asked);
    ``per_layer``: it steers chosen layers' activations, so layer sets, scopes and sites apply to it;
    ``bake``: how ``steer bake`` writes this kind into the weights for good (None: it cannot be baked);
    ``per_row``: its handle takes one value per batch row (``set_alphas([...])``), ``neutral`` being the value
    that leaves a row unsteered (a scheduler gives it to the rows that do not use the handle)."""

    name: str
    vector_kinds: tuple[str, ...]
    modes: Callable[[], tuple]
    resolve: Callable[..., Resolved]
    attach: Callable[..., SteeringHandle]
    per_layer: bool
    bake: Callable[..., dict] | None = None
    per_row: bool = True
    neutral: float | None = 0.0


def _task_per_request(model, res: Resolved) -> TaskSteering:
    return TaskSteering(model, res.vector, res.alpha, condition=res.condition, layers_path=res.layers_path)


def _task_merged(model, res: Resolved) -> MergedTaskSteering:
    return MergedTaskSteering(model, res.vector, res.alpha)


def _clamp(model, res: Resolved) -> FeatureClamp:
    return FeatureClamp(
        model,
        res.sae,
        list(res.features),
        res.alpha,
        layers=list(res.layers),
        site=res.site,
        layers_path=res.layers_path,
    )


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "activation",
            ("refusal", "sae", "custom"),
            lambda: (None, *OPS, "conditional"),
            resolve_activation,
            Steering.from_resolved,
            per_layer=True,
            bake=bake_ablation,
        ),
        Kind(
            "task_per_request",
            ("task",),
            lambda: (None, "per_request", "conditional"),
            resolve_task,
            _task_per_request,
            per_layer=False,
        ),
        Kind(
            "task_merged",
            ("task",),
            lambda: ("merged", "merge"),
            resolve_task,
            _task_merged,
            per_layer=False,
            bake=bake_task,
            per_row=False,
        ),
        Kind("sae_clamp", ("sae",), lambda: ("clamp",), resolve_clamp, _clamp, per_layer=False, neutral=None),
        Kind(
            "stack",
            ("stack",),
            lambda: (None, "per_request", "conditional"),
            resolve_stack,
            StackSteering,
            per_layer=False,
        ),
    )
}

LAYOUTS = {
    "task": TASK_LAYOUT,
    "stack": STACK_LAYOUT,
}  # vector kind -> how its extra tensors behave under arithmetic (ExtraLayout)


def kind_for(vector, mode: str | None = None) -> Kind:
    """The table entry that applies ``vector`` in ``mode`` (None: its default); ConfigError naming the modes
    this vector's kind takes otherwise."""
    takes = [k for k in KINDS.values() if vector.kind in k.vector_kinds]
    for k in takes:
        if mode in k.modes():
            return k
    modes = [m for k in takes for m in k.modes() if m is not None]
    raise ConfigError(
        f"a vector of kind {vector.kind!r} cannot be applied in mode {mode!r}",
        expected=" | ".join(dict.fromkeys(modes)) or "a known vector kind",
        found=repr(mode),
        fix="pick one of those modes (or leave the mode unset for the vector's default)",
    )


def bakeable(vector) -> Kind:
    """The entry that can write ``vector`` into the weights (ConfigError naming what can be baked otherwise)."""
    for k in KINDS.values():
        if vector.kind in k.vector_kinds and k.bake is not None:
            return k
    raise ConfigError(
        f"a vector of kind {vector.kind!r} cannot be baked into weights",
        expected="a task vector, or directions to ablate (--mode ablate)",
        found=f"kind {vector.kind!r}",
        fix="steer at run time with `steer generate --vector` instead",
    )


def attach(model, res: Resolved) -> SteeringHandle:
    """Attach a resolved steering (hooks or weights); the handle is a context manager."""
    return KINDS[res.kind].attach(model, res)
