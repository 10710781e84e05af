"""``steer serve``: an OpenAI-compatible server in which every request carries its own steering.

* :mod:`.protocol` — request parsing and the server's policy (what a client may ask for), OpenAI-shaped errors;
* :mod:`.engine`   — continuous batching (a step-level scheduler): per-row vectors, α, gates, sampling, stops;
* :mod:`.kv`       — the running rows and their KV cache, which rows join and leave between decode steps;
* :mod:`.app`      — the HTTP app (FastAPI): endpoints, API key, streaming, metrics.

Needs the ``serve`` extra (``pip install "steer-runtime[serve]"``: fastapi, uvicorn, prometheus-client).
"""

from __future__ import annotations

import math

from steer.errors import ConfigError

from .protocol import Policy


def load_named_vectors(
    specs: list[str], *, source: str = "--vector", example: str = "--vector safety=refusal.safetensors"
) -> dict:
    """``NAME=FILE`` entries -> {name: SteeringVector}, in their order; errors name ``source`` (the option or
    environment variable the entries came from)."""
    from steer.vector import SteeringVector

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"bad {source} entry", expected="NAME=FILE", found=repr(spec), fix=f"pass {example}")
        if name in out:
            raise ConfigError(f"{source} names {name!r} twice", expected="distinct names", found=name, fix="rename one")
        out[name] = SteeringVector.load(path)
    return out


def load_policy(
    sm,
    vectors: list[str],
    *,
    enforce: list[str] = (),
    alpha_range: str | None = None,
    max_tokens_limit: int = 512,
) -> Policy:
    """Load ``NAME=FILE`` vectors and check each against ``sm`` now (a mismatch fails start-up, not a request);
    ``enforce``: ``NAME[:ALPHA]``; ``alpha_range``: ``LO,HI``."""
    from steer.config import SteeringConfig
    from steer.kinds import KINDS
    from steer.resolve import resolve

    loaded = load_named_vectors(vectors)
    for name, vec in loaded.items():
        res = resolve(SteeringConfig(), vec, sm.model, layers_path=sm.layers_path)  # validates, attaches nothing
        if not KINDS[res.kind].per_row:
            raise ConfigError(
                f"vector {name!r} applies as {res.kind!r}, which cannot differ per request",
                expected="a vector whose default mode is per-request (directions, or a task vector in per_request)",
                found=f"recommended mode {res.mode!r}",
                fix="re-save it with recommended mode 'per_request', or bake it into the model with `steer bake`",
            )
        loaded[name] = vec
    lo, hi = -1e9, 1e9
    if alpha_range is not None:
        try:
            lo, hi = (float(x) for x in alpha_range.split(","))
        except ValueError:
            raise ConfigError(
                "bad --alpha-range",
                expected="LO,HI such as -2,4",
                found=repr(alpha_range),
                fix="pass two numbers separated by a comma",
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ConfigError(
                "bad --alpha-range", expected="finite LO <= HI", found=repr(alpha_range), fix="swap or fix the numbers"
            )
    enforced = {}
    for spec in enforce:
        name, sep, a = spec.partition(":")
        if name not in loaded:
            raise ConfigError(
                "--enforce names a vector that is not loaded",
                expected=" | ".join(loaded) or "a --vector NAME",
                found=repr(name),
                fix="load it with --vector NAME=FILE",
            )
        try:
            alpha = float(a) if sep else float(loaded[name].recommended.get("alpha", 1.0))
        except ValueError:
            raise ConfigError(
                "bad --enforce", expected="NAME or NAME:ALPHA", found=repr(spec), fix="pass e.g. safety:1.5"
            ) from None
        if not math.isfinite(alpha):
            raise ConfigError(
                "bad --enforce alpha", expected="a finite number", found=repr(spec), fix="pass e.g. safety:1.5"
            )
        enforced[name] = alpha
    return Policy(vectors=loaded, alpha_range=(lo, hi), enforce=enforced, max_tokens_limit=max_tokens_limit)
