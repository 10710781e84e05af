"""Resolve before attaching: ``resolve(config, vector, model) -> Resolved`` settles every choice (the kind's
handle, op, layers, α, scope, site, condition) from the config, the vector file's recommendations and the
defaults, validates all of it against the model, and prepares the op's operands, without touching the model
or the caller's objects (the condition is copied, never edited). Attaching a :class:`Resolved` only moves
tensors to devices and registers hooks, so an error can no longer happen half-way through.

Precedence for every field: the config (``SteeringConfig`` / keyword overrides), then the vector's
``recommended``, then its metadata (``op``, ``scope``, ``site``), then the defaults in :mod:`steer.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Condition, SteeringConfig, check_alpha
from .errors import ConfigError, LayerError, VectorFileError
from .layers import check_layers, fingerprint, get_layers
from .ops import Op, get_op
from .vector import SteeringVector


@dataclass(frozen=True)
class Resolved:
    """Everything a handle needs, validated. ``kind`` names the entry of :data:`steer.kinds.KINDS`."""

    kind: str
    alpha: float
    vector: SteeringVector
    mode: str | None = None  # activation: the op's name; task: "merged" | "per_request"; SAE: "clamp"
    op: Op | None = None
    layers: tuple[int, ...] = ()
    scope: str = "all"
    site: str = "output"
    condition: Condition | None = None
    operands: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [M, d] fp32 (CPU)
    n_ablate: int = 0
    features: tuple[int, ...] = ()  # SAE clamp: the features, and the SAE (steer.sae_clamp.SAEWeights)
    sae: object = None
    layers_path: str | None = None
    members: tuple = ()  # stack: ((Resolved, weight), ...), one per member (steer.stack)


def resolve(
    config: SteeringConfig | None,
    vector: SteeringVector | str | Path,
    model: nn.Module,
    *,
    layers_path: str | None = None,
    check_architecture: bool = True,
) -> Resolved:
    """Validate ``config`` + ``vector`` against ``model`` and settle every choice (see module docstring)."""
    from .kinds import kind_for

    config = config if config is not None else SteeringConfig()
    if not isinstance(vector, SteeringVector):
        vector = SteeringVector.load(vector)
    kind = kind_for(vector, config.mode)
    return dataclasses.replace(kind.resolve(config, vector, model, layers_path, check_architecture), kind=kind.name)


# ----------------------------------------------------------------------------------- activation steering
def resolve_activation(
    config: SteeringConfig, vector: SteeringVector, model: nn.Module, layers_path, check_architecture
) -> Resolved:
    blocks = get_layers(model, layers_path)
    fp = fingerprint(model, layers_path)
    vector.check_model(fp, check_architecture=check_architecture)
    rec = vector.recommended
    mode, op = activation_op(vector, config.mode)
    scope = activation_scope(vector, config.scope)
    site = config.site or vector.meta.get("site") or "output"
    layers = tuple(check_layers(config.layers or rec.get("layers") or vector.layers, len(blocks)))
    alpha = check_alpha(config.alpha if config.alpha is not None else rec.get("alpha", 1.0))
    source = config.source_layer if config.source_layer is not None else rec.get("source_layer")
    condition = config.condition or (_vector_condition(vector) if mode == "conditional" else None)
    if condition is not None:
        condition = _checked_condition(condition, len(blocks), fp["hidden_size"])
        first = first_steered(layers, site)
        if scope != "generated" and condition.layer > first:
            raise ConfigError(
                "the condition is read after the first steered activation of the prompt",
                expected=f"condition layer <= {first} (first steered {site} of layer {min(layers)})",
                found=f"condition layer {condition.layer}",
                fix="steer later layers, read the condition earlier, or use scope='generated'",
            )
    operands, shapes, n_ablate = {}, set(), 0
    for layer in layers:
        key = source if source is not None else layer
        d = pick_direction(vector, key).reshape(-1, fp["hidden_size"]).float()
        if op.nonzero and bool((d.norm(dim=-1) == 0).any()):
            raise ConfigError(
                f"layer {layer}: op {op.name!r} needs non-zero directions",
                expected="non-zero directions",
                found="a direction of norm 0",
                fix="use mode='add' or a non-zero vector",
            )
        extras = {name: _extra(vector, name, (layer, key), op) for name in op.needs}
        vecs, n_ablate = op.prepare(d, extras)
        operands[layer] = vecs.contiguous()
        shapes.add((vecs.shape[0], n_ablate))
    if len(shapes) > 1:
        raise ConfigError(
            "layers carry different numbers of directions",
            expected="the same [k, d] shape at every steered layer",
            found=str(sorted(shapes)),
            fix="steer layers whose directions have the same shape",
        )
    return Resolved(
        kind="activation",
        alpha=alpha,
        vector=vector,
        mode=op.name,
        op=op,
        layers=layers,
        scope=scope,
        site=site,
        condition=condition,
        operands=operands,
        n_ablate=n_ablate,
        layers_path=layers_path,
    )


def first_steered(layers, site: str) -> int:
    """The last block whose output a gate may read before steering at ``layers`` touches the residual stream: the
    first steered block's output, or the block before it for ``site="input"``."""
    return int(min(layers)) - (1 if site == "input" else 0)


def _checked_condition(condition: Condition, num_layers: int, width: int) -> Condition:
    """A copy of ``condition`` with its layer validated and normalised; ConfigError if its direction is not
    ``width`` wide."""
    condition = dataclasses.replace(condition, layer=check_layers([condition.layer], num_layers)[0])
    if condition.direction.shape[-1] != width:
        raise ConfigError(
            "condition direction has the wrong width",
            expected=f"[{width}]",
            found=str(tuple(condition.direction.shape)),
            fix="use a condition computed on this model",
        )
    return condition


def _vector_condition(vector: SteeringVector) -> Condition:
    cond = vector.condition
    if not cond or vector.condition_direction is None:
        raise ConfigError(
            "conditional mode needs a condition",
            expected="a vector file with a condition (layer, threshold, condition.direction)",
            found="none in this vector",
            fix="compute one with `steer vectors refusal` or `steer tune`, or pass condition=",
        )
    return Condition(
        layer=int(cond["layer"]),
        direction=vector.condition_direction,
        threshold=cond["threshold"],
        reduce=cond.get("reduce", "last"),
        comparator=cond.get("comparator", ">"),
    )


def activation_op(vector: SteeringVector, mode: str | None = None) -> tuple[str, Op]:
    """The mode directions are applied in (``mode``, else the file's recommended one, else its op, else add) and
    the op that applies them (for ``conditional``: the vector's own op, gated)."""
    mode = mode or vector.recommended.get("mode") or vector.meta.get("op") or "add"
    return mode, get_op((vector.meta.get("op") or "add") if mode == "conditional" else mode)


def activation_scope(vector: SteeringVector, scope: str | None = None) -> str:
    """The token scope: ``scope``, else the file's recommended one, else its own, else all tokens."""
    return scope or vector.recommended.get("scope") or vector.meta.get("scope") or "all"


def pick_direction(vector: SteeringVector, key: int) -> torch.Tensor:
    """The direction stored for layer ``key``, or the file's only one; LayerError otherwise."""
    if key in vector.directions:
        return vector.directions[key]
    if len(vector.directions) == 1:
        return next(iter(vector.directions.values()))
    raise LayerError(
        f"the vector has no direction for layer {key}",
        expected=f"one of {vector.layers}",
        found=str(key),
        fix="steer layers the vector has, or pass source_layer=N to use layer N's direction at every steered layer",
    )


def _extra(vector: SteeringVector, name: str, layers: tuple[int, int], op: Op) -> torch.Tensor:
    """The per-layer tensor ``name`` at the steered layer (it lives in that layer's space), else at the source
    layer the direction came from, else the file's only one."""
    for layer in layers:
        t = vector.extra.get(f"{name}.{layer}")
        if t is not None:
            return t
    only = [v for k, v in vector.extra.items() if k.rpartition(".")[0] == name]
    if len(only) == 1:
        return only[0]
    layer = layers[0]
    raise VectorFileError(
        f"op {op.name!r} needs the vector's {name!r} at layer {layer}",
        expected=f"extra.{name}.{layer} in the vector file",
        found="none" + (f" (the file has {sorted(vector.extra)[:4]})" if vector.extra else ""),
        fix="recompute the vector with `steer vectors refusal` (it stores the reference means), or use another op",
    )


# ----------------------------------------------------------------------------------- task vectors
def _no_layer_options(config: SteeringConfig, why: str, expected: str, fix: str) -> None:
    """ConfigError when ``config`` sets options of one layer's activations for a kind that has none."""
    unused = [k for k in ("layers", "scope", "site", "source_layer") if getattr(config, k) is not None]
    if unused:
        raise ConfigError(why, expected=expected, found=f"{', '.join(unused)} given", fix=fix)


def resolve_task(config: SteeringConfig, vector: SteeringVector, model: nn.Module, layers_path, check_arch):
    from .params import check_task_model

    _no_layer_options(
        config,
        "task vectors change weights, not one layer's activations",
        "only alpha=, mode= ('merged', per-request or 'conditional') and condition=",
        "drop those options for a task vector",
    )
    check_task_model(vector, model)
    alpha = check_alpha(config.alpha if config.alpha is not None else vector.recommended.get("alpha", 1.0))
    gated = config.condition is not None or vector.recommended.get("mode") == "conditional"
    mode = config.mode or ("conditional" if gated else "per_request")
    merged = mode in ("merged", "merge")
    if merged and config.condition is not None:
        raise ConfigError(
            "merged task weights cannot be gated per request",
            expected="mode 'conditional' (or per-request) with a condition",
            found="mode 'merged' and a condition",
            fix="drop mode='merged' to gate the task vector per request",
        )
    condition = None
    if not merged and (mode == "conditional" or config.condition is not None):
        condition = _checked_condition(
            config.condition or _vector_condition(vector),
            len(get_layers(model, layers_path)),
            fingerprint(model, layers_path)["hidden_size"],
        )
    return Resolved(
        kind="task",  # the table's entry is filled in by resolve()
        alpha=alpha,
        vector=vector,
        mode="conditional" if condition is not None else ("merged" if merged else "per_request"),
        condition=condition,
        layers_path=layers_path,
    )


# ----------------------------------------------------------------------------------- SAE clamp
def resolve_clamp(config: SteeringConfig, vector: SteeringVector, model: nn.Module, layers_path, check_arch):
    from .sae_clamp import SAEWeights, check_features

    unused = [k for k in ("scope", "source_layer", "condition") if getattr(config, k) is not None]
    if unused:
        raise ConfigError(
            "an SAE clamp sets feature activations at its layers",
            expected="alpha= (the clamp value), layers=, site= and extra={'features': [...]}",
            found=f"{', '.join(unused)} given",
            fix="drop those options for a clamp",
        )
    sae = SAEWeights.from_vector(vector)
    fp = fingerprint(model, layers_path)
    vector.check_model(fp, check_architecture=check_arch)
    info = vector.meta.get("sae") or {}
    features = config.extra.get("features")
    if features is None:
        top = info.get("features") or []
        if not top:
            raise ConfigError(
                "no features given",
                expected="extra={'features': [ids]}",
                found="none in the vector",
                fix="pass the feature ids to clamp",
            )
        features = [int(top[0]["id"])]
    features = check_features(features, sae, fp["hidden_size"])
    layers = config.layers or ([int(info["layer"])] if "layer" in info else vector.layers)
    site = config.site or info.get("site") or vector.meta.get("site", "output")
    alpha = check_alpha(config.alpha if config.alpha is not None else 0.0)  # a clamp value, not an α to add
    return Resolved(
        kind="sae_clamp",
        alpha=alpha,
        vector=vector,
        mode="clamp",
        layers=tuple(check_layers(list(layers), fp["num_layers"])),
        site=site,
        features=tuple(features),
        sae=sae,
        layers_path=layers_path,
    )


# ----------------------------------------------------------------------------------- stacks
def resolve_stack(config: SteeringConfig, vector: SteeringVector, model: nn.Module, layers_path, check_arch):
    """Each member resolved as its own ``recommended`` says (ungated: the stack's gate decides for all of them),
    its α kept as the member's weight; the stack's α and condition from the config or the file."""
    from .kinds import kind_for
    from .stack import members_of

    _no_layer_options(
        config,
        "a stack applies each member as its file says",
        "only alpha=, mode= ('conditional' or 'per_request') and condition=",
        "drop those options, or apply a member on its own",
    )
    rec = vector.recommended
    alpha = check_alpha(config.alpha if config.alpha is not None else rec.get("alpha", 1.0))
    mode = config.mode or ("conditional" if config.condition is not None else rec.get("mode") or "per_request")
    if mode not in ("conditional", "per_request"):
        raise ConfigError(
            "unknown mode for a stack", expected="conditional | per_request", found=repr(mode), fix="use one of them"
        )
    blocks = get_layers(model, layers_path)
    fp = fingerprint(model, layers_path)
    vector.check_model(fp, check_architecture=check_arch)
    condition = None
    if mode == "conditional" or config.condition is not None:
        condition = _checked_condition(config.condition or _vector_condition(vector), len(blocks), fp["hidden_size"])
    members = []
    for i, m in enumerate(members_of(vector)):
        mrec = m.recommended
        mmode = "per_request" if m.kind == "task" else activation_op(m)[1].name
        k = kind_for(m, mmode)
        if k.name not in ("activation", "task_per_request"):
            raise ConfigError(
                f"stack member {i} ({m.kind}) cannot be stacked",
                expected="activation vectors (refusal, sae, custom) and per-request task vectors",
                found=f"{m.kind} in mode {mmode!r}",
                fix="stack directions and task vectors only",
            )
        r = dataclasses.replace(k.resolve(SteeringConfig(mode=mmode), m, model, layers_path, check_arch), kind=k.name)
        if condition is not None and r.kind == "activation":
            first = first_steered(r.layers, r.site)
            if condition.layer > first:
                raise ConfigError(
                    f"stack member {i} steers before the gate is read",
                    expected=f"its first steered activation at or after block {condition.layer}'s output",
                    found=f"{r.site} of layer {min(r.layers)}",
                    fix="read the stack's condition at an earlier block, or steer a later layer",
                )
        members.append((r, check_alpha(mrec.get("alpha", 1.0), f"member {i} alpha")))
    tasks = sum(r.kind == "task_per_request" for r, _ in members)
    if condition is not None and tasks != 1:
        raise ConfigError(
            "a gated stack is decided by the gate pass of its task member",
            expected="exactly one task vector among the members",
            found=f"{tasks} task vectors",
            fix="stack one task vector with the directions, or apply the stack ungated (mode='per_request')",
        )
    return Resolved(
        kind="stack",
        alpha=alpha,
        vector=vector,
        mode="conditional" if condition is not None else "per_request",
        condition=condition,
        members=tuple(members),
        layers_path=layers_path,
    )  # fmt: skip
