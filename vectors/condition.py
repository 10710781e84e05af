"""The condition of conditional steering (CAST, Lee et al. 2024, "Programming Refusal with Conditional
Activation Steering"): harmful and harmless prompts cluster apart in activation space, so a projection of
the prompt's activation on one direction, compared with a threshold, decides per request whether to steer.

Here the condition reads block ``c``'s output at the last prompt token (``reduce="last"``), projects it on the
unit difference in means (harmful − harmless) at ``c`` and steers when the score is above the threshold
(``comparator=">"``). The layer ``c`` is chosen among layers ≤ the steering layer (the gate must be decided
before the first steered activation of the prompt: see :mod:`steer.hooks`) by separation accuracy, then
AUC, then d′ (mean gap over pooled standard deviation); the threshold is the best-accuracy midpoint
(:func:`steer.vectors.stats.best_threshold`).
"""

from __future__ import annotations

import torch

from .stats import auc, best_threshold


def unit_diff(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Unit difference in means of two ``[N, d]`` activation sets."""
    d = harmful.double().mean(0) - harmless.double().mean(0)
    n = d.norm()
    return (d / n if n > 0 else d).float()


def score_layer(harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor, comparator: str = ">") -> dict:
    """Separation of ``[N, d]`` harmful vs harmless activations along ``direction`` (made unit).

    ``comparator``: ``">"`` (harmful scores above the threshold), ``"<"``, or ``"auto"`` (the side the harmful
    mean lies on: recalibrating a fixed direction on another model). AUC and d′ are read in that sense.
    """
    u = direction.double() / direction.double().norm().clamp_min(1e-12)
    sp, sn = harmful.double() @ u, harmless.double() @ u
    if comparator == "auto":
        comparator = ">" if sp.mean() >= sn.mean() else "<"
    sign = 1.0 if comparator == ">" else -1.0
    threshold, acc = best_threshold(sp, sn, comparator)
    pooled = ((sp.var(unbiased=False) + sn.var(unbiased=False)) / 2).sqrt().clamp_min(1e-12)
    dprime = float(sign * (sp.mean() - sn.mean()) / pooled)
    return {
        "threshold": threshold,
        "comparator": comparator,
        "accuracy": round(acc, 6),
        "auc": round(auc(sign * sp, sign * sn), 6),
        "dprime": round(dprime, 6),
    }


def fit_condition(
    last_harmful: torch.Tensor,
    last_harmless: torch.Tensor,
    layers: list[int],
    *,
    max_layer: int,
    directions: dict[int, torch.Tensor] | None = None,
) -> tuple[dict, torch.Tensor, list[dict]]:
    """Pick the condition layer ``<= max_layer``, its unit direction and threshold.

    ``last_*``: ``[N, len(layers), d]`` last-prompt-token activations (block outputs of ``layers``).
    ``directions``: fixed directions per layer (recalibration on another model); default: the unit
    difference in means of these activations. Returns ``(meta, unit direction, per-layer table)``.
    """
    table, dirs = [], {}
    for i, layer in enumerate(layers):
        if layer > max_layer:
            continue
        h, s = last_harmful[:, i], last_harmless[:, i]
        d = directions[layer] if directions is not None else unit_diff(h, s)
        dirs[layer] = (d.double() / d.double().norm().clamp_min(1e-12)).float()
        table.append({"layer": layer, **score_layer(h, s, dirs[layer])})
    if not table:
        raise ValueError(
            f"expected a layer <= {max_layer} to read the condition at, found none in {layers}; "
            "fix: compute directions for earlier layers"
        )
    best = max(table, key=lambda r: (r["accuracy"], r["auc"], r["dprime"]))
    meta = {
        "layer": best["layer"],
        "threshold": best["threshold"],
        "reduce": "last",
        "comparator": ">",
        "accuracy": best["accuracy"],
        "auc": best["auc"],
        "dprime": best["dprime"],
        "n_harmful": int(last_harmful.shape[0]),
        "n_harmless": int(last_harmless.shape[0]),
    }
    return meta, dirs[best["layer"]], table
