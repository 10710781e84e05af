"""Parameter steering, merged mode: the weights become θ = θ₀ + α·τ in place, for one α per batch.

A task vector τ (task arithmetic, Ilharco et al. 2023; safety vectors, Bhardwaj et al. 2024) is a
weight delta. Merged mode writes ``θ₀ + α·τ`` into the touched parameters and keeps θ₀ on the side:

* an α switch is one fused, bandwidth-bound pass per tensor, ``torch.add(θ₀, τ, alpha=α, out=θ)``
  (read θ₀, read τ, write θ — the minimum traffic), always re-derived from θ₀, so switching back and
  forth never drifts;
* restoring copies θ₀ back (``copy_``, bit-exact — never by subtracting α·τ), also when the ``with``
  body raises; ``restore()`` is idempotent;
* finiteness is guaranteed before anything is written: ``max|θ₀| + |α|·max|τ|`` (both measured once at
  attach) bounds every entry of the result, so when that bound is below half the dtype's largest finite
  value no per-switch ``isfinite`` pass is needed; otherwise the new values are built in a scratch
  buffer and checked with ``isfinite`` before the commit, and a non-finite result raises
  :class:`~steer.errors.AlphaError` with the weights untouched.

For one α per request (mixed-α batches) use :mod:`steer.lowrank` instead. τ is read from a vector of
kind ``"task"`` (layout in :mod:`steer.vectors.task`: dense ``task.<param>`` or factors
``task.<param>.up`` [out, R] / ``.down`` [R, in] in Linear orientation, ΔP = (up @ down)ᵀ for GPT-2
``Conv1D`` weights). Low-rank factors are expanded to a dense τ once, at attach (merged mode trades
memory for a 1× weight-traffic forward). τ is kept in float32 (the sum is computed in fp32 and rounded
once into the parameter's dtype); θ₀ is a copy in the parameter's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import check_alpha, row_alphas
from .errors import AlphaError, ModelMismatchError, VectorFileError
from .layers import fingerprint
from .vector import ExtraLayout, SteeringVector

PREFIX = "task."


# ----------------------------------------------------------------------------------- the file layout
def task_tensors(name: str, *, dense: torch.Tensor | None = None, factors: tuple | None = None) -> dict:
    """The ``extra`` entries that store τ of parameter ``name``: dense (the parameter's own layout) or low-rank
    factors ``(up [out, R], down [R, in])`` in Linear orientation."""
    if factors is not None:
        return {f"{PREFIX}{name}.up": factors[0], f"{PREFIX}{name}.down": factors[1]}
    return {f"{PREFIX}{name}": dense.contiguous()}


def scale_task_extra(extra: dict, scale: float) -> dict:
    """``scale * τ``: dense deltas and the ``.up`` factor of low-rank ones scale; ``.down`` factors do not."""
    return {k: v * scale if k.startswith(PREFIX) and not k.endswith(".down") else v for k, v in extra.items()}


TASK_LAYOUT = ExtraLayout(scale_extra=scale_task_extra, addable=False)


# ----------------------------------------------------------------------------------- reading τ
def task_info(vector: SteeringVector) -> dict:
    """``meta["task"]["params"]``: name -> {shape, conv1d, rank, ...}; VectorFileError if not a task vector."""
    info = (vector.meta.get("task") or {}).get("params")
    if vector.kind != "task" or not isinstance(info, dict) or not info:
        raise VectorFileError(
            "not a task vector",
            expected="a vector of kind 'task' (steer vectors task)",
            found=f"kind {vector.kind!r}",
            fix="pass a file made by `steer vectors task`",
        )
    return info


def factors(vector: SteeringVector, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up [out, R], down [R, in]) float32 in Linear orientation, or None when τ of ``name`` is dense."""
    up, down = vector.extra.get(f"{PREFIX}{name}.up"), vector.extra.get(f"{PREFIX}{name}.down")
    if up is None or down is None:
        return None
    return up.float(), down.float()


def dense_tau(vector: SteeringVector, name: str) -> torch.Tensor:
    """float32 τ of parameter ``name`` in the parameter's own layout (low-rank factors multiplied out)."""
    dense = vector.extra.get(f"{PREFIX}{name}")
    if dense is not None:
        return dense.float()
    pair = factors(vector, name)
    if pair is None:
        raise VectorFileError(
            f"task vector lacks the tensors of {name}",
            expected=f"extra.{PREFIX}{name} or its .up/.down factors",
            found="neither",
            fix="recompute the vector with `steer vectors task`",
        )
    d = pair[0] @ pair[1]
    return d.T.contiguous() if task_info(vector)[name].get("conv1d") else d


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight stored [in, out], y = x W + b), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_task_model(vector: SteeringVector, model: nn.Module) -> dict[str, nn.Parameter]:
    """Check names, shapes and Conv1D layout of every τ against ``model``; return name -> parameter."""
    info = task_info(vector)
    vector.check_model(fingerprint(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, meta in info.items():
        found = tuple(params[name].shape) if name in params else None
        if found != tuple(meta["shape"]):
            raise ModelMismatchError(
                f"the task vector changes parameter {name}, which this model "
                + ("lacks" if found is None else "has in another shape"),
                expected=f"{name} of shape {tuple(meta['shape'])}",
                found="no such parameter" if found is None else str(found),
                fix="apply the vector to the architecture (and size) it was computed on",
            )
    modules = dict(model.named_modules())
    for name, meta in info.items():
        owner = modules.get(name.rpartition(".")[0])
        conv = owner is not None and is_conv1d(owner) and name.endswith(".weight")
        if bool(meta.get("conv1d")) != conv:
            raise ModelMismatchError(
                f"parameter {name} has another layout (Conv1D vs Linear)",
                expected=f"conv1d={bool(meta.get('conv1d'))}",
                found=f"conv1d={conv}",
                fix="apply the vector to the architecture it was computed on",
            )
    return {n: params[n] for n in info}


# ----------------------------------------------------------------------------------- merged mode
class MergedTaskSteering:
    """θ = θ₀ + α·τ written into the model's parameters while active (see module docstring).

    Context manager; :meth:`set_alpha` switches α (re-derived from θ₀), :meth:`restore` puts θ₀ back.
    ``set_alphas`` accepts a per-row list only when every row has the same α (merged mode has one α).
    """

    mode = "merged"

    def __init__(self, model: nn.Module, vector: SteeringVector, alpha: float = 1.0):
        self.model = model
        params = check_task_model(vector, model)
        self.alpha = 0.0
        self._entries: list[tuple[str, nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._bound: list[tuple[float, float, float]] = []  # (max|θ₀|, max|τ|, dtype max)
        with torch.no_grad():
            for name, p in params.items():
                tau = dense_tau(vector, name).to(p.device).contiguous()
                if tau.shape != p.shape:
                    raise ModelMismatchError(
                        f"τ of {name} has the wrong shape",
                        expected=str(tuple(p.shape)),
                        found=str(tuple(tau.shape)),
                        fix="recompute the vector",
                    )
                t_max = float(tau.abs().max()) if tau.numel() else 0.0
                if t_max != t_max or t_max == float("inf"):
                    raise VectorFileError(
                        f"τ of {name} contains NaN or inf",
                        expected="finite deltas",
                        found="non-finite entries",
                        fix="recompute the vector",
                    )
                theta0 = p.detach().clone()
                p_max = float(theta0.abs().max().float()) if theta0.numel() else 0.0
                self._entries.append((name, p, theta0, tau))
                self._bound.append((p_max, t_max, float(torch.finfo(p.dtype).max)))
        self._applied = False
        self.set_alpha(alpha)

    # ------------------------------------------------------------------ α
    def _check_finite(self, alpha: float) -> None:
        """Raise AlphaError (touching nothing) if θ₀ + α·τ would hold inf/NaN in some tensor."""
        if abs(alpha) > torch.finfo(torch.float32).max:
            raise AlphaError(
                f"alpha={alpha} does not fit in float32",
                expected="|alpha| < 3.4e38",
                found=str(alpha),
                fix="use a smaller |alpha|",
            )
        for (name, p, theta0, tau), (p_max, t_max, limit) in zip(self._entries, self._bound):
            if p_max == p_max and p_max + abs(alpha) * t_max < 0.5 * limit:
                continue  # the bound proves every entry finite: no pass over the tensor needed
            try:
                value = torch.add(theta0.float(), tau, alpha=alpha).to(p.dtype)
                finite = bool(torch.isfinite(value).all())
            except RuntimeError:  # α itself overflows float32
                finite = False
            if not finite:
                raise AlphaError(
                    f"alpha={alpha} makes parameter {name} non-finite",
                    expected="finite weights",
                    found="inf or NaN after θ₀ + α·τ",
                    fix="use a smaller |alpha|",
                )

    def set_alpha(self, alpha: float) -> None:
        """Write θ₀ + α·τ into every touched parameter (α = 0 writes θ₀ back exactly)."""
        alpha = check_alpha(alpha)
        self._check_finite(alpha)
        try:
            with torch.no_grad():
                for _, p, theta0, tau in self._entries:
                    if alpha == 0.0:
                        p.copy_(theta0)
                    elif p.dtype == torch.float32:
                        torch.add(theta0, tau, alpha=alpha, out=p.data)
                    else:  # fp32 maths, one rounding into the parameter's dtype
                        p.copy_(torch.add(theta0.float(), tau, alpha=alpha))
        except BaseException:
            self.restore()
            raise
        self.alpha = alpha
        self._applied = True

    def begin(self, prompt_length: int | None = None) -> None:
        """A new batch of requests (the weights hold θ₀ + α·τ for every token; nothing to do)."""

    def set_alphas(self, alphas) -> None:
        """Merged mode has one α: a float, or a per-row list whose values are all equal."""
        values = row_alphas(alphas).tolist()
        if any(v != values[0] for v in values):
            raise AlphaError(
                "merged mode applies one alpha to the whole batch",
                expected="equal alphas",
                found=str(values[:8]),
                fix="use the per-request mode (mode=None) for mixed alphas",
            )
        if values[0] != self.alpha or not self._applied:
            self.set_alpha(values[0])

    # ------------------------------------------------------------------ lifetime
    def restore(self) -> None:
        """Copy θ₀ back into every parameter (bit-exact, idempotent) and release the saved copies."""
        with torch.no_grad():
            while self._entries:
                _, p, theta0, _ = self._entries.pop()
                p.copy_(theta0)
        self._bound.clear()
        self._applied = False

    remove = restore

    @property
    def active(self) -> bool:
        return bool(self._entries)

    @property
    def param_names(self) -> list[str]:
        return [e[0] for e in self._entries]

    def nbytes(self) -> int:
        """Bytes of the touched parameters (the size one α switch writes)."""
        return sum(p.numel() * p.element_size() for _, p, _, _ in self._entries)

    def __enter__(self) -> "MergedTaskSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"MergedTaskSteering(alpha={self.alpha}, tensors={len(self._entries)}, active={self.active})"
