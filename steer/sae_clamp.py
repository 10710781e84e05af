"""Clamping sparse-autoencoder features during generation (no sae-lens needed at run time).

An SAE vector file (``steer vectors sae``) carries the SAE's weights as extra tensors::

    extra.sae.W_enc [d, m]   extra.sae.b_enc [m]   extra.sae.W_dec [m, d]   extra.sae.b_dec [d]
    extra.sae.threshold [m]  (JumpReLU SAEs only)
    meta["sae"] = {"layer", "site", "activation": "relu"|"topk"|"jumprelu", "k", "apply_b_dec_to_input", ...}

with encode(x) = act((x − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc) and decode(a) = a @ W_dec + b_dec
(TopK: keep the k largest pre-activations, then ReLU — Gao et al. 2024; JumpReLU: x·[x > θ] — Rajamanoharan
et al. 2024). Decoder-norm rescaling of TopK SAEs is folded into the weights when the file is written.

Clamping feature f to value c keeps the SAE's reconstruction error, so whatever the SAE does not explain is
untouched (Templeton et al. 2024, "Scaling Monosemanticity")::

    h' = decode(a') + (h − decode(a)) = h + (c − a_f(h)) · W_dec[f]

for every clamped feature, at every position, on the rows whose clamp value is not ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import spread_rows
from .errors import AlphaError, ConfigError, VectorFileError
from .handle import ForwardWrap, HookSet
from .layers import check_layers, fingerprint, get_layers
from .vector import SteeringVector

ACTIVATIONS = ("relu", "topk", "jumprelu")


@dataclass
class SAEWeights:
    """A plain-PyTorch SAE (float32): encode / decode exactly as described in the module docstring."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "relu"
    k: int | None = None
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True

    def __post_init__(self):
        d, m = self.W_enc.shape
        shapes = {
            "W_enc": (self.W_enc, (d, m)),
            "b_enc": (self.b_enc, (m,)),
            "W_dec": (self.W_dec, (m, d)),
            "b_dec": (self.b_dec, (d,)),
        }
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold, (m,))
        for name, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise VectorFileError(
                    f"SAE tensor {name} has the wrong shape",
                    expected=str(want),
                    found=str(tuple(t.shape)),
                    fix="recompute the SAE vector",
                )
        if self.activation not in ACTIVATIONS:
            raise VectorFileError(
                "unknown SAE activation",
                expected=" | ".join(ACTIVATIONS),
                found=repr(self.activation),
                fix="recompute the SAE vector",
            )
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= m):
            raise VectorFileError(
                "TopK SAE without a valid k",
                expected=f"1 <= k <= {m}",
                found=repr(self.k),
                fix="recompute the SAE vector",
            )
        if self.activation == "jumprelu" and self.threshold is None:
            raise VectorFileError(
                "JumpReLU SAE without thresholds",
                expected="extra.sae.threshold [m]",
                found="none",
                fix="recompute the SAE vector",
            )

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device) -> "SAEWeights":
        mv = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
        return SAEWeights(
            mv(self.W_enc),
            mv(self.b_enc),
            mv(self.W_dec),
            mv(self.b_dec),
            self.activation,
            self.k,
            mv(self.threshold),
            self.apply_b_dec_to_input,
        )

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., m]`` of activations ``[..., d]``."""
        pre = self._sae_in(x) @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        values, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activations of only ``features`` (``[..., F]``); cheap for ReLU / JumpReLU SAEs."""
        if self.activation == "topk":
            return self.encode(x).index_select(-1, features)
        pre = self._sae_in(x) @ self.W_enc.index_select(1, features) + self.b_enc.index_select(0, features)
        if self.activation == "relu":
            return pre.relu()
        return pre * (pre > self.threshold.index_select(0, features))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.float() @ self.W_dec + self.b_dec

    # ------------------------------------------------------------------ file form
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"sae.W_enc": self.W_enc, "sae.b_enc": self.b_enc, "sae.W_dec": self.W_dec, "sae.b_dec": self.b_dec}
        if self.threshold is not None:
            out["sae.threshold"] = self.threshold
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def info(self) -> dict:
        return {
            "activation": self.activation,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
        }

    @classmethod
    def from_vector(cls, vector: SteeringVector) -> "SAEWeights":
        info = vector.meta.get("sae") or {}
        missing = [n for n in ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec") if n not in vector.extra]
        if vector.kind != "sae" or missing:
            raise VectorFileError(
                "not an SAE vector",
                expected="a file from `steer vectors sae` (kind 'sae' with extra.sae.W_enc/b_enc/W_dec/b_dec)",
                found=f"kind {vector.kind!r}" + (f", missing {missing}" if missing else ""),
                fix="compute one with `steer vectors sae`",
            )
        e = vector.extra
        return cls(
            e["sae.W_enc"].float(),
            e["sae.b_enc"].float(),
            e["sae.W_dec"].float(),
            e["sae.b_dec"].float(),
            info.get("activation", "relu"),
            info.get("k"),
            e.get("sae.threshold"),
            bool(info.get("apply_b_dec_to_input", True)),
        )


def _hidden(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def clamp_values(value) -> tuple[list[float], list[bool]]:
    """``(values, on)`` per row from a float or a list (``None`` = row not clamped); AlphaError if not finite."""
    values = value.detach().reshape(-1).tolist() if isinstance(value, torch.Tensor) else value
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values:
        raise AlphaError(
            "no clamp values given",
            expected="a float or one value per row",
            found="[]",
            fix="pass value=5.0 or value=[5.0, None, ...]",
        )
    out, on = [], []
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise AlphaError(
                f"clamp value [{i}] is not a finite number",
                expected="a finite float or None",
                found=repr(v),
                fix="pass finite clamp values",
            )
        out.append(0.0 if v is None else float(v))
        on.append(v is not None)
    return out, on


def check_features(features, sae: SAEWeights, hidden_size: int) -> list[int]:
    """The feature ids as a list, checked against the SAE (and the SAE against the model's width)."""
    if sae.d_in != hidden_size:
        raise ConfigError(
            "the SAE was trained on another width",
            expected=f"d_in {hidden_size}",
            found=f"d_in {sae.d_in}",
            fix="use an SAE of this model",
        )
    feats = [features] if isinstance(features, int) else list(features)
    bad = [f for f in feats if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < sae.d_sae]
    if not feats or bad:
        raise ConfigError(
            "bad SAE feature ids",
            expected=f"integers in [0, {sae.d_sae - 1}]",
            found=repr(bad or feats),
            fix="pass feature ids from the vector's meta['sae']",
        )
    return feats


class FeatureClamp(HookSet):
    """Live clamp hooks; a context manager. Hooks are removed on exit, also on errors.

    Per-row values through :meth:`set_alphas` (the handle protocol's name; :meth:`set_values` is the same):
    one clamp value per row, ``None`` = that row not clamped."""

    def __init__(
        self,
        model: nn.Module,
        sae: SAEWeights,
        features,
        value,
        *,
        layers,
        site: str = "output",
        layers_path: str | None = None,
    ):
        blocks = get_layers(model, layers_path)
        fp = fingerprint(model, layers_path)
        if site not in ("output", "input"):
            raise ConfigError("unknown site", expected="'output' or 'input'", found=repr(site), fix="use 'output'")
        feats = check_features(features, sae, fp["hidden_size"])
        self.layers = check_layers(list(layers), len(blocks))
        self.site = site
        self.features = feats
        self.model = model
        self.blocks = blocks
        self._sae: dict[torch.device, SAEWeights] = {}
        self._feat: dict[torch.device, torch.Tensor] = {}
        self._dec: dict[torch.device, torch.Tensor] = {}
        for i in self.layers:
            dev = next((p.device for p in blocks[i].parameters()), torch.device("cpu"))
            if dev not in self._sae:
                self._sae[dev] = sae.to(dev)
                self._feat[dev] = torch.tensor(feats, dtype=torch.long, device=dev)
                self._dec[dev] = self._sae[dev].W_dec.index_select(0, self._feat[dev])  # [F, d]
        self.set_alphas(value)
        self._handles: list = []
        try:
            self._handles.append(model.register_forward_pre_hook(self._begin_forward))
            for i in self.layers:
                if site == "output":
                    self._handles.append(ForwardWrap(blocks[i], post=self._output_hook))
                else:
                    self._handles.append(ForwardWrap(blocks[i], pre=self._input_hook))
            self._watch_wraps()
        except BaseException:
            self.remove()
            raise

    def _begin_forward(self, module, args):
        if not torch.compiler.is_compiling():
            self._check_wraps()  # still ours on every clamped block? (warns once if replaced)

    # ------------------------------------------------------------------ per-row values
    def begin(self, prompt_length: int | None = None) -> None:
        """A new batch of requests (the clamp applies to every token; nothing to do)."""

    def set_alphas(self, value) -> None:
        """One clamp value for all rows, or a list with one per batch row (``None`` = row not clamped)."""
        out, on = clamp_values(value)
        self._values = torch.tensor(out, dtype=torch.float32)
        self._on = torch.tensor(on, dtype=torch.float32)
        self.alpha = out[0]
        self._cache: dict = {}

    set_values = set_alphas

    def _row_tensors(self, batch: int, device: torch.device):
        key = (batch, device)
        if key not in self._cache:
            vals = spread_rows(self._values, batch, "clamp values") if self._values.numel() != 1 else self._values
            on = spread_rows(self._on, batch, "clamp values") if self._on.numel() != 1 else self._on
            self._cache[key] = (vals.to(device)[:, None, None], on.to(device)[:, None, None])
        return self._cache[key]

    def _clamp(self, h: torch.Tensor) -> torch.Tensor:
        dev = h.device
        vals, on = self._row_tensors(h.shape[0], dev)
        acts = self._sae[dev].encode_features(h, self._feat[dev])  # [B, T, F]
        delta = ((vals - acts) * on) @ self._dec[dev]  # [B, T, d]
        return (h.float() + delta).to(h.dtype)

    def _output_hook(self, module, args, output):
        h = _hidden(output)
        new = self._clamp(h)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    def _input_hook(self, module, args, kwargs):
        if args:
            return (self._clamp(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._clamp(kwargs["hidden_states"])
        return args, kwargs

    # ------------------------------------------------------------------ lifetime
    def __repr__(self) -> str:
        return f"FeatureClamp(features={self.features}, layers={self.layers}, site={self.site!r}, active={self.active})"


def clamp_features(
    sm, vector: SteeringVector, features=None, value: float | list = 0.0, *, layers=None, site: str | None = None
) -> FeatureClamp:
    """Clamp SAE ``features`` of ``vector`` to ``value`` (per row: a list, ``None`` = unclamped) while active.

    ``sm`` is a :class:`steer.SteeredModel` or a bare HF model; ``features`` default to the vector's top
    feature; ``layers`` / ``site`` default to where the SAE was trained. Everything is validated before any
    hook is attached::

        with clamp_features(sm, vec, features=[vec.meta["sae"]["features"][0]["id"]], value=8.0):
            sm.generate(prompts)
    """
    from .config import SteeringConfig
    from .kinds import attach
    from .resolve import resolve

    if not isinstance(vector, SteeringVector):
        vector = SteeringVector.load(vector)
    model = sm.model if hasattr(sm, "model") and isinstance(getattr(sm, "model"), nn.Module) else sm
    layers = [layers] if isinstance(layers, int) else layers
    SAEWeights.from_vector(vector)  # not an SAE file: say so (VectorFileError), before the mode lookup
    clamp_values(value)  # bad values fail here, before anything is attached
    first = value[0] if isinstance(value, (list, tuple)) and value else value
    config = SteeringConfig(
        mode="clamp",
        layers=layers,
        site=site,
        extra={} if features is None else {"features": features},
        alpha=first if isinstance(first, (int, float)) and not isinstance(first, bool) else 0.0,
    )
    handle = attach(model, resolve(config, vector, model, layers_path=getattr(sm, "layers_path", None)))
    try:
        handle.set_alphas(value)
    except BaseException:
        handle.remove()
        raise
    return handle
