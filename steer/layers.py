"""Finding the decoder blocks of any Hugging Face causal LM.

Index convention (used everywhere in steer): layers are the model's decoder blocks, numbered from 0.
Block ``i``'s *output* is the residual stream that Hugging Face reports as ``hidden_states[i + 1]``
(``hidden_states[0]`` is the embedding output); block ``i``'s *input* is ``hidden_states[i]``.
Note that HF applies the final norm to the last entry of ``hidden_states``; steer's hooks see the
block's raw output.

Discovery order: (1) a user override — the ``layers_path`` argument or a ``steer_layers_path`` attribute
on the model, a dotted path such as ``"model.layers"``; (2) known paths of common architectures;
(3) a structural guess: the longest ``nn.ModuleList`` whose children all share one class.
"""

from __future__ import annotations

from torch import nn

from .errors import LayerError, ModelMismatchError

KNOWN_PATHS = (
    "model.layers",  # llama, mistral, mixtral, qwen2/3(+moe), gemma*, phi3, olmo, ...
    "model.language_model.layers",  # gemma3 / llava-style multimodal wrappers
    "model.decoder.layers",  # opt
    "transformer.h",  # gpt2, falcon, gpt-j, bloom
    "gpt_neox.layers",  # gpt-neox, pythia
    "transformer.blocks",  # mpt
    "transformer.layers",
    "model.transformer.h",
)


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _structural_guess(model: nn.Module) -> nn.ModuleList | None:
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best)):
                best = module
    return best


def get_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the decoder blocks of ``model`` as an ``nn.ModuleList`` (see module docstring for order)."""
    path = layers_path or getattr(model, "steer_layers_path", None)
    if path:
        found = _resolve(model, path)
        if not isinstance(found, nn.ModuleList):
            raise LayerError(
                f"layers_path {path!r} does not name a ModuleList on {type(model).__name__}",
                expected="a dotted path to the decoder blocks, e.g. 'model.layers'",
                found=type(found).__name__ if found is not None else "no such attribute",
                fix="print(model) and pass the path of the list of decoder blocks",
            )
        return found
    for known in KNOWN_PATHS:
        found = _resolve(model, known)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    guess = _structural_guess(model)
    if guess is None:
        raise LayerError(
            f"cannot find the decoder layers of {type(model).__name__}",
            expected="a model with a list of decoder blocks (e.g. model.model.layers)",
            found="no nn.ModuleList of identical blocks",
            fix="pass layers_path='dotted.path.to.blocks' (or set model.steer_layers_path)",
        )
    return guess


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = text_config(model)
    for name in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[-1])
    raise ModelMismatchError(
        f"cannot read the hidden size of {type(model).__name__}",
        expected="config.hidden_size (or n_embd / d_model)",
        found="none of them",
        fix="use a transformers model with a standard config",
    )


def fingerprint(model: nn.Module, layers_path: str | None = None) -> dict:
    """The facts a vector file records about its source model and checks against its target."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None) or type(model).__name__,
        "hidden_size": hidden_size(model),
        "num_layers": len(get_layers(model, layers_path)),
        "name_or_path": getattr(config, "_name_or_path", "") or "",
    }


def check_layers(indices, num_layers: int) -> list[int]:
    """Validate layer indices (negative ones count from the end) and return them normalised, sorted."""
    out = []
    for raw in indices:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise LayerError(
                "layer indices must be integers",
                expected=f"integers in [0, {num_layers - 1}]",
                found=repr(raw),
                fix="pass e.g. layers=[3, 4] or --layers 3,4",
            )
        idx = raw + num_layers if raw < 0 else raw
        if not 0 <= idx < num_layers:
            raise LayerError(
                f"unknown layer {raw}",
                expected=f"0 <= layer < {num_layers} (0-based decoder blocks; -1 is the last)",
                found=str(raw),
                fix=f"choose layers between 0 and {num_layers - 1}",
            )
        out.append(idx)
    return sorted(set(out))
