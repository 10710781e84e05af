"""Export a task vector as a PEFT LoRA adapter, so vLLM (``--enable-lora``), PEFT and anything that loads LoRA
can apply θ + α·τ per request without steer.

LoRA (Hu et al. 2021) adds ``B·A`` (``A`` [r, in], ``B`` [out, r]) times ``lora_alpha / r`` to a projection's
weight. For each projection weight τ carries (``nn.Linear``, or GPT-2's ``Conv1D`` with ``fan_in_fan_out``),
τ in Linear orientation [out, in] is truncated by SVD to rank r (Eckart–Young: the best rank-r approximation in
Frobenius norm): ``B = α·U_r·√S_r``, ``A = √S_r·V_rᵀ``; ``lora_alpha = r`` so PEFT's and vLLM's scale is 1 and
α lives in ``B``. The relative truncation error ‖τ − B·A/α‖_F / ‖τ‖_F is reported per module (0 when τ was
stored at rank ≤ r, as ``steer vectors task --rank r`` does).

LoRA cannot carry norm, embedding (input or output, ``lm_head`` included) or bias deltas. They are refused,
each named; ``skip_unsupported=True`` exports the rest and reports the share of ‖τ‖² left out.

The directory is what PEFT's ``save_pretrained`` writes and vLLM's ``--lora-modules NAME=DIR`` reads:
``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``, ``bias: none``, no
DoRA, no ``modules_to_save``) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``.

vLLM has no per-request LoRA scale, so α is chosen per adapter: :func:`export_lora_ladder` writes one adapter per
α under ``NAME@α`` (served side by side; a request picks its α by naming the adapter). A resolver plugin that
builds ``NAME@α`` on demand was not chosen: it would write files at request time, which ``steer serve``'s policy
forbids, and a fixed ladder is what an operator can review and bound (as ``--alpha-range`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer.config import check_alpha
from steer.errors import ConfigError, VectorFileError
from steer.params import dense_tau, task_info
from steer.vector import SteeringVector

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
LORA_KINDS = ("linear", "conv1d")


def split_targets(vector: SteeringVector) -> tuple[list[str], dict[str, str]]:
    """(parameters LoRA can carry, {parameter: why not}) of a task vector."""
    info = task_info(vector)
    missing = [n for n, i in info.items() if i.get("module") is None]
    if missing:
        raise VectorFileError(
            "this task vector does not record which module each parameter belongs to",
            expected="meta.task.params.<name>.module (written by `steer vectors task` since this release)",
            found=f"no module record for {len(missing)} parameters, e.g. {missing[0]}",
            fix="recompute it with `steer vectors task ALIGNED BASE -o FILE`",
        )
    ok, refused = [], {}
    for name, i in info.items():
        kind = i["module"]
        if kind in LORA_KINDS and name.endswith(".weight"):
            ok.append(name)
        else:
            why = {"embedding": "an embedding", "bias": "a bias"}.get(kind, "a norm or other non-projection tensor")
            refused[name] = why
    return ok, refused


def _rank_r(mat: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with B @ A the best rank-r approximation of ``mat`` (zero-padded to r). An exact
    float64 SVD, unlike :func:`steer.vectors.task.low_rank` (float32, randomized for large matrices): an export
    is done once and its truncation error is what it reports."""
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(mat.shape[0], r, dtype=torch.float64)
    a = torch.zeros(r, mat.shape[1], dtype=torch.float64)
    b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
    return b.float(), a.float()


def export_lora(
    vector: SteeringVector,
    out_dir: str | Path,
    *,
    rank: int = 16,
    alpha: float | None = None,
    skip_unsupported: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict:
    """Write ``vector`` (kind ``task``) at strength ``alpha`` (default: its recommended α) as a LoRA adapter in
    ``out_dir``. Returns the report: per module the truncation error, the skipped tensors, the paths."""
    if rank not in VLLM_RANKS:
        raise ConfigError(
            "unsupported LoRA rank",
            expected=f"one of vLLM's ranks {list(VLLM_RANKS)}",
            found=str(rank),
            fix="pass e.g. --rank 16",
        )
    alpha = check_alpha(vector.recommended.get("alpha", 1.0) if alpha is None else alpha)
    targets, refused = split_targets(vector)
    info = task_info(vector)
    total = sum(float(info[n].get("norm", 0.0)) ** 2 for n in info)
    if refused and not skip_unsupported:
        listing = "; ".join(f"{n} ({why})" for n, why in sorted(refused.items()))
        raise ConfigError(
            f"LoRA cannot carry {len(refused)} of the task vector's tensors",
            expected="deltas of projection weights only (nn.Linear, Conv1D)",
            found=listing,
            fix="pass --skip-unsupported to export the rest (the report gives the share of ‖τ‖² left out), or "
            "recompute the vector with --include/--exclude so it holds projection weights only",
        )
    if not targets:
        raise ConfigError(
            "nothing to export",
            expected="at least one projection weight in the task vector",
            found=f"only {sorted(refused)[:4]}",
            fix="compute the task vector over the model's projections",
        )
    tensors, modules, conv = {}, {}, False
    for name in targets:
        mat = dense_tau(vector, name)  # the parameter's own layout
        if info[name].get("conv1d"):
            mat = mat.T  # Conv1D stores [in, out]; LoRA factors are in Linear orientation
        b, a = _rank_r(mat, rank)
        err = float((mat - b @ a).norm() / mat.norm().clamp_min(1e-30))
        module = name[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (b * alpha).contiguous()
        modules[module] = {"truncation_error": round(err, 6), "shape": list(mat.shape)}
        conv = conv or bool(info[name].get("conv1d"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scale lora_alpha / r = 1: α is in lora_B
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": conv,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or (vector.meta.get("model") or {}).get("name_or_path", ""),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "steer.alpha": str(alpha)})
    left_out = sum(float(info[n].get("norm", 0.0)) ** 2 for n in refused)
    return {
        "dir": str(out),
        "alpha": alpha,
        "rank": rank,
        "modules": modules,
        "max_truncation_error": max(m["truncation_error"] for m in modules.values()),
        "skipped": refused,
        "skipped_energy": round(left_out / total, 6) if total > 0 else 0.0,
    }


def export_lora_ladder(vector: SteeringVector, out_dir: str | Path, name: str, alphas: list[float], **kw) -> dict:
    """One adapter per α: ``out_dir/NAME@α`` (serve them all: ``--lora-modules NAME@α=DIR ...``)."""
    reports = {}
    for a in alphas:
        tag = f"{name}@{float(a):g}"
        reports[tag] = export_lora(vector, Path(out_dir) / tag, alpha=a, **kw)
    return reports
