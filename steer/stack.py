"""Stacks: several vectors of different kinds applied together, with one strength and one gate per request.

Which kind restores safety depends on the model, and on some models one kind alone is not enough: the
parameter-space harm vector (FINETUNED − ALIGNED) gives back the aligned weights, whose refusal is itself only a
few tokens deep (Qi et al. 2024: a compliant prefill is continued), while a refusal direction added at the
prompt (Arditi et al. 2024) makes the model start a refusal that the fine-tuned weights then fail to finish.
Together, θ − τ finishes what the direction starts. A stack is one file and one handle for such a combination.

File (kind ``stack``): each member's tensors under ``extra.m<i>.direction.<layer>``,
``extra.m<i>.condition.direction`` and ``extra.m<i>.extra.<name>``; ``meta["members"]`` holds each member's own
metadata, whose ``recommended`` (α, layers, mode, scope) says how that member is applied. The stack's own α
(``recommended.alpha``, per request) multiplies every member's α, so α = 0 leaves a row unsteered, bit for bit.

The gate (``recommended.mode = "conditional"`` with the stack's ``condition``): one decision per request for
every member, read by the task member's **gate pass** (:mod:`steer.lowrank`: the prompt through blocks ``0..c``
of the model without the stack, before the real forward), then pushed to every activation member as its row's
α. A closed row runs the unsteered model. So a gated stack needs exactly one task member, and its activation
members must steer after the condition block's output is read (as for a gated activation vector).
"""

from __future__ import annotations

import copy

import torch

from .config import check_gates, row_alphas, spread_rows
from .errors import ConfigError, VectorFileError
from .vector import ExtraLayout, SteeringVector

PREFIX = "m"


def _no_arithmetic(extra: dict, scale: float) -> dict:
    raise VectorFileError(
        "a stack is not scaled with *",
        expected="a stack's strength in its α (recommended.alpha, or alpha= per request)",
        found=f"scale {scale}",
        fix="pass alpha=..., or scale the members before stacking them",
    )


STACK_LAYOUT = ExtraLayout(scale_extra=_no_arithmetic, addable=False)


def make_stack(
    members: list[SteeringVector],
    *,
    condition: dict | None = None,
    condition_direction: torch.Tensor | None = None,
    alpha: float = 1.0,
    meta: dict | None = None,
) -> SteeringVector:
    """One file from ``members`` (each applied as its ``recommended`` says), gated by ``condition`` when given."""
    if len(members) < 2 or not all(isinstance(m, SteeringVector) for m in members):
        raise ConfigError(
            "a stack needs at least two vectors",
            expected="a list of two or more SteeringVector",
            found=f"{len(members)} member(s)",
            fix="apply a single vector directly",
        )
    extra: dict[str, torch.Tensor] = {}
    metas = []
    for i, m in enumerate(members):
        if m.kind == "stack":
            raise ConfigError(
                "stacks do not nest", expected="refusal, sae, custom or task members", found="a stack", fix="flatten it"
            )
        _check_member(i, m.meta)
        p = f"{PREFIX}{i}."
        extra.update({f"{p}direction.{l}": d.clone() for l, d in m.directions.items()})  # own storage: a file
        extra.update({f"{p}extra.{k}": t.clone() for k, t in m.extra.items()})  # may not share tensors
        if m.condition_direction is not None:
            extra[f"{p}condition.direction"] = m.condition_direction.clone()
        metas.append(copy.deepcopy({k: v for k, v in m.meta.items() if k != "norms"}))
    models = [m.meta.get("model") for m in members if m.meta.get("model")]
    judges = [m.meta["judge"] for m in members if m.meta.get("judge")]  # so evaluate / tune find the pair judge
    out = {
        **(meta or {}),
        "kind": "stack",
        "members": metas,
        "model": dict(models[0]) if models else None,
        "recommended": {"alpha": float(alpha), "mode": "conditional" if condition else "per_request"},
    }
    if judges:
        out["judge"] = copy.deepcopy(judges[0])
    if condition:
        out["condition"] = dict(condition)
    cdir = None if condition_direction is None else condition_direction.clone()
    return SteeringVector({}, out, cdir, extra)


def _check_member(i: int, meta) -> None:
    """A member is applied as its ``recommended`` says, ungated: the stack's own condition gates every member."""
    if not isinstance(meta, dict) or meta.get("kind") == "stack":
        raise VectorFileError(
            f"stack member {i}'s metadata is invalid",
            expected="an object of a refusal, sae, custom or task vector",
            found=repr(meta)[:80],
            fix="re-save the stack with steer",
        )
    if (meta.get("recommended") or {}).get("mode") == "conditional":
        raise ConfigError(
            f"stack member {i} asks to be gated on its own",
            expected="members applied ungated (their op, or per_request for a task vector); one gate for the stack",
            found="recommended mode 'conditional'",
            fix="pass the condition to make_stack(condition=..., condition_direction=...) and set the member's "
            "recommended mode to its op (or per_request)",
        )


def _index(name: str, what: str, n: int | None = None) -> int:
    if not (name.isascii() and name.isdecimal()) or (n is not None and int(name) >= n):
        raise VectorFileError(
            f"stack tensor names a bad {what}",
            expected=f"a {what} written in decimal digits" + (f", below {n}" if n is not None else ""),
            found=repr(name),
            fix="re-save the stack with steer",
        )
    return int(name)


def members_of(vector: SteeringVector) -> list[SteeringVector]:
    """The member vectors of a stack file, each validated as a vector of its own."""
    metas = vector.meta.get("members")
    if vector.kind != "stack" or not isinstance(metas, list) or len(metas) < 2:
        raise VectorFileError(
            "not a stack",
            expected="kind 'stack' with meta['members'] (two or more)",
            found=f"kind {vector.kind!r}",
            fix="build one with steer.stack.make_stack",
        )
    if vector.directions:
        raise VectorFileError(
            "a stack keeps its directions in its members",
            expected="extra.m<i>.direction.<layer> tensors only",
            found=f"top-level directions for layers {vector.layers}",
            fix="re-save the stack with steer",
        )
    for i, m in enumerate(metas):
        _check_member(i, m)
    parts: list[dict] = [{"directions": {}, "extra": {}, "cond": None} for _ in metas]
    for name, t in vector.extra.items():
        head, _, rest = name.partition(".")
        if not head.startswith(PREFIX):
            raise VectorFileError(
                f"stack tensor {name!r} belongs to no member",
                expected=f"extra.m<0..{len(metas) - 1}>.*",
                found=name,
                fix="re-save the stack with steer",
            )
        i = _index(head[len(PREFIX) :], "member", len(metas))
        if rest.startswith("direction."):
            layer = _index(rest.split(".", 1)[1], "layer")
            if layer in parts[i]["directions"]:
                raise VectorFileError(
                    f"stack member {i} has two tensors for layer {layer}",
                    expected="one direction per layer",
                    found=name,
                    fix="re-save the stack with steer",
                )
            parts[i]["directions"][layer] = t
        elif rest == "condition.direction":
            parts[i]["cond"] = t
        elif rest.startswith("extra."):
            parts[i]["extra"][rest[len("extra.") :]] = t
        else:
            raise VectorFileError(
                f"unknown stack tensor {name!r}",
                expected="m<i>.direction.<layer>, m<i>.condition.direction or m<i>.extra.<name>",
                found=name,
                fix="re-save the stack with steer",
            )
    return [SteeringVector(p["directions"], copy.deepcopy(m), p["cond"], p["extra"]) for m, p in zip(metas, parts)]


class StackSteering:
    """The handle of a stack (see module docstring): one member handle each, one α and one gate per row.
    ``members``: ``(handle, weight, is_task)``, attached by :func:`steer.kinds.attach` from the resolved stack."""

    def __init__(self, model, res):
        from .kinds import attach
        from .lowrank import TaskSteering

        self.alpha, self.condition, self.mode = res.alpha, res.condition, res.mode
        self._members: list[tuple[object, float, bool]] = []
        self._task = None
        self._rows = torch.tensor([self.alpha], dtype=torch.float32)
        try:
            for r, weight in res.members:
                if r.kind == "task_per_request":  # the gate pass lives with the task member
                    h = TaskSteering(model, r.vector, r.alpha, condition=res.condition, layers_path=r.layers_path)
                    self._task = h
                else:
                    h = attach(model, r)
                self._members.append((h, float(weight), r.kind == "task_per_request"))
            if self._task is not None and self.condition is not None:
                self._task.on_gate = self._follow_gate
            self.set_alphas(self.alpha)
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ per-row α and gates
    def _follow_gate(self, gate: torch.Tensor) -> None:
        """Called by the task member whenever its rows' gates change: every activation member follows."""
        rows = self._rows if self._rows.numel() == gate.numel() else spread_rows(self._rows, gate.numel())
        for h, w, is_task in self._members:
            if not is_task:
                h.set_alphas(rows * w * gate.float())

    def set_alphas(self, alphas) -> None:
        """One α per row (a float for all rows): every member runs at its own α times the row's. 0 = unsteered.
        A gated stack closes every row until the next prefill decides (or :meth:`set_gates`)."""
        self._rows = row_alphas(alphas)
        gated = self.condition is not None
        for h, w, is_task in self._members:
            if is_task or not gated:
                h.set_alphas(self._rows * w)  # a gated task member calls _follow_gate (rows closed)

    def set_gates(self, gates) -> None:
        """Carry each row's decision (``last_gate``) when a scheduler moves rows between batches."""
        check_gates(self.condition, gates, self._rows.numel())
        self._task.set_gates(gates)

    def begin(self, prompt_length: int | None = None) -> None:
        for h, _, _ in self._members:
            h.begin(prompt_length)

    @property
    def last_gate(self) -> torch.Tensor | None:
        return None if self._task is None or self.condition is None else self._task.last_gate

    @property
    def last_scores(self) -> torch.Tensor | None:
        return None if self._task is None or self.condition is None else self._task.last_scores

    # ------------------------------------------------------------------ lifetime
    @property
    def active(self) -> bool:
        return any(h.active for h, _, _ in self._members)

    def remove(self) -> None:
        """Detach every member (idempotent; each member's own removal never raises half-way)."""
        while self._members:
            self._members.pop()[0].remove()
        self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"StackSteering(members={len(self._members)}, alpha={self.alpha}, conditional={bool(self.condition)})"
