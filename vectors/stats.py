"""Small statistics for separating two score populations (no scikit-learn).

* :func:`auc` — area under the ROC curve, the Mann–Whitney U statistic divided by ``n_pos·n_neg``:
  the probability that a random positive scores above a random negative (ties count one half).
* :func:`best_threshold` — the threshold with the best accuracy for the rule ``score > t`` (positive),
  placed at the midpoint between adjacent distinct scores; used for CAST conditions (Lee et al. 2024).
"""

from __future__ import annotations

import torch


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("expected at least one score, found none; fix: pass non-empty score lists")
    if not torch.isfinite(t).all():
        raise ValueError("expected finite scores, found NaN or inf; fix: drop non-finite scores")
    return t


def auc(scores_pos, scores_neg) -> float:
    """ROC AUC of ``scores_pos`` (label 1) against ``scores_neg`` (label 0); 1.0 = perfectly above.

    Computed with mid-ranks, so tied scores count one half (the Mann–Whitney convention).
    """
    pos, neg = _as_tensor(scores_pos), _as_tensor(scores_neg)
    allv = torch.cat([pos, neg])
    order = torch.argsort(allv, stable=True)
    sorted_v = allv[order]
    ranks = torch.empty_like(allv)
    # mid-ranks for ties: rank of a run of equal values = mean of its 1-based positions
    uniq, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def best_threshold(scores_pos, scores_neg, comparator: str = ">") -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising accuracy of ``score > t`` ⇒ positive (``"<"``: below ⇒ positive).

    Accuracy is plain accuracy over both sets together. Candidates are midpoints between adjacent
    distinct scores plus one step beyond each end; ties in accuracy go to the candidate whose margin to the
    nearest score is largest (the midpoint of the widest gap).
    """
    if comparator not in (">", "<"):
        raise ValueError(f"expected comparator '>' or '<', found {comparator!r}; fix: use '>'")
    pos, neg = _as_tensor(scores_pos), _as_tensor(scores_neg)
    if comparator == "<":
        t, acc = best_threshold(-pos, -neg, ">")
        return -t, acc
    values = torch.unique(torch.cat([pos, neg]))  # sorted
    if values.numel() == 1:
        cands = torch.stack([values[0] - 1.0, values[0] + 1.0])
        gaps = torch.ones(2, dtype=torch.float64)
    else:
        mids = (values[1:] + values[:-1]) / 2
        span = float(values[-1] - values[0])
        cands = torch.cat([values[:1] - span * 1e-3, mids, values[-1:] + span * 1e-3])
        gaps = torch.cat(
            [torch.zeros(1, dtype=torch.float64), values[1:] - values[:-1], torch.zeros(1, dtype=torch.float64)]
        )
    correct = (pos[None, :] > cands[:, None]).sum(1) + (neg[None, :] <= cands[:, None]).sum(1)
    acc = correct.double() / (pos.numel() + neg.numel())
    best = acc.max()
    idx = int(torch.argmax(torch.where(acc == best, gaps, torch.full_like(gaps, -1.0))))
    return float(cands[idx]), float(best)


def accuracy(scores_pos, scores_neg, threshold: float, comparator: str = ">") -> float:
    """Accuracy of the rule ``score <comparator> threshold`` ⇒ positive on the two sets."""
    pos, neg = _as_tensor(scores_pos), _as_tensor(scores_neg)
    if comparator == ">":
        ok = (pos > threshold).sum() + (neg <= threshold).sum()
    else:
        ok = (pos < threshold).sum() + (neg >= threshold).sum()
    return float(ok) / (pos.numel() + neg.numel())
