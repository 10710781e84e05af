"""Export a steer vector as a llama.cpp control vector (GGUF).

llama.cpp's format (``common_control_vector_load_one`` in ``common/common.cpp`` and
``llama_adapter_cvec`` in ``src/llama-adapter.cpp``; the same layout repeng's ``export_gguf`` writes):

* GGUF with ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model type, e.g.
  ``"llama"``; informational) and ``controlvector.layer_count`` (uint32, the number of direction tensors);
* one 1-D float32 tensor ``direction.N`` per steered layer. The loader stores ``direction.N`` at buffer row
  ``N − 1`` and the adapter gives graph layer ``il`` row ``il − 1``, so ``direction.N`` is added to the
  output of llama.cpp's (0-based) block ``N`` — **the same index as steer's** ``direction.{N}`` with
  ``site="output"``. ``direction.0`` is rejected by the loader: block 0's output cannot be steered, and
  neither can anything but additions (llama.cpp adds ``strength · direction.N`` to every token).

What is written: ``α · direction.{l}`` for the chosen layers (default: the vector's recommended layers,
else all its layers; default α: the recommended α, else 1), so ``--control-vector file.gguf`` (strength 1)
reproduces ``steer generate --vector`` in add mode; ``--control-vector-scaled file.gguf S`` scales it.
Layers with several directions (``[k, d]``) are an error unless ``direction_index`` picks one of them —
a sum of the k directions would be a different intervention, and llama.cpp has no way to ablate.
steer's own metadata rides along as a JSON string under ``steer.meta`` (llama.cpp ignores unknown keys).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from steer.config import check_alpha
from steer.errors import ConfigError, LayerError, SteerError
from steer.vector import SteeringVector

ARCH = "controlvector"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SteerError(
            "the gguf package is needed to write llama.cpp control vectors",
            expected="gguf installed",
            found="import gguf failed",
            fix="pip install gguf  (or pip install 'steer-runtime[gguf]')",
        ) from None
    return gguf


def gguf_directions(
    vector: SteeringVector,
    *,
    layers: list[int] | None = None,
    alpha: float | None = None,
    direction_index: int | None = None,
    allow_non_add: bool = False,
) -> dict[int, np.ndarray]:
    """The ``{llama.cpp layer N: float32 [d]}`` tensors that :func:`export_gguf` writes."""
    rec = vector.recommended
    mode = rec.get("mode") or vector.meta.get("op") or "add"
    if mode != "add" and not allow_non_add:
        raise ConfigError(
            f"llama.cpp control vectors can only add (unconditionally); this vector's mode is {mode!r}",
            expected="a vector used in add mode",
            found=f"mode {mode!r}",
            fix="export the directions as a plain addition with --as-add (allow_non_add=True); "
            "any ablation or condition is dropped",
        )
    site = vector.meta.get("site", "output")
    chosen = list(layers) if layers else (list(rec.get("layers") or []) or vector.layers)
    a = check_alpha(alpha if alpha is not None else rec.get("alpha", 1.0))
    source = rec.get("source_layer")
    out: dict[int, np.ndarray] = {}
    for layer in chosen:
        key = layer if layer in vector.directions else source
        if key not in vector.directions:
            raise LayerError(
                f"the vector has no direction for layer {layer}",
                expected=f"one of {vector.layers}",
                found=str(layer),
                fix="pass layers the vector has",
            )
        n = layer - 1 if site == "input" else layer  # the input of block i is the output of block i-1
        if n < 1:
            raise LayerError(
                f"layer {layer} ({site}) cannot be expressed as a llama.cpp control vector",
                expected="the output of block 1 or later (direction.0 is rejected by llama.cpp)",
                found=f"block {n} output",
                fix="steer a later layer (--layers)",
            )
        d = vector.directions[key]
        if d.dim() == 2:
            if direction_index is None:
                raise ConfigError(
                    f"layer {layer} holds {d.shape[0]} directions; a control vector holds one",
                    expected="a single direction per layer",
                    found=f"shape {tuple(d.shape)}",
                    fix="pick one with --direction-index i (direction_index=i)",
                )
            if not -d.shape[0] <= direction_index < d.shape[0]:
                raise ConfigError(
                    "direction index out of range",
                    expected=f"0..{d.shape[0] - 1}",
                    found=str(direction_index),
                    fix="pass a valid --direction-index",
                )
            d = d[direction_index]
        out[n] = (a * d.double()).float().numpy().astype(np.float32)
    return dict(sorted(out.items()))


def export_gguf(vector: SteeringVector | str | Path, path: str | Path, **kwargs) -> Path:
    """Write ``vector`` as a llama.cpp control vector at ``path`` (see the module docstring for options)."""
    gguf = _gguf()
    if not isinstance(vector, SteeringVector):
        vector = SteeringVector.load(vector)
    tensors = gguf_directions(vector, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    try:
        writer.add_string(f"{ARCH}.model_hint", str((vector.meta.get("model") or {}).get("model_type") or ""))
        writer.add_uint32(f"{ARCH}.layer_count", len(tensors))
        writer.add_string("steer.meta", json.dumps(vector.meta, sort_keys=True))
        for n, t in tensors.items():
            writer.add_tensor(f"direction.{n}", t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def read_gguf(path: str | Path) -> tuple[dict, dict[int, np.ndarray]]:
    """Read a control vector back: ``({key: value}, {N: float32 [d]})`` (for tests and inspection)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    tensors = {
        int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32).reshape(-1)
        for t in reader.tensors
        if t.name.startswith("direction.")
    }
    return meta, tensors
