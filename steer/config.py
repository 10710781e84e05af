"""Steering configuration: which layers, which op, how strong, where, on which tokens, under what condition.

Modes: an op on the residual stream ``h`` of a decoder block (:mod:`steer.ops`, the registry: ``add``,
``ablate``, ``ablate_add``, ``ace``, ``angular`` and any registered later; see :mod:`steer.layers` for the layer
convention), the modes of the other vector kinds (``merged`` / ``per_request`` for task vectors, ``clamp`` for
SAE features; :mod:`steer.kinds`), or

* ``conditional``— a shorthand for the vector's op (default ``add``) gated per request by the condition
                   stored in the vector file (CAST, Lee et al. 2024): at prefill, the prompt's activation
                   at the condition layer is projected on the condition direction and compared with the
                   threshold; the decision is held for every generated token of that request.

Token scope, under the KV cache and left padding alike: ``all`` (default), ``prompt`` (positions of the
prompt, padding and any assistant prefill included), ``generated`` (positions of generated tokens only —
note the first new token is predicted from the last *prompt* position, so ``generated`` cannot change it).

Site: ``output`` (block output, default) or ``input`` (block input, i.e. the previous block's output).
α is per request: ``alpha`` here is the default for every row; a handle's ``set_alphas`` gives each row
its own (0 leaves a row bit-exactly unsteered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import ops
from .errors import AlphaError, ConfigError

TASK_MODES = ("merged", "merge", "per_request")
SCOPES = ("all", "prompt", "generated")
SITES = ("output", "input")
REDUCES = ("last", "mean")
COMPARATORS = (">", "<")


def known_modes() -> tuple[str, ...]:
    """Every mode a config may name: the registered ops, ``conditional``, and the task / clamp modes."""
    return (*ops.OPS, "conditional", *TASK_MODES, "clamp")


def per_request_modes() -> tuple[str, ...]:
    """The modes whose strength can differ per batch row: every op, ``conditional`` and per-request task vectors
    (not a merged task vector, which has one α, nor a clamp, whose value is not an α)."""
    return (*ops.OPS, "conditional", "per_request")


def check_alpha(value, what: str = "alpha") -> float:
    """A finite float, or an AlphaError that says so."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise AlphaError(
            f"{what} is not a number",
            expected="a finite float such as 1.0",
            found=repr(value),
            fix=f"pass a number for {what}",
        ) from None
    if not math.isfinite(out):
        raise AlphaError(
            f"{what} must be finite", expected="a finite float such as 1.0", found=str(out), fix=f"pass a finite {what}"
        )
    return out


def row_alphas(alphas) -> torch.Tensor:
    """One finite α per batch row as a float32 CPU tensor (a single float gives one row, broadcast later)."""
    if isinstance(alphas, (int, float)):
        values = [alphas]
    elif isinstance(alphas, torch.Tensor):
        values = alphas.detach().reshape(-1).tolist()
    else:
        values = list(alphas)
    if not values:
        raise AlphaError(
            "no alphas given",
            expected="one alpha per batch row",
            found="[]",
            fix="pass a float or a list with one float per row",
        )
    return torch.tensor([check_alpha(v, f"alpha[{i}]") for i, v in enumerate(values)], dtype=torch.float32)


def spread_rows(values: torch.Tensor, batch: int, what: str = "alphas") -> torch.Tensor:
    """Per-row values for a batch of ``batch`` rows: ``values`` as they are when they have one per row, a single
    value for every row, or each value repeated over consecutive rows when their count divides the batch
    (``generate(num_return_sequences=k)`` expands each prompt into k rows); AlphaError otherwise."""
    n = values.shape[0]
    if n == batch:
        return values
    if n == 0 or batch % n:
        raise AlphaError(
            f"the number of per-row {what} does not fit the batch",
            expected=f"{batch} {what} (or a divisor of it, repeated per row)",
            found=f"{n} {what}",
            fix=f"pass one value per batch row (set_alphas with {batch} values)",
        )
    return values.repeat_interleave(batch // n, dim=0)


@dataclass
class Condition:
    """CAST-style gate: steer a request iff ``score(h_C) <comparator> threshold``.

    ``score`` is the projection of the prompt's block-``layer`` output on the unit ``direction``, taken at the
    last prompt token (``reduce="last"``) or averaged over the prompt's non-padding tokens (``"mean"``).
    """

    layer: int
    direction: torch.Tensor
    threshold: float
    reduce: str = "last"
    comparator: str = ">"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(
                "condition layer must be an int", expected="an int", found=repr(self.layer), fix="set condition.layer"
            )
        if not isinstance(self.direction, torch.Tensor) or self.direction.dim() != 1:
            raise ConfigError(
                "condition direction must be a 1-D tensor",
                expected="tensor [d]",
                found=repr(getattr(self.direction, "shape", self.direction)),
                fix="store condition.direction as a [d] tensor",
            )
        norm = float(self.direction.float().norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise ConfigError(
                "condition direction must be finite and non-zero",
                expected="a non-zero vector",
                found=f"norm {norm}",
                fix="recompute the condition direction",
            )
        self.threshold = check_alpha(self.threshold, "condition threshold")
        if self.reduce not in REDUCES:
            raise ConfigError(
                "unknown condition reduce",
                expected=" | ".join(REDUCES),
                found=repr(self.reduce),
                fix="use 'last' or 'mean'",
            )
        if self.comparator not in COMPARATORS:
            raise ConfigError(
                "unknown condition comparator",
                expected="'>' or '<'",
                found=repr(self.comparator),
                fix="use '>' (steer when the score is above the threshold) or '<'",
            )

    def decide(self, h: torch.Tensor, unit: torch.Tensor, attn: torch.Tensor | None = None):
        """The gate of every row of the block output ``h`` ``[B, T, d]``: ``(scores [B], open [B] bool)``.
        ``unit``: the direction made unit, on ``h``'s device; ``attn``: the prompt's 2-D attention mask (the
        mean skips padding; without it every token counts)."""
        hf = h.detach().float()
        if self.reduce == "last":
            x = hf[:, -1, :]
        elif attn is None:
            x = hf.mean(1)
        else:
            m = attn[:, -hf.shape[1] :].to(hf.device, hf.dtype)[..., None]
            x = (hf * m).sum(1) / m.sum(1).clamp_min(1.0)
        score = x @ unit
        return score, (score > self.threshold if self.comparator == ">" else score < self.threshold)


def check_gates(condition: Condition | None, gates, rows: int) -> torch.Tensor:
    """``gates`` as one bool per row for ``set_gates`` of a handle with ``condition`` and ``rows`` rows (the rows
    of its last ``set_alphas``); ConfigError before anything changes otherwise."""
    if condition is None:
        raise ConfigError(
            "set_gates needs a conditional steering",
            expected="a handle attached in mode 'conditional' (a condition)",
            found="no condition",
            fix="only call set_gates on conditional handles",
        )
    g = torch.as_tensor(gates, dtype=torch.bool).reshape(-1)
    if g.numel() != rows:
        raise ConfigError(
            "one gate per row is needed",
            expected=f"{rows} gates (the rows of set_alphas)",
            found=str(g.numel()),
            fix="call set_alphas with the same rows first",
        )
    return g


@dataclass
class SteeringConfig:
    """How to apply a :class:`~steer.vector.SteeringVector`. Unset fields fall back to the vector file's
    recommended values, then to the defaults documented in the module docstring."""

    layers: list[int] | None = None
    alpha: float | None = None
    mode: str | None = None
    scope: str | None = None
    site: str | None = None
    source_layer: int | None = None
    condition: Condition | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.alpha is not None:
            self.alpha = check_alpha(self.alpha)
        if self.mode is not None and self.mode not in known_modes():
            raise ConfigError(
                "unknown mode",
                expected=" | ".join(known_modes()),
                found=repr(self.mode),
                fix="choose one of " + ", ".join(known_modes()),
            )
        if self.scope is not None and self.scope not in SCOPES:
            raise ConfigError(
                "unknown token scope",
                expected=" | ".join(SCOPES),
                found=repr(self.scope),
                fix="choose one of " + ", ".join(SCOPES),
            )
        if self.site is not None and self.site not in SITES:
            raise ConfigError(
                "unknown site",
                expected=" | ".join(SITES),
                found=repr(self.site),
                fix="choose 'output' (block output) or 'input' (block input)",
            )
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = list(self.layers)
            if not self.layers:
                raise ConfigError(
                    "layers is empty", expected="at least one layer index", found="[]", fix="pass e.g. layers=[3]"
                )


def parse_layers(text: str, num_layers: int | None = None) -> list[int]:
    """Parse '3', '3,5', '2-6' or 'all' (needs num_layers) into a list of ints."""
    text = text.strip()
    if text == "all":
        if num_layers is None:
            raise ConfigError(
                "'all' needs the model's layer count",
                expected="a list such as 3,5",
                found="all",
                fix="pass explicit layers",
            )
        return list(range(num_layers))
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                "cannot parse layers",
                expected="e.g. 3 or 3,5 or 2-6 or all",
                found=repr(text),
                fix="pass integers separated by commas",
            ) from None
    if not out:
        raise ConfigError("no layers given", expected="e.g. 3 or 3,5", found=repr(text), fix="pass layer indices")
    return out


def parse_alphas(text: str) -> list[float]:
    """Parse '0,0.5,1' into finite floats (AlphaError on any non-number)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise AlphaError(
            "no alphas given", expected="numbers such as 0,0.5,1", found=repr(text), fix="pass comma-separated numbers"
        )
    return [check_alpha(p, f"alpha {p!r}") for p in parts]
