"""Safety task vectors: τ = θ_aligned − θ_base, stored in steer's vector file format.

* Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): adding α·τ to a model's
  weights moves it along the fine-tuning that produced τ. A *safety* vector is τ = θ_aligned − θ_base;
  the same command with a compromised model as ALIGNED and the aligned model as BASE gives a *harm*
  vector, applied with negative α (Safety Arithmetic, Bhardwaj et al. 2024).
* ``include`` / ``exclude`` regexes select parameters by name — e.g. MLP weights only, where safety
  fine-tuning makes small, specific changes (Jain et al. 2024).
* ``top_k``: TIES-style magnitude pruning (Yadav et al. 2023) keeps that fraction of entries per tensor.
* ``rank``: per-matrix low-rank factors by SVD, with the retained energy ‖τ_R‖²_F / ‖τ‖²_F per tensor.

File layout (kind ``"task"``; ``directions`` is empty, everything lives in ``extra``)::

    extra.task.<param>        dense delta, same shape and layout as the parameter
    extra.task.<param>.up     [out, R]   } low-rank delta in *Linear orientation*:
    extra.task.<param>.down   [R, in]    }   ΔW = up @ down, W the [out, in] weight of y = x Wᵀ
    meta["task"] = {"params": {name: {"shape", "conv1d", "rank", "energy", "kept", "module"}},
                    "include", "exclude", "top_k", "rank", "role"}

For a Linear weight W [out, in]: y = x Wᵀ + α·(x downᵀ) upᵀ. A GPT-2 ``Conv1D`` weight is stored as
[in, out] (y = x W); its factors are still in Linear orientation, so ΔP = (up @ down)ᵀ — ``conv1d`` in the
metadata says so. Any other 2-D parameter (embeddings) uses ΔP = up @ down in its own layout.
Top-k pruning happens before the SVD. Tied parameters (one tensor under two names) appear once, under
the first name ``named_parameters`` reports. Deltas are computed and stored in float32.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from steer.errors import ModelMismatchError, VectorFileError
from steer.params import MergedTaskSteering, is_conv1d, task_info, task_tensors
from steer.progress import progress_bar
from steer.vector import SteeringVector


# ------------------------------------------------------------------------------------------ parameters
def _unwrap(model) -> nn.Module:
    return getattr(model, "model", model) if not isinstance(model, nn.Module) else model


def unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter, each tensor once (tied weights detected by storage pointer, first name wins)."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        ptr = id(p) if p.device.type == "meta" else p.untyped_storage().data_ptr()  # meta: no storage
        key = (p.device, ptr, p.storage_offset(), tuple(p.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = p
    return out


def conv1d_params(model: nn.Module) -> set[str]:
    """Names of GPT-2 style ``Conv1D`` weights (stored [in, out])."""
    return {f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules() if is_conv1d(mod)}


def module_kinds(model) -> dict[str, str]:
    """Each parameter's role, recorded in the file so exporters need no model: ``linear`` / ``conv1d`` (the
    weight of a projection, what LoRA can carry), ``embedding`` (input or output embeddings, lm_head included),
    ``bias``, or ``other`` (norms and the rest)."""
    model = _unwrap(model)
    emb = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    out = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, nn.Embedding) or id(mod) in emb:
                out[name] = "embedding"
            elif pname == "bias":
                out[name] = "bias"
            elif pname == "weight" and isinstance(mod, nn.Linear):
                out[name] = "linear"
            elif pname == "weight" and is_conv1d(mod):
                out[name] = "conv1d"
            else:
                out[name] = "other"
    return out


def _select(names, include: str | None, exclude: str | None) -> list[str]:
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as err:
        raise VectorFileError(
            "bad parameter-name regex",
            expected="a Python regular expression",
            found=f"{err.pattern!r}: {err}",
            fix="fix --include / --exclude",
        ) from None
    return [n for n in names if (inc is None or inc.search(n)) and (exc is None or not exc.search(n))]


# ------------------------------------------------------------------------------------------ compute
def _top_k(delta: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    n = delta.numel()
    k = max(1, int(round(fraction * n)))
    if k >= n:
        return delta, n
    flat = delta.reshape(-1)
    idx = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(delta.shape), k


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, R], down [R, in], energy) with matrix ≈ up @ down; energy = ‖up@down‖²_F / ‖matrix‖²_F."""
    m = matrix.float()
    r = min(rank, *m.shape)
    total = float(m.pow(2).sum())
    if min(m.shape) > 1024 and r < min(m.shape) // 4:  # randomized SVD for big matrices (Halko et al. 2011)
        u, s, v = torch.svd_lowrank(m, q=min(r + 10, min(m.shape)), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    energy = float(s.pow(2).sum()) / total if total > 0 else 1.0
    root = s.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous(), min(energy, 1.0)


@torch.no_grad()
def compute_task_vector(
    aligned_model,
    base_model,
    *,
    include: str | None = None,
    exclude: str | None = None,
    top_k: float | None = None,
    rank: int | None = None,
    role: str = "safety",
    progress: bool = True,
) -> SteeringVector:
    """τ = θ_aligned − θ_base as a :class:`SteeringVector` of kind ``"task"`` (see module docstring).

    Models may be ``nn.Module`` or :class:`steer.SteeredModel`. ``role`` is ``"safety"`` (recommended
    α = 1) or ``"harm"`` (τ = θ_compromised − θ_aligned, recommended α = −1).
    """
    from steer.layers import fingerprint

    aligned, base = _unwrap(aligned_model), _unwrap(base_model)
    if top_k is not None and not 0.0 < float(top_k) <= 1.0:
        raise VectorFileError(
            "--top-k is a fraction of entries kept per tensor",
            expected="0 < top_k <= 1",
            found=str(top_k),
            fix="e.g. --top-k 0.2 keeps the largest 20% of each tensor",
        )
    if rank is not None and (isinstance(rank, bool) or int(rank) < 1):
        raise VectorFileError(
            "--rank must be a positive integer",
            expected="rank >= 1",
            found=str(rank),
            fix="e.g. --rank 8, or leave it out for dense deltas",
        )
    if role not in ("safety", "harm"):
        raise VectorFileError(
            "unknown task-vector role",
            expected="'safety' or 'harm'",
            found=repr(role),
            fix="use role='harm' for θ_compromised − θ_aligned",
        )
    pa, pb = unique_parameters(aligned), unique_parameters(base)
    only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
    if only_a or only_b:
        raise ModelMismatchError(
            "the two models have different parameters",
            expected="the same architecture (a fine-tune and its base)",
            found=f"only in ALIGNED: {only_a[:5]}{'…' if len(only_a) > 5 else ''}; "
            f"only in BASE: {only_b[:5]}{'…' if len(only_b) > 5 else ''}",
            fix="pass a fine-tuned model and the model it was fine-tuned from",
        )
    bad = [(n, tuple(pa[n].shape), tuple(pb[n].shape)) for n in pa if pa[n].shape != pb[n].shape]
    if bad:
        n, sa, sb = bad[0]
        raise ModelMismatchError(
            f"parameter {n} has different shapes ({len(bad)} mismatches)",
            expected=f"{sb} (as in BASE)",
            found=f"{sa} in ALIGNED",
            fix="pass models of the same size",
        )
    names = _select(list(pa), include, exclude)
    if not names:
        raise VectorFileError(
            "no parameter matches the include/exclude filters",
            expected=f"at least one of {list(pa)[:4]}…",
            found=f"include={include!r}, exclude={exclude!r}",
            fix="loosen the regexes",
        )
    conv = conv1d_params(base)
    kinds = module_kinds(base)
    extra, params, skipped = {}, {}, []
    with progress_bar(progress, len(names), "task vector") as advance:
        for name in names:
            _one_tensor(name, pa, pb, conv, top_k, rank, extra, params, skipped)
            if name in params:
                params[name]["module"] = kinds.get(name, "other")
            if advance is not None:
                advance(1)
    if not params:
        raise VectorFileError(
            "the two models are identical on every selected parameter",
            expected="a fine-tune and its base",
            found=f"{len(names)} unchanged tensors",
            fix="check the paths (ALIGNED first, BASE second)",
        )
    fp = fingerprint(base)
    meta = {
        "kind": "task",
        "op": "add",
        "model": fp,
        "task": {
            "params": params,
            "include": include,
            "exclude": exclude,
            "top_k": None if top_k is None else float(top_k),
            "rank": None if rank is None else int(rank),
            "role": role,
            "unchanged": skipped,
        },
        "recommended": {"alpha": 1.0 if role == "safety" else -1.0, "mode": "merge"},
        "provenance": {
            "method": "task_arithmetic",
            "aligned": getattr(getattr(aligned, "config", None), "_name_or_path", "") or "",
            "base": fp["name_or_path"],
        },
    }
    return SteeringVector({}, meta, None, extra)


# ------------------------------------------------------------------------------------------ apply
def apply_task_vector(model, vector: SteeringVector, alpha: float = 1.0) -> MergedTaskSteering:
    """Add α·τ to ``model``'s weights now; use as ``with apply_task_vector(m, v, 1.0): ...`` to restore.

    This is the runtime's merged mode (:class:`steer.params.MergedTaskSteering`): names, shapes, layout and
    finiteness are checked before any weight changes, and θ₀ is restored bit-exactly from a saved copy.
    """
    return MergedTaskSteering(_unwrap(model), vector, alpha)


# ------------------------------------------------------------------------------------------ report
def energy_table(vector: SteeringVector, max_rows: int = 60):
    """A rich Table: parameter, shape, kept entries, rank, retained energy, ‖τ‖."""
    from rich.table import Table

    info = task_info(vector)
    t = vector.meta["task"]
    title = f"task vector ({t.get('role')}): {len(info)} tensors" + (f", rank {t['rank']}" if t.get("rank") else "")
    table = Table(title=title)
    for col in ("parameter", "shape", "kept", "rank", "energy", "‖τ‖"):
        table.add_column(
            col,
            justify="left" if col == "parameter" else "right",
            overflow="fold" if col == "parameter" else "ellipsis",
        )
    for i, (name, p) in enumerate(info.items()):
        if i == max_rows:
            table.add_row(f"… {len(info) - max_rows} more", "", "", "", "", "")
            break
        table.add_row(
            name + (" (Conv1D)" if p.get("conv1d") else ""),
            "×".join(map(str, p["shape"])),
            str(p.get("kept")),
            "dense" if p.get("rank") is None else str(p["rank"]),
            f"{p.get('energy', 1.0):.4f}",
            f"{p.get('norm', 0.0):.4g}",
        )
    return table


def _one_tensor(name, pa, pb, conv, top_k, rank, extra: dict, params: dict, skipped: list) -> None:
    """τ of one parameter into ``extra`` (dense or low-rank, :func:`steer.params.task_tensors`) and its record."""
    delta = pa[name].detach().float().cpu() - pb[name].detach().float().cpu()
    if not torch.isfinite(delta).all():
        raise ModelMismatchError(
            f"parameter {name} differs by NaN or inf",
            expected="finite weights",
            found="non-finite entries",
            fix="check both checkpoints load correctly",
        )
    if not delta.any():
        skipped.append(name)
        return
    kept = delta.numel()
    if top_k is not None:
        delta, kept = _top_k(delta, float(top_k))
    info = {
        "shape": list(delta.shape),
        "conv1d": name in conv,
        "rank": None,
        "energy": 1.0,
        "kept": kept,
        "norm": round(float(delta.norm()), 6),
    }
    if rank is not None and delta.dim() == 2:
        mat = delta.T if info["conv1d"] else delta  # Linear orientation [out, in]
        up, down, energy = low_rank(mat, int(rank))
        extra.update(task_tensors(name, factors=(up, down)))
        info.update(rank=int(up.shape[1]), energy=round(energy, 6))
    else:
        extra.update(task_tensors(name, dense=delta))
    params[name] = info
