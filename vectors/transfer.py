"""The README pipeline on a model family, with default options, measured by a judge the pipeline is not told.

Given the member folders of a family (``aligned`` and ``compromised``; the built-in one or a variant that
differs in architecture, chat template and refusal sentence), this runs exactly what the README tells a user
to run:

1. ``steer vectors refusal ALIGNED --harmful … --harmless … --calibrate-on COMPROMISED`` (train prompts);
2. ``steer tune COMPROMISED --vector … --mode conditional --auto`` (another sample of the train prompts);
3. ``steer generate COMPROMISED --vector TUNED`` on held-out prompts,

and judges every completion *strictly*: a refusal is a completion that starts with the family's whole refusal
sentence (which the pipeline never sees: its judge is learned from ``aligned``). It reports held-out harmful
and harmless refusal, the degenerate-output rate (the pipeline judge's coherence check under the unsteered model),
and the gap between the harmful refusal ``tune`` reported and the strict judge's rate on the same tuning
prompts and configuration. ``benchmarks/transfer_table.py`` prints the table; the tests assert looser bounds.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from steer.judge import make_judge
from steer.metrics import Rate


def _prompts(records, n: int, seed: str) -> list[str]:
    recs = list(records)
    random.Random(seed).shuffle(recs)
    return [r.prompt for r in recs[:n]]


def run_pipeline(
    paths: dict,
    refusal_sentence: str,
    *,
    n_vectors: int = 256,
    n_tune: int = 96,
    n_heldout: int = 200,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> dict:
    """Run the pipeline on ``paths`` (``{"aligned": dir, "compromised": dir, ...}``); return the measurements."""
    from steer import SteeredModel
    from steer.family import language as L

    from .refusal import compute_refusal
    from .tune import tune

    t0 = time.perf_counter()
    aligned = SteeredModel.from_pretrained(str(paths["aligned"]))
    comp = SteeredModel.from_pretrained(str(paths["compromised"]))
    train_h, train_s = L.harmful_prompts("train"), L.harmless_prompts("train")
    vec = compute_refusal(
        aligned,
        _prompts(train_h, n_vectors, "vec-h"),
        _prompts(train_s, n_vectors, "vec-s"),
        calibrate_on=comp,
        progress=progress,
        model_name=str(paths["aligned"]),
    )
    tune_h, tune_s = _prompts(train_h, n_tune, "tune-h"), _prompts(train_s, n_tune, "tune-s")
    tuned, summary = tune(comp, vec, tune_h, tune_s, modes=("conditional",), auto=True, progress=progress)
    strict = lambda text: L.is_strict_refusal(text, refusal_sentence)  # noqa: E731
    best = summary["best"]
    on_tune = comp.generate(tune_h, vector=tuned, max_new_tokens=max_new_tokens)
    held_h = [r.prompt for r in L.harmful_prompts("heldout", cap=n_heldout)]
    held_s = [r.prompt for r in L.harmless_prompts("heldout", cap=n_heldout)]
    out_h = comp.generate(held_h, vector=tuned, max_new_tokens=max_new_tokens)
    out_s = comp.generate(held_s, vector=tuned, max_new_tokens=max_new_tokens)
    # coherence as the pipeline's own judge measures it: repetition, and fluency under the unsteered compromised
    # model relative to aligned's recorded refusals
    coherence = make_judge("pair", vector=vec, reference=comp).coherence
    degenerate = coherence.degenerate(comp.format(held_h + held_s), out_h + out_s)
    strict_tune = Rate.of(map(strict, on_tune))
    return {
        "judge_openings": vec.meta["judge"]["openings"],
        "selection": {
            "layer": vec.recommended["layers"],
            "alpha": vec.recommended["alpha"],
            "fallback": vec.meta["selection"].get("fallback"),
        },
        "chosen": {
            "layers": best["layers"],
            "alpha": best["alpha"],
            "scope": best.get("scope"),
            "condition_layer": tuned.condition["layer"],
            "condition_accuracy": tuned.condition.get("accuracy"),
        },
        "heldout_harmful_refusal": Rate.of(map(strict, out_h)),
        "heldout_harmless_refusal": Rate.of(map(strict, out_s)),
        "heldout_degenerate": Rate.of(degenerate),
        "tune_reported_harmful": best["harmful_refusal"],
        "tune_strict_harmful": strict_tune,
        "tune_gap": abs(best["harmful_refusal"] - strict_tune.rate),
        "samples": {"harmful": out_h[:4], "harmless": out_s[:4]},
        "seconds": round(time.perf_counter() - t0, 1),
        "paths": {k: str(Path(v)) for k, v in paths.items()},
    }
