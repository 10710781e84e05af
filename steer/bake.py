"""Bake steering into the weights: a plain Hugging Face model directory that needs no steer at run time.

* Task vector (kind ``"task"``): θ ← θ₀ + α·τ (task arithmetic, Ilharco et al. 2023), via
  :class:`steer.params.MergedTaskSteering` (same finiteness checks), then the handle is dropped so the
  merged weights stay.
* Direction ablation (op/mode ``ablate``): weight orthogonalisation (Arditi et al. 2024, §4.1). Every
  matrix that *writes* to the residual stream is projected off the unit direction(s) r̂ (span Q)::

      Linear  W [d, in]:  W ← W − Q Qᵀ W          Conv1D W [in, d]:  W ← W − W Q Qᵀ
      Embedding E [V, d]: E ← E − E Q Qᵀ          bias b [d]:        b ← b − Q Qᵀ b

  The writers are the input (and learned position) embeddings and, in every decoder block, the attention
  output projection and the MLP down projection, found by name through :data:`WRITERS` (a
  per-architecture table; unknown architectures get a clear error instead of a silent partial bake).
  Tied input/output embeddings are untied first (the unembedding reads the residual, it must not change).
  Runtime equivalent: ablate r̂ wherever the residual stream is read — the input of block 0, the output
  of every block *and* the mid-block point after attention (Arditi ablates every residual position).
  steer's block sites cover the first two; :func:`runtime_ablation` adds hooks on the attention output
  projections for the third, and tests/test_bake.py checks baked == runtime to 1e-4 (fp32).
  Only β = 1 (full removal) bakes exactly: a partial β compounds at every runtime site.

Activation *addition* is not baked (most modern blocks have no bias to carry ``α·v``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelMismatchError
from .layers import get_layers, hidden_size, text_config
from .params import MergedTaskSteering, is_conv1d
from .vector import SteeringVector

# model_type -> (per-block writer modules: attention output first, then MLP output; extra embeddings)
WRITERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{
        t: (("self_attn.o_proj", "mlp.down_proj"), ())
        for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "granite", "smollm3")
    },
    "gpt2": (("attn.c_proj", "mlp.c_proj"), ("transformer.wpe",)),
    "gpt_neox": (("attention.dense", "mlp.dense_4h_to_h"), ()),
    "falcon": (("self_attention.dense", "mlp.dense_4h_to_h"), ()),
    "opt": (("self_attn.out_proj", "fc2"), ("model.decoder.embed_positions",)),
}
UNSUPPORTED = {
    "gemma2": "attention and MLP outputs pass through a post-norm before they reach the residual stream",
    "gemma3_text": "attention and MLP outputs pass through a post-norm before they reach the residual stream",
    "gemma3": "attention and MLP outputs pass through a post-norm before they reach the residual stream",
}


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelMismatchError(
                f"module {path} not found",
                expected=f"{path} on {type(root).__name__}",
                found="no such attribute",
                fix="extend steer.bake.WRITERS for this model",
            )
    return obj


def writer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that writes to the residual stream, embeddings first."""
    mtype = getattr(text_config(model), "model_type", None)
    if mtype in UNSUPPORTED or mtype not in WRITERS:
        raise ModelMismatchError(
            f"cannot find the residual-stream writers of model_type {mtype!r}",
            expected="one of " + ", ".join(sorted(WRITERS)),
            found=UNSUPPORTED.get(mtype, "an architecture without an entry in steer.bake.WRITERS"),
            fix="use runtime steering (steer generate --vector …), or add the block's output projections "
            "to steer.bake.WRITERS",
        )
    per_block, extra = WRITERS[mtype]
    if getattr(text_config(model), "word_embed_proj_dim", None) not in (None, hidden_size(model)):
        raise ModelMismatchError(
            "embeddings are projected into the residual stream",
            expected="no project_in",
            found="word_embed_proj_dim != hidden_size",
            fix="use runtime steering",
        )
    out = [("input_embeddings", model.get_input_embeddings())] + [(p, _get(model, p)) for p in extra]
    for i, block in enumerate(get_layers(model)):
        out += [(f"layers.{i}.{p}", _get(block, p)) for p in per_block]
    return out


def _basis(vector: SteeringVector, source_layer: int | None, d: int) -> torch.Tensor:
    """Orthonormal Q [k, d] of the direction(s) to ablate."""
    dirs = vector.directions
    key = source_layer if source_layer is not None else vector.recommended.get("source_layer")
    if key is None and len(dirs) > 1:
        first = next(iter(dirs.values()))
        if any(not torch.equal(v, first) for v in dirs.values()):
            raise ConfigError(
                "baking an ablation needs one direction for the whole model",
                expected="a vector with one direction, or a source layer",
                found=f"different directions at layers {list(dirs)}",
                fix="pass --source-layer N (the layer whose direction to remove everywhere)",
            )
        key = next(iter(dirs))
    d_vec = dirs[key] if key is not None else next(iter(dirs.values()))
    d_vec = d_vec.reshape(-1, d).double()
    return torch.linalg.qr(d_vec.T).Q.T if d_vec.shape[0] > 1 else d_vec / d_vec.norm(dim=-1, keepdim=True)


@torch.no_grad()
def _untie(model: nn.Module) -> None:
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is not None and outp.weight is inp.weight:
        outp.weight = nn.Parameter(inp.weight.detach().clone())
        for cfg in {id(model.config): model.config, id(text_config(model)): text_config(model)}.values():
            cfg.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None if not isinstance(model._tied_weights_keys, dict) else {}


@torch.no_grad()
def orthogonalize(model: nn.Module, vector: SteeringVector, source_layer: int | None = None) -> list[str]:
    """Project the direction(s) out of every residual writer, in place; return the module names."""
    writers = writer_modules(model)
    q = _basis(vector, source_layer, hidden_size(model))
    _untie(model)

    def proj_rows(w):  # rows live in the residual space: w − (w Q) Qᵀ
        qq = q.to(w.device)
        return (w.double() - (w.double() @ qq.T) @ qq).to(w.dtype)

    for name, mod in writers:
        if isinstance(mod, nn.Embedding) or is_conv1d(mod):
            mod.weight.copy_(proj_rows(mod.weight))
        elif isinstance(mod, nn.Linear):
            mod.weight.copy_(proj_rows(mod.weight.T).T)
        else:
            raise ModelMismatchError(
                f"{name} is a {type(mod).__name__}",
                expected="Linear, Conv1D or Embedding",
                found=type(mod).__name__,
                fix="extend steer.bake for this module type",
            )
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(proj_rows(bias[None])[0])
    return [n for n, _ in writers]


def bake(
    sm, vector: SteeringVector, *, alpha: float | None = None, mode: str | None = None, source_layer: int | None = None
) -> dict:
    """Bake ``vector`` into ``sm.model`` in place (see module docstring); return a summary dict. The vector's
    kind says how (:func:`steer.kinds.bakeable`): task vectors merge, directions are orthogonalised away."""
    from .kinds import bakeable

    return bakeable(vector).bake(sm, vector, alpha=alpha, mode=mode, source_layer=source_layer)


def bake_task(sm, vector: SteeringVector, *, alpha=None, mode=None, source_layer=None) -> dict:
    """θ₀ + α·τ written into the weights for good (merged mode without the restore)."""
    a = alpha if alpha is not None else vector.recommended.get("alpha", 1.0)
    handle = MergedTaskSteering(sm.model, vector, a)
    names = handle.param_names
    handle._entries.clear()  # keep the merged weights: drop θ₀ without restoring
    return {"kind": "task", "alpha": handle.alpha, "tensors": names}


def bake_ablation(sm, vector: SteeringVector, *, alpha=None, mode=None, source_layer=None) -> dict:
    """A direction ablation orthogonalised into every matrix that writes the residual stream."""
    op = mode or vector.recommended.get("mode") or vector.meta.get("op")
    if op != "ablate":
        raise ConfigError(
            "only direction ablation and task vectors can be baked into weights",
            expected="a task vector, or --mode ablate",
            found=f"op {op!r}",
            fix="pass --mode ablate, or steer at run time with `steer generate --vector`",
        )
    if alpha not in (None, 1.0):
        raise ConfigError(
            "a baked ablation removes the direction completely",
            expected="alpha 1.0",
            found=str(alpha),
            fix="drop --alpha (partial ablation compounds across layers at run time)",
        )
    return {"kind": "ablate", "modules": orthogonalize(sm.model, vector, source_layer)}


def save_baked(sm, out_dir: str | Path, summary: dict) -> Path:
    """Write model + tokenizer as a normal HF directory, recording what was baked in the config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sm.model.config.steer_baked = {k: v for k, v in summary.items() if k in ("kind", "alpha")}
    sm.model.save_pretrained(out)
    if sm.tokenizer is not None:
        sm.tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def runtime_ablation(sm, vector: SteeringVector, source_layer: int | None = None):
    """The run-time equivalent of :func:`orthogonalize`: ablate at block 0's input, after every
    attention output projection (the mid-block residual) and at every block output."""
    from steer.kernels import steer_

    from .config import SteeringConfig
    from .hooks import Steering

    q = _basis(vector, source_layer, hidden_size(sm.model)).float()
    one = SteeringVector({0: q}, {"op": "ablate"})
    n = len(get_layers(sm.model))
    coef = torch.ones(1, q.shape[0])
    handles = []

    def mid(module, args, out):
        h = out if isinstance(out, torch.Tensor) else out[0]
        steer_(h.unsqueeze(0) if h.dim() == 2 else h, q.to(h.device), coef.to(h.device), q.shape[0])

    try:
        handles.append(
            Steering(sm.model, one, SteeringConfig(mode="ablate", site="input", layers=[0], alpha=1.0, source_layer=0))
        )
        handles.append(
            Steering(sm.model, one, SteeringConfig(mode="ablate", layers=list(range(n)), alpha=1.0, source_layer=0))
        )
        attn = WRITERS[getattr(text_config(sm.model), "model_type", None)][0][0]
        for name, mod in writer_modules(sm.model):
            if name.startswith("layers.") and name.endswith("." + attn):
                handles.append(mod.register_forward_hook(mid))
        yield handles
    finally:
        for h in handles:
            h.remove()
