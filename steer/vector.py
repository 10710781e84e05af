"""Self-describing steering vector files (safetensors only — no pickle, no code execution).

A file holds one tensor per layer, ``direction.{layer}`` of shape ``[d]`` (or ``[k, d]`` for several
directions), optionally ``condition.direction`` (``[d]``, for the conditional gate) and any extra tensors a
vector kind or op needs (``extra.*``: ``extra.mean.{layer}``, the harmless mean that ``ace`` projects relative
to, written by ``steer vectors refusal``; a task vector's deltas, :mod:`steer.params`; an SAE's weights,
:mod:`steer.sae_clamp`). The safetensors header metadata key ``"steer"`` holds JSON::

    {"format": "steer.vector", "format_version": 1, "kind": "refusal|task|sae|custom|stack",
     "op": "add|ablate|ablate_add", "site": "output|input", "scope": "all|prompt|generated",
     "norms": {"12": 3.1, ...},
     "model": {"architecture", "model_type", "hidden_size", "num_layers", "name_or_path"},
     "provenance": {"method", "prompt_sets": {name: sha256}, "created", "steer_version", ...},
     "recommended": {"layers": [12], "alpha": 1.0, "mode": "add"},
     "condition": {"layer": 8, "threshold": 0.5, "reduce": "last", "comparator": ">"}}

Loading validates before anything is attached: :meth:`SteeringVector.check_model` raises
:class:`~steer.errors.ModelMismatchError` naming the expected and found hidden size / layer count /
architecture and the fix.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SCOPES, SITES, known_modes
from .errors import ModelMismatchError, VectorFileError
from .ops import OPS

FORMAT = "steer.vector"
FORMAT_VERSION = 1
KINDS = ("refusal", "task", "sae", "custom", "stack")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch.save zip archive


def steer_version() -> str:
    try:
        from importlib.metadata import version

        return version("steer-runtime")
    except Exception:  # not installed (source checkout)
        return "0+unknown"


def _unchanged(extra: dict, scale: float) -> dict:
    return extra


@dataclass(frozen=True)
class ExtraLayout:
    """How a vector kind's ``extra`` tensors behave under arithmetic (the kind owns its layout; see
    :data:`steer.kinds.LAYOUTS`): ``scale_extra(extra, s)`` for ``s * vector``; ``addable``: ``+``/``-`` allowed.
    The default: extras are reference data (e.g. the means ``mean.<layer>``), unchanged by scaling."""

    scale_extra: Callable[[dict, float], dict] = _unchanged
    addable: bool = True


def _layout(kind: str) -> ExtraLayout:
    from .kinds import LAYOUTS  # the kind table sits above this module

    return LAYOUTS.get(kind, ExtraLayout())


@dataclass
class SteeringVector:
    """Directions per layer plus the metadata that says how to apply them.

    ``directions[layer]`` is a float tensor ``[d]`` or ``[k, d]``. ``meta`` is the JSON metadata
    (see module docstring); convenience properties read from it.
    """

    directions: dict[int, torch.Tensor]
    meta: dict = field(default_factory=dict)
    condition_direction: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not self.directions and not self.extra:
            raise VectorFileError(
                "a steering vector needs at least one direction",
                expected="directions={layer: tensor[d]}",
                found="no directions",
                fix="pass at least one layer's direction",
            )
        dims = set()
        clean = {}
        for layer, vec in self.directions.items():
            if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2) or vec.numel() == 0:
                raise VectorFileError(
                    f"direction for layer {layer} has the wrong shape",
                    expected="a tensor of shape [d] or [k, d]",
                    found=f"{type(vec).__name__} {tuple(getattr(vec, 'shape', ()))}",
                    fix="store one direction per layer as a 1-D tensor",
                )
            if not torch.isfinite(vec).all():
                raise VectorFileError(
                    f"direction for layer {layer} contains NaN or inf",
                    expected="finite values",
                    found="non-finite entries",
                    fix="recompute the vector",
                )
            dims.add(int(vec.shape[-1]))
            clean[int(layer)] = vec.detach().to(torch.float32).cpu().contiguous()
        if len(dims) > 1:
            raise VectorFileError(
                "directions have different widths",
                expected="one hidden size for every layer",
                found=str(sorted(dims)),
                fix="store directions of one model only",
            )
        self.directions = dict(sorted(clean.items()))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "custom",
            "op": "add",
            "site": "output",
            "scope": "all",
        }
        meta.update(self.meta or {})
        self.meta = meta
        self._check_meta()
        self.meta["norms"] = {str(k): round(float(v.norm(dim=-1).max()), 6) for k, v in self.directions.items()}

    def _check_meta(self) -> None:
        """Metadata values a loader would act on must be known ones (a file is data, not instructions)."""
        m = self.meta

        def bad(key, expected, found):
            raise VectorFileError(
                f"vector metadata {key} is invalid",
                expected=expected,
                found=repr(found),
                fix="re-save the vector with steer (or fix the metadata)",
            )

        for key, allowed in (("kind", KINDS), ("op", tuple(OPS)), ("site", SITES), ("scope", SCOPES)):
            if m.get(key) not in allowed:
                bad(key, " | ".join(allowed), m.get(key))
        rec = m.get("recommended")
        if rec is not None:
            if not isinstance(rec, dict):
                bad("recommended", "an object", rec)
            modes = tuple(m for m in known_modes() if m != "clamp")  # a clamp is asked for, never recommended
            if rec.get("mode") not in (None, *modes):
                bad("recommended.mode", " | ".join(modes), rec["mode"])
            if rec.get("scope") not in (None, *SCOPES):
                bad("recommended.scope", " | ".join(SCOPES), rec["scope"])
            layers = rec.get("layers")
            if layers is not None and (
                not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            ):
                bad("recommended.layers", "a list of layer indices", layers)
            a = rec.get("alpha")
            if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)):
                bad("recommended.alpha", "a finite number", a)
        cond = m.get("condition")
        if cond is not None:
            if (
                not isinstance(cond, dict)
                or not isinstance(cond.get("layer"), int)
                or isinstance(cond.get("threshold"), bool)
                or not isinstance(cond.get("threshold"), (int, float))
                or not math.isfinite(cond["threshold"])
            ):
                bad("condition", "{layer: int, threshold: finite number, ...}", cond)
            if cond.get("reduce", "last") not in ("last", "mean") or cond.get("comparator", ">") not in (">", "<"):
                bad("condition", "reduce last|mean and comparator > or <", cond)
            c = self.condition_direction
            if (
                c is None
                or c.dim() != 1
                or (self.hidden_size is not None and c.shape[0] != self.hidden_size)
                or not torch.isfinite(c).all()
                or float(c.float().norm()) == 0.0
            ):
                bad(
                    "condition.direction",
                    "a finite non-zero [d] tensor beside the condition",
                    None if c is None else tuple(c.shape),
                )

    # ------------------------------------------------------------------ properties
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def hidden_size(self) -> int | None:
        for vec in self.directions.values():
            return int(vec.shape[-1])
        return (self.meta.get("model") or {}).get("hidden_size")

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "custom")

    @property
    def recommended(self) -> dict:
        return dict(self.meta.get("recommended") or {})

    @property
    def condition(self) -> dict | None:
        cond = self.meta.get("condition")
        return dict(cond) if cond else None

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    # ------------------------------------------------------------------ arithmetic
    def _combine(self, other: "SteeringVector", sign: float) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        for v in (self, other):
            if not _layout(v.kind).addable:
                raise VectorFileError(
                    f"{v.kind} vectors cannot be added with + / -",
                    expected="steering directions",
                    found=f"a {v.kind} vector",
                    fix="apply them one after the other (e.g. steer.vectors.task.apply_task_vector)",
                )
        if self.hidden_size != other.hidden_size:
            raise ModelMismatchError(
                "cannot add vectors of different widths",
                expected=f"hidden size {self.hidden_size}",
                found=f"hidden size {other.hidden_size}",
                fix="combine vectors computed on the same model",
            )
        out = {k: v.clone() for k, v in self.directions.items()}
        for k, v in other.directions.items():
            if k in out and out[k].shape != v.shape:
                raise ModelMismatchError(
                    f"layer {k}: direction shapes differ",
                    expected=str(tuple(out[k].shape)),
                    found=str(tuple(v.shape)),
                    fix="combine vectors with the same number of directions per layer",
                )
            out[k] = out[k] + sign * v if k in out else sign * v.clone()
        meta = {k: v for k, v in self.meta.items() if k not in ("norms", "recommended")}
        meta["provenance"] = {
            "method": "sum" if sign > 0 else "difference",
            "parts": [self.meta.get("provenance"), other.meta.get("provenance")],
        }
        return SteeringVector(out, meta, self.condition_direction, dict(self.extra))

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> "SteeringVector":
        scale = float(scale)
        if not math.isfinite(scale):
            raise VectorFileError(
                "cannot scale by a non-finite number",
                expected="a finite float",
                found=str(scale),
                fix="pass a finite scale",
            )
        meta = {k: v for k, v in self.meta.items() if k != "norms"}
        extra = _layout(self.kind).scale_extra(dict(self.extra), scale)  # e.g. τ lives in a task vector's extra
        return SteeringVector({k: v * scale for k, v in self.directions.items()}, meta, self.condition_direction, extra)

    __rmul__ = __mul__

    def __neg__(self) -> "SteeringVector":
        return self * -1.0

    # ------------------------------------------------------------------ model checks
    def check_model(self, fp: dict, *, check_architecture: bool = True) -> None:
        """Raise ModelMismatchError unless this vector fits a model with fingerprint ``fp`` (a kind's own
        checks, e.g. the parameters a task vector touches, live with the kind: :mod:`steer.kinds`)."""
        src = self.meta.get("model") or {}
        d = self.hidden_size
        if d is not None and d != fp["hidden_size"]:
            raise ModelMismatchError(
                "the vector was made for another hidden size",
                expected=f"hidden size {fp['hidden_size']} ({fp['architecture']})",
                found=f"hidden size {d} "
                f"(vector from {src.get('name_or_path') or src.get('architecture') or 'unknown'})",
                fix="use a vector computed on this model or one of its fine-tunes",
            )
        if src.get("num_layers") not in (None, fp["num_layers"]):
            raise ModelMismatchError(
                "the vector was made for a model with another layer count",
                expected=f"{fp['num_layers']} layers",
                found=f"{src['num_layers']} layers",
                fix="use a vector computed on this model or one of its fine-tunes",
            )
        bad = [k for k in self.directions if not 0 <= k < fp["num_layers"]]
        if bad:
            raise ModelMismatchError(
                f"the vector has directions for layers {bad} that the model does not have",
                expected=f"layers 0..{fp['num_layers'] - 1}",
                found=str(bad),
                fix="use a vector computed on this model",
            )
        if check_architecture and src.get("model_type") not in (None, fp["model_type"]):
            raise ModelMismatchError(
                "the vector was made for another architecture",
                expected=f"model_type {fp['model_type']!r}",
                found=f"model_type {src['model_type']!r}",
                fix="use a vector computed on this architecture (or pass check_architecture=False "
                "if you know the residual streams match)",
            )

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"direction.{k}": v.contiguous() for k, v in self.directions.items()}
        if self.condition_direction is not None:
            tensors["condition.direction"] = self.condition_direction.detach().float().cpu().contiguous()
        for name, t in self.extra.items():
            tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
        meta = dict(self.meta)
        prov = dict(meta.get("provenance") or {})
        prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        prov.setdefault("steer_version", steer_version())
        meta["provenance"] = prov
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"steer": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        path = Path(path)
        meta, tensors = _read(path)
        directions, extra, cond = {}, {}, None
        for name, t in tensors.items():
            if name.startswith("direction."):
                try:
                    directions[int(name.split(".", 1)[1])] = t
                except ValueError:
                    raise VectorFileError(
                        f"{path}: bad tensor name {name!r}",
                        expected="direction.<layer int>",
                        found=name,
                        fix="re-save the vector with steer",
                    ) from None
            elif name == "condition.direction":
                cond = t
            elif name.startswith("extra."):
                extra[name[len("extra.") :]] = t
            else:
                raise VectorFileError(
                    f"{path}: unknown tensor {name!r}",
                    expected="direction.N, condition.direction or extra.*",
                    found=name,
                    fix="re-save the vector with steer",
                )
        return cls(directions, meta, cond, extra)

    def describe(self) -> dict:
        """A plain dict summary (what ``steer info`` prints)."""
        return {
            "kind": self.kind,
            "op": self.meta.get("op"),
            "site": self.meta.get("site"),
            "scope": self.meta.get("scope"),
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "norms": self.meta.get("norms"),
            "model": self.meta.get("model"),
            "recommended": self.meta.get("recommended"),
            "condition": self.meta.get("condition"),
            "provenance": self.meta.get("provenance"),
            "extra_tensors": sorted(self.extra),
            "format_version": self.meta.get("format_version"),
            **(
                {
                    "members": [
                        {"kind": m.get("kind"), "recommended": m.get("recommended")} if isinstance(m, dict) else None
                        for m in self.meta["members"]
                    ]
                }
                if self.kind == "stack" and isinstance(self.meta.get("members"), list)
                else {}
            ),
        }


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a steer vector file; never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VectorFileError(
            f"vector file not found: {path}",
            expected="an existing .safetensors file",
            found="no such file",
            fix="check the path",
        )
    with open(path, "rb") as fh:
        head = fh.read(9)
    # a safetensors file: an 8-byte little-endian header length N, then N bytes of JSON ("{...}"); checked first,
    # because N's first byte can be anything (0x80 = a pickle's first byte, for 1 header length in 256)
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    if n is None or n > 100_000_000 or 8 + n > path.stat().st_size or head[8:9] != b"{":
        if any(head.startswith(m) for m in _PICKLE_MAGIC):
            raise VectorFileError(
                f"{path} is a pickle / torch.save file, not safetensors",
                expected="a safetensors file written by steer",
                found="pickle data (refused: loading pickle can execute code)",
                fix="recompute the vector with steer, or convert trusted tensors with safetensors.torch.save_file",
            )
        raise VectorFileError(
            f"{path} is not a safetensors file",
            expected="a safetensors file written by steer",
            found=f"{len(head)} leading bytes that are no safetensors header",
            fix="pass a vector file made by steer (steer vectors ...)",
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VectorFileError(
            f"{path} is not a readable safetensors file",
            expected="a safetensors file",
            found=str(exc).splitlines()[0][:200],
            fix="pass a vector file made by steer",
        ) from None
    if "steer" not in raw_meta:
        raise VectorFileError(
            f"{path} has no steer metadata",
            expected="safetensors metadata key 'steer' (JSON)",
            found=f"metadata keys {sorted(raw_meta)}",
            fix="wrap raw tensors with steer.SteeringVector({layer: tensor}, meta).save(path)",
        )
    try:
        meta = json.loads(raw_meta["steer"])
    except json.JSONDecodeError as exc:
        raise VectorFileError(
            f"{path}: steer metadata is not JSON",
            expected="a JSON object",
            found=str(exc),
            fix="re-save the vector with steer",
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VectorFileError(
            f"{path}: foreign metadata",
            expected=f"format {FORMAT!r}",
            found=repr(meta.get("format") if isinstance(meta, dict) else meta),
            fix="pass a vector file made by steer",
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise VectorFileError(
            f"{path}: unsupported format version",
            expected=f"<= {FORMAT_VERSION}",
            found=repr(version),
            fix="upgrade steer",
        )
    return meta, tensors
