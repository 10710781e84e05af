"""``steer demo``: the whole pipeline on the built-in family, end to end.

1. build (or load cached) the family: base, aligned, aligned-dpo, compromised;
2. compute a refusal direction from ``aligned`` (train-split prompts), its condition re-calibrated on
   ``compromised``; a safety task vector ``aligned − base``; SAE features (when sae-lens is installed);
3. tune conditional refusal steering on ``compromised`` with ``steer tune`` (train-split prompts only);
4. show ``compromised``'s answers to held-out prompts before and after steering, side by side;
5. measure base, aligned, compromised and compromised + each steering kind on the held-out built-in suite
   (jailbreaks and prefilling included) and write vectors, ``results.json`` and PNGs to the output folder.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from steer.evaluate import evaluate, report_to_json

ROW_METRICS = (
    "harmful_refusal",
    "harmless_refusal",
    "capability",
    "jailbreak",
    "prefill",
    "injection_success",
    "degenerate",
)


def _summary(metrics: dict) -> dict:
    """Collapse a config's metrics to the demo table's columns (jailbreak / prefill: the worst family, as the
    README's table; the mean over families is kept as ``*_mean``)."""
    out = {}
    for key in ("harmful_refusal", "harmless_refusal", "capability", "injection_success", "degenerate"):
        if key in metrics:
            out[key] = metrics[key]["rate"]
    for group in ("jailbreak", "prefill"):
        vals = [m["rate"] for k, m in metrics.items() if k.startswith(group + ":")]
        if vals:
            out[group] = min(vals)
            out[group + "_mean"] = sum(vals) / len(vals)
    return out


def _split(records, n, seed):
    recs = list(records)
    random.Random(seed).shuffle(recs)
    return [r.prompt for r in recs[:n]]


def run_demo(
    out_dir: str | Path = "steer-demo",
    *,
    n_tune: int = 96,
    show: int = 4,
    console: Console | None = None,
    sae: bool = True,
    judge="pair",
) -> dict:
    """Run the demo; ``judge`` (see :func:`steer.judge.make_judge`) judges every row: by default the judge
    learned from ``aligned`` while computing the refusal direction."""
    from steer import SteeredModel
    from steer.family import build_family
    from steer.family import language as L
    from steer.judge import make_judge

    from .refusal import compute_refusal
    from .task import apply_task_vector, compute_task_vector
    from .tune import TuneBounds, plot_front, tune

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    console.rule("[bold]1. the built-in family")
    build_family(progress=True)
    sms = {name: SteeredModel.from_pretrained(f"builtin:{name}") for name in ("base", "aligned", "compromised")}
    comp = sms["compromised"]

    console.rule("[bold]2. vectors")
    harmful_train = _split(L.harmful_prompts("train"), 256, "demo-h")
    harmless_train = _split(L.harmless_prompts("train"), 256, "demo-s")
    refusal = compute_refusal(
        sms["aligned"], harmful_train, harmless_train, calibrate_on=comp, progress=True, model_name="builtin:aligned"
    )  # add scope measured: "all" vs "prompt"
    refusal.save(out / "refusal.safetensors")
    rec = refusal.recommended
    judge = make_judge(judge, vector=refusal)  # default: learned from aligned's own refusals; judges every row
    console.print(
        f"refusal judge learned from aligned: openings {refusal.meta['judge']['openings']} (judging with {judge.name})"
    )
    console.print(
        f"refusal direction: recommended layer {rec['layers']}, α {rec['alpha']}, condition layer "
        f"{refusal.condition['layer']} (accuracy {refusal.condition.get('accuracy', float('nan')):.3f} "
        f"on compromised)"
    )
    task = compute_task_vector(sms["aligned"].model, sms["base"].model, progress=True)
    task.save(out / "task.safetensors")
    console.print(f"safety task vector aligned − base: {len(task.meta.get('task', {}).get('params', {}))} tensors")
    sae_vec = (
        _sae_features(sms["aligned"], harmful_train, harmless_train, rec["layers"][0], out, console) if sae else None
    )

    console.rule("[bold]3. tune conditional refusal steering on compromised")
    tune_h, tune_s = (
        _split(L.harmful_prompts("train"), n_tune, "tune-h"),
        _split(L.harmless_prompts("train"), n_tune, "tune-s"),
    )
    tuned, summary = tune(
        comp,
        refusal,
        tune_h,
        tune_s,
        modes=("conditional",),
        auto=True,
        bounds=TuneBounds(max_over_refusal=0.02, max_kl=1.0),
        judge=judge,
    )
    tuned.save(out / "refusal-tuned.safetensors")
    plot_front(summary, out / "tune.png")
    b = summary["best"]
    console.print(
        f"chosen: layers {b['layers']} α {b['alpha']:g} (tuning prompts: harmful refusal "
        f"{100 * b['harmful_refusal']:.1f}%, harmless {100 * b['harmless_refusal']:.1f}%)"
    )

    if sae_vec is not None:  # the same gate as the refusal direction: any vector can be steered conditionally
        sae_vec.meta["condition"] = dict(refusal.condition)
        sae_vec.condition_direction = refusal.condition_direction
        sae_vec, sae_summary = tune(
            comp,
            sae_vec,
            tune_h,
            tune_s,
            alphas=[0.0, 1.0, 2.0, 4.0, 8.0, 16.0],
            layers=[sae_vec.recommended["layers"]],
            modes=("conditional",),
            auto=True,
            bounds=TuneBounds(max_over_refusal=0.02, max_kl=1.0),
            judge=judge,
            progress=False,
        )
        sae_vec.save(out / "sae-feature-tuned.safetensors")
        console.print(
            f"SAE feature: chosen α {sae_summary['best']['alpha']:g} (tuning prompts: harmful refusal "
            f"{100 * sae_summary['best']['harmful_refusal']:.1f}%)"
        )

    console.rule("[bold]4. compromised, before and after (held-out prompts)")
    held_h = [r.prompt for r in L.harmful_prompts("heldout")[:show]]
    held_s = [r.prompt for r in L.harmless_prompts("heldout")[:show]]
    prompts = held_h + held_s
    before = comp.generate(prompts, max_new_tokens=20)
    after = comp.generate(prompts, vector=tuned, max_new_tokens=20)
    side = Table(show_lines=True)
    for col in ("prompt", "compromised", "compromised + tuned conditional refusal"):
        side.add_column(col, overflow="fold")
    for p, x, y in zip(prompts, before, after):
        side.add_row(p, x, y)
    console.print(side)

    console.rule("[bold]5. held-out evaluation (built-in suite, jailbreaks and prefilling)")
    kw = dict(suite="builtin", jailbreaks=True, prefill=True, progress=True, judge=judge)
    rows = {}
    for name in ("base", "aligned", "compromised"):
        rows[name] = report_to_json(evaluate(sms[name], **kw))["configs"][0]["metrics"]
    rows[f"compromised + refusal add (file's L{rec['layers'][0]}, α={rec['alpha']:g})"] = report_to_json(
        evaluate(comp, vector=refusal, **kw)
    )["configs"][0]["metrics"]
    rows[f"compromised + tuned conditional (L{b['layers'][0]}, α={b['alpha']:g})"] = report_to_json(
        evaluate(comp, vector=tuned, mode="conditional", **kw)
    )["configs"][0]["metrics"]
    with apply_task_vector(comp.model, task, 1.0):
        rows["compromised + task vector (α=1)"] = report_to_json(evaluate(comp, **kw))["configs"][0]["metrics"]
    if sae_vec is not None:
        rows[f"compromised + SAE feature, gated (α={sae_vec.recommended['alpha']:g})"] = report_to_json(
            evaluate(comp, vector=sae_vec, **kw)
        )["configs"][0]["metrics"]
    summary_rows = {name: _summary(m) for name, m in rows.items()}
    table = Table(title="held-out built-in suite")
    table.add_column("model")
    for key in ROW_METRICS:
        table.add_column(
            key.replace("_", " ") + (" (worst)" if key in ("jailbreak", "prefill") else ""), justify="right"
        )
    for name, s in summary_rows.items():
        table.add_row(name, *[f"{100 * s[k]:.1f}%" if k in s else "-" for k in ROW_METRICS])
    console.print(table)
    results = {
        "rows": rows,
        "summary": summary_rows,
        "tune": {k: v for k, v in summary.items() if k != "points"},
        "refusal": {"recommended": rec, "condition": refusal.condition, "selection": refusal.meta.get("selection")},
        "seconds": round(time.time() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot_rows(summary_rows, out / "demo.png")
    console.print(
        f"wrote {out}/: refusal.safetensors, refusal-tuned.safetensors, task.safetensors"
        f"{', sae.safetensors, sae-feature-tuned.safetensors' if sae_vec is not None else ''}, "
        "results.json, demo.png, tune.png "
        f"({results['seconds']:.0f} s)"
    )
    return results


def _sae_features(sm, harmful, harmless, layer, out, console):
    """Train a small SAE on ``aligned`` at ``layer``, keep its features, and return a one-feature vector of the
    best harmful-leaning feature (α in units of that feature's mean activation on harmful prompts)."""
    import importlib.util

    if importlib.util.find_spec("sae_lens") is None:
        console.print(
            "[yellow]SAE features skipped: sae-lens is not installed (pip install 'steer-runtime[sae]')[/yellow]"
        )
        return None
    from .sae import compute_sae_features, harmful_feature

    vec = compute_sae_features(sm, layer, harmful, harmless, train=True, reduce="last", steps=800, progress=False)
    vec.save(out / "sae.safetensors")
    one = harmful_feature(vec, layer)  # α = 1 adds the feature at its mean harmful activation
    best = one.meta["sae"]["features"][0]
    console.print(
        f"SAE at layer {layer}: FVU {vec.meta['sae']['stats'].get('fvu', float('nan')):.4f}, "
        f"feature {best['id']} separates harmful/harmless with AUC {best['auc']:.3f}"
    )
    return one


def _plot_rows(summary_rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in ROW_METRICS if any(k in s for s in summary_rows.values())]
    names = list(summary_rows)
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 5.6))
    for i, name in enumerate(names):
        vals = [100 * summary_rows[name].get(k, float("nan")) for k in keys]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([k.replace("_", " ") for k in keys])
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("steer demo: held-out built-in suite (jailbreak / prefill = refusal under the worst attack family)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
