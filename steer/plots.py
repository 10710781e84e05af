"""PNG plots a person can read: evaluation sweeps (metrics vs α, one line per layer set). The tuning front's plot
is :func:`steer.vectors.tune.plot_front`."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _val(metrics: dict, key: str) -> float:
    m = metrics.get(key)
    if m is None:
        return float("nan")
    if isinstance(m, dict):
        return m.get("rate", m.get("mean", float("nan")))
    return getattr(m, "rate", getattr(m, "mean", float("nan")))


def plot_eval(report: dict, path: str | Path, title: str = "") -> Path:
    """Harmful refusal, harmless refusal and capability (accuracy, or KL) against α; one line per layer set."""
    plt = _plt()
    configs = report["configs"]
    has_acc = any("capability" in c["metrics"] for c in configs)
    panels = [
        ("harmful_refusal", "refusal on harmful (%)", 100),
        ("harmless_refusal", "refusal on harmless (%)", 100),
        ("capability", "task accuracy (%)", 100) if has_acc else ("kl", "KL to unsteered (nats)", 1),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    sets: dict[str, list] = {}
    for c in configs:
        sets.setdefault("layers " + ",".join(map(str, c["layers"] or [])) if c["layers"] else "unsteered", []).append(c)
    for ax, (key, label, scale) in zip(axes, panels):
        for name, cs in sets.items():
            cs = sorted(cs, key=lambda c: c["alpha"] or 0.0)
            xs = [c["alpha"] or 0.0 for c in cs]
            ax.plot(xs, [scale * _val(c["metrics"], key) for c in cs], marker="o", label=name)
        ax.set_xlabel("α (steering strength)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if scale == 100:
            ax.set_ylim(-3, 103)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "steer eval")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
