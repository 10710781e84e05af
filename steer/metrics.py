"""Rates with counts and 95% intervals, and the KL divergence used as a capability proxy.

Intervals: Wilson score interval for proportions (Wilson 1927; well behaved at 0% and 100%, unlike the
normal approximation) and a normal-approximation interval for means (KL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"rate": self.rate, "k": self.k, "n": self.n, "ci95": [lo, hi]}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.rate:5.1f}% ({self.k}/{self.n}, {100 * lo:.0f}–{100 * hi:.0f})"

    @classmethod
    def of(cls, flags) -> "Rate":
        flags = [bool(f) for f in flags]
        return cls(sum(flags), len(flags))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Mean:
    """A mean with its count and normal-approximation 95% interval."""

    mean: float
    n: int
    half_width: float

    @classmethod
    def of(cls, values) -> "Mean":
        xs = [float(v) for v in values]
        n = len(xs)
        if n == 0:
            return cls(float("nan"), 0, float("nan"))
        m = sum(xs) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
        return cls(m, n, Z95 * sd / math.sqrt(n))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": self.n, "ci95": [self.mean - self.half_width, self.mean + self.half_width]}

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.half_width:.4f} (n={self.n})"

    asdict = asdict


def kl_divergence(base_logits: torch.Tensor, steered_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(base ‖ steered) of next-token distributions; logits ``[N, V]`` → ``[N]`` (nats)."""
    p = torch.log_softmax(base_logits.float(), dim=-1)
    q = torch.log_softmax(steered_logits.float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)
