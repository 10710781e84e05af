"""What a client may send to ``steer serve``, checked before anything runs: OpenAI's request shapes plus a
top-level ``steer`` field, the server's policy (loaded vectors, α range, enforced vectors, limits), and errors in
OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).

The ``steer`` field: ``{"vector": NAME, "alpha": 1.5 | "auto", "layers": [..], "mode": .., "scope": ..}`` or a
list of such objects (several vectors composed). ``"auto"`` (or no ``alpha``) is the file's recommended α;
no ``steer`` field means the server's default (the enforced vectors only). A request can name a loaded vector,
never a path or numbers; it cannot name an enforced vector (the server applies those to every request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from steer.config import SCOPES, per_request_modes


class APIError(Exception):
    """An error returned to the client as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            self.type = "authentication_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Policy:
    """The server's rules: ``alpha_range`` bounds every client α; ``enforce`` maps a vector name to the α applied
    to every request; the limits bound what one request may ask for."""

    vectors: dict  # name -> SteeringVector
    alpha_range: tuple[float, float] = (-1e9, 1e9)
    enforce: dict = field(default_factory=dict)  # name -> alpha
    max_tokens_limit: int = 512
    max_n: int = 8
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class SteerSpec:
    """One vector applied to one request."""

    vector: str
    alpha: float
    layers: tuple[int, ...] | None = None
    mode: str | None = None
    scope: str | None = None
    enforced: bool = False

    def config_key(self) -> tuple:
        return (self.vector, self.layers, self.mode, self.scope)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    ignore_eos: bool = False  # vLLM's extra parameter: generate exactly max_tokens (benchmarks)


@dataclass(frozen=True)
class Request:
    kind: str  # "chat" | "completion"
    model: str
    prompt: str  # the exact text fed to the model (chat template applied for chat)
    sampling: Sampling
    steer: tuple[SteerSpec, ...]
    stream: bool


STEER_FIELDS = {"vector", "alpha", "layers", "mode", "scope"}


def _number(value, param: str, *, lo=None, hi=None, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"{param} must be {'an integer' if integer else 'a number'}, got {value!r}", param, "invalid_type")
    if not math.isfinite(value):
        raise bad(f"{param} must be finite, got {value!r}", param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"{param} must be in [{lo}, {hi}], got {value!r}", param)
    return value


def parse_steer(raw, policy: Policy) -> tuple[SteerSpec, ...]:
    """The client's ``steer`` field (None: none) checked against the policy, plus the enforced vectors."""
    items = [] if raw is None else (raw if isinstance(raw, list) else [raw])
    specs, seen = [], set()
    for i, item in enumerate(items):
        where = "steer" if not isinstance(raw, list) else f"steer[{i}]"
        if not isinstance(item, dict):
            raise bad(f'{where} must be an object such as {{"vector": "safety", "alpha": 1.0}}', where, "invalid_type")
        unknown = sorted(set(item) - STEER_FIELDS)
        if unknown:
            raise bad(
                f"unknown field {unknown[0]!r} in {where}; allowed: {sorted(STEER_FIELDS)}", f"{where}.{unknown[0]}"
            )
        name = item.get("vector")
        if not isinstance(name, str):
            raise bad(f"{where}.vector must name a loaded vector", f"{where}.vector", "invalid_type")
        if name not in policy.vectors:
            raise bad(f"unknown vector {name!r}; loaded: {sorted(policy.vectors)}", f"{where}.vector", "unknown_vector")
        if name in policy.enforce:
            raise bad(
                f"vector {name!r} is enforced by the server and cannot be set by a request",
                f"{where}.vector",
                "enforced_vector",
            )
        if name in seen:
            raise bad(f"vector {name!r} appears twice in steer", f"{where}.vector")
        seen.add(name)
        vec = policy.vectors[name]
        alpha = item.get("alpha", "auto")
        if alpha == "auto":
            alpha = float(vec.recommended.get("alpha", 1.0))
        else:
            lo, hi = policy.alpha_range
            alpha = float(_number(alpha, f"{where}.alpha", lo=lo, hi=hi))
        layers = item.get("layers")
        if layers is not None:
            if (
                not isinstance(layers, list)
                or not layers
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            ):
                raise bad(
                    f"{where}.layers must be a non-empty list of layer indices", f"{where}.layers", "invalid_type"
                )
            allowed = set(vec.layers)
            if vec.directions and len(vec.directions) > 1 and not set(layers) <= allowed:
                raise bad(
                    f"{where}.layers {layers} are not in the vector's layers {sorted(allowed)}", f"{where}.layers"
                )
            layers = tuple(layers)
        mode = item.get("mode")
        if mode is not None and mode not in per_request_modes():
            raise bad(f"{where}.mode {mode!r} is not a per-request mode", f"{where}.mode")
        scope = item.get("scope")
        if scope is not None and scope not in SCOPES:
            raise bad(f"{where}.scope must be one of {list(SCOPES)}, got {scope!r}", f"{where}.scope")
        specs.append(SteerSpec(name, alpha, layers, mode, scope))
    specs += [SteerSpec(name, float(a), enforced=True) for name, a in policy.enforce.items()]
    return tuple(specs)


def parse_sampling(body: dict, policy: Policy) -> Sampling:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    max_tokens = _number(max_tokens, "max_tokens", lo=1, hi=policy.max_tokens_limit, integer=True)
    temperature = float(
        _number(
            body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0, "temperature", lo=0.0, hi=2.0
        )
    )
    top_p = float(_number(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0, "top_p", lo=0.0, hi=1.0))
    if top_p == 0.0:
        raise bad("top_p must be above 0", "top_p")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(seed, "seed", lo=0, hi=2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise bad("stop must be a string or a list of at most 4 non-empty strings", "stop", "invalid_type")
    n = _number(body.get("n", 1) if body.get("n") is not None else 1, "n", lo=1, hi=policy.max_n, integer=True)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos", "invalid_type")
    return Sampling(int(max_tokens), temperature, top_p, seed, stop, int(n), ignore_eos)
