"""The report of ``steer protect``: every candidate side by side, as a table (rich, and Markdown for the README)
and a PNG, so that a reader sees why one kind won and where each failed."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
    ("harmful_refusal", "harmful refusal"),
    ("harmless_refusal", "harmless refusal"),
    ("capability", "capability"),
    ("prefill", "prefill (worst)"),
    ("degenerate", "degenerate"),
)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _config(c: dict) -> str:
    cfg = c.get("config") or {}
    if not cfg:
        return c.get("skipped") or "-"
    parts = [str(cfg.get("mode"))]
    if cfg.get("layers"):
        parts.append("L" + ",".join(map(str, cfg["layers"])))
    if cfg.get("scope"):
        parts.append(str(cfg["scope"]))
    parts.append(f"α={cfg.get('alpha') if cfg.get('alpha') is not None else 1.0:g}")
    if cfg.get("members"):  # a stack: each member at its own α, times the stack's
        parts.append("[" + "; ".join(_config({"config": m}) for m in cfg["members"]) + "]")
    if cfg.get("condition"):
        parts.append(f"gate L{cfg['condition']['layer']}")
    return " ".join(parts)


def rows(report: dict) -> list[list[str]]:
    """One row per model / candidate: name, the columns, KL, the configuration, and whether bounds were met."""
    out = []
    for name, ref in (
        ("FINETUNED (unsteered)", report["reference"]["finetuned"]),
        ("ALIGNED", report["reference"]["aligned"]),
    ):
        out.append([name, *[_pct(ref.get(k)) for k, _ in COLUMNS], f"{ref['kl']:.3f}", "-", "-"])
    for c in report["candidates"]:
        h = c.get("heldout") or {}
        met = "skipped" if c.get("skipped") else ("yes" if c["feasible"] else "no: " + "; ".join(c["violations"]))
        mark = " (chosen)" if c["label"] == report["chosen"] else ""
        kl = f"{h['kl']:.3f}" if "kl" in h else "-"
        out.append([c["label"] + mark, *[_pct(h.get(k)) for k, _ in COLUMNS], kl, _config(c), met])
    return out


HEADER = ["model / candidate", *[t for _, t in COLUMNS], "KL", "configuration", "within bounds"]


def print_table(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"steer protect: held-out prompts ({report['prompts']['suite']})", show_lines=False)
    for col in HEADER:
        table.add_column(col, overflow="fold")
    for r in rows(report):
        table.add_row(*r)
    console.print(table)
    console.print(f"chosen: {report['chosen']} (within bounds: {report['met_bounds']}); {report['seconds']:.0f} s")
    v = report.get("vllm") or {}
    if v:
        console.print(
            f"vLLM: {v['chosen']} ({v['route']}: {v['file']})" if v.get("chosen") else f"vLLM: {v.get('why')}"
        )


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per candidate (hatched: outside the bounds), the two
    reference models as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cands = [c for c in report["candidates"] if not c.get("skipped")]
    x = np.arange(len(COLUMNS))
    width = 0.8 / max(1, len(cands))
    fig, ax = plt.subplots(figsize=(13, 5.8))
    for i, c in enumerate(cands):
        vals = [100 * c["heldout"].get(k, float("nan")) for k, _ in COLUMNS]
        label = c["label"] + (" (chosen)" if c["label"] == report["chosen"] else "") + ("" if c["feasible"] else " ✗")
        ax.bar(
            x + i * width - 0.4 + width / 2,
            vals,
            width,
            label=label,
            hatch="" if c["feasible"] else "//",
            edgecolor="red" if c["label"] == report["chosen"] else "none",
            linewidth=2,
        )
    for name, style in (("finetuned", "--"), ("aligned", ":")):
        ref = report["reference"][name]
        for j, (k, _) in enumerate(COLUMNS):
            if k in ref:
                ax.hlines(100 * ref[k], j - 0.45, j + 0.45, colors="k", linestyles=style, lw=1.2)
    ax.plot([], [], "k--", label="FINETUNED")
    ax.plot([], [], "k:", label="ALIGNED")
    ax.set_xticks(x)
    ax.set_xticklabels([t for _, t in COLUMNS])
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_title(
        f"steer protect: every kind, tuned on FINETUNED, held-out ({report['prompts']['suite']}); ✗ = outside bounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python -m steer.vectors.protect_report DIR/report.json: the Markdown table
    import json
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
