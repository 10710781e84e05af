"""Measuring candidate refusal directions on the model (the selection recipe of Arditi et al. 2024, §C).

For every candidate layer ``l`` (the last fifth of the layers is skipped: directions there tend to work by
disrupting the next-token distribution rather than by mediating refusal) three numbers are measured:

* ``induce`` — refusal rate on harmless prompts when ``α·r_l`` is *added* at block ``l``'s output (α = 1:
  the raw difference in means);
* ``bypass`` — refusal rate on harmful prompts when ``r̂_l`` is *ablated* from every block's output;
* ``kl``     — KL(plain ‖ ablated) of the next-token distribution at the last prompt position on harmless
  prompts (the ablation should leave harmless behaviour alone).

Refusal is judged on a few greedily generated tokens by a judge that counts only *coherent* refusals
(:mod:`steer.judge`); ``degenerate`` is the larger rate of incoherent completions among the induce rows and
among the ablation rows (a degenerate completion under ablation counts as still refused: garbage is no
bypass). A layer is eligible when ``kl <= kl_bound`` and ``degenerate <= max_degenerate``; the chosen one maximises
``induce + (refusal_plain − bypass)`` (ties: less degenerate, lower KL, then the earlier layer). When no layer
is eligible, the choice falls back to the measured effect among the layers that meet the coherence bound, and
failing that to the least degenerate layer: never to a fixed position.

Every candidate is evaluated in the same batches: each row carries its own candidate and strength through
steer's per-request α (a row whose α is 0 is bit-exactly unsteered by a handle), so one generation pass
covers the baseline and every candidate.
"""

from __future__ import annotations

import torch

from steer.judge import as_judge
from steer.progress import progress_bar
from steer.prompts import has_chat_template
from steer.vector import SteeringVector


def candidate_layers(layers: list[int], num_layers: int) -> list[int]:
    """``layers`` without the last fifth of the model (at least one layer skipped when there are ≥ 2)."""
    skip = max(1, round(num_layers / 5)) if num_layers > 1 else 0
    keep = [l for l in layers if l < num_layers - skip]
    return keep or list(layers[:1])


def _handle(sm, spec):
    layer, vec, mode, layers, *scope = spec
    return sm.steer(
        SteeringVector({layer: vec}),
        layers=layers,
        mode=mode,
        alpha=1.0,
        source_layer=layer,
        scope=scope[0] if scope else None,
    )


def run_rows(sm, rows, specs: dict, *, fn, batch_size: int = 32, progress=None):
    """Run ``fn(enc)`` over ``rows`` = ``[(text, key | None, alpha)]`` in batches; for every chunk a handle per
    distinct key is attached (``specs[key]`` = ``(layer, direction, mode, layers)``) with per-row α (its rows
    get ``alpha``, every other row 0)."""
    chat_applied = has_chat_template(sm.tokenizer)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        keys = list(dict.fromkeys(r[1] for r in chunk if r[1] is not None))
        handles = []
        try:
            for key in keys:
                h = _handle(sm, specs[key])
                handles.append(h)
                h.set_alphas([r[2] if r[1] == key else 0.0 for r in chunk])
            enc = sm.encode([r[0] for r in chunk], chat_applied)
            out.extend(fn(enc))
        finally:
            for h in handles:
                h.remove()
        if progress is not None:
            progress(len(chunk))
    return out


def _generator(sm, max_new_tokens: int):
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else sm.tokenizer.eos_token_id

    @torch.no_grad()
    def fn(enc):
        ids = sm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return sm.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return fn


def _last_logprobs(sm):
    @torch.no_grad()
    def fn(enc):
        logits = sm.model(**sm.with_positions(enc), use_cache=False).logits[:, -1, :].float()
        return list(torch.log_softmax(logits, dim=-1).cpu())

    return fn


def evaluate_candidates(
    sm,
    directions: dict[int, torch.Tensor],
    harmful: list[str],
    harmless: list[str],
    *,
    candidates: list[int],
    judge,
    max_new_tokens: int = 12,
    kl_bound: float = 0.1,
    max_degenerate: float = 0.1,
    batch_size: int = 32,
    progress: bool = False,
    add_scope: str = "all",
) -> dict:
    """Measure ``induce``, ``bypass`` and ``kl`` for each candidate layer; return the selection record."""
    all_layers = list(range(sm.num_layers))
    texts_h, texts_s = sm.format(harmful), sm.format(harmless)
    specs = {}
    for l in candidates:
        specs[("add", l)] = (l, directions[l], "add", [l], add_scope)
        specs[("ablate", l)] = (l, directions[l], "ablate", all_layers)
    gen_rows = [(t, None, 0.0) for t in texts_h + texts_s]
    for l in candidates:
        gen_rows += [(t, ("add", l), 1.0) for t in texts_s] + [(t, ("ablate", l), 1.0) for t in texts_h]
    kl_rows = [(t, None, 0.0) for t in texts_s]
    for l in candidates:
        kl_rows += [(t, ("ablate", l), 1.0) for t in texts_s]
    with progress_bar(progress, len(gen_rows) + len(kl_rows), "selecting a layer") as bar:
        comps = run_rows(sm, gen_rows, specs, fn=_generator(sm, max_new_tokens), batch_size=batch_size, progress=bar)
        logps = run_rows(sm, kl_rows, specs, fn=_last_logprobs(sm), batch_size=batch_size, progress=bar)
    seen = [r[0] for r in gen_rows]
    verdicts = as_judge(judge).verdicts(seen, comps)
    flags = [v.refusal for v in verdicts]
    nh, ns = len(harmful), len(harmless)
    base_h, base_s = _rate(flags[:nh]), _rate(flags[nh : nh + ns])
    plain = torch.stack(logps[:ns])
    table = []
    pos = nh + ns
    for i, l in enumerate(candidates):
        induce = _rate(flags[pos : pos + ns])
        bypassed = verdicts[pos + ns : pos + ns + nh]
        # a degenerate completion under ablation is no bypass: it counts as still refused
        bypass = _rate([v.refusal or v.degenerate for v in bypassed])
        degenerate = max(
            _rate([v.degenerate for v in verdicts[pos : pos + ns]]), _rate([v.degenerate for v in bypassed])
        )
        pos += ns + nh
        ablated = torch.stack(logps[ns * (i + 1) : ns * (i + 2)])
        kl = float((plain.exp() * (plain - ablated)).sum(-1).mean())
        table.append(
            {
                "layer": l,
                "induce": induce,
                "degenerate": degenerate,
                "bypass": bypass,
                "kl": round(kl, 6),
                "score": round(induce + (base_h - bypass), 6),
                "eligible": kl <= kl_bound and degenerate <= max_degenerate,
                "norm": round(float(directions[l].norm()), 6),
            }
        )
    eligible = [r for r in table if r["eligible"]]
    coherent = [r for r in table if r["degenerate"] <= max_degenerate]
    if eligible or coherent:
        best = max(eligible or coherent, key=lambda r: (r["score"], -r["degenerate"], -r["kl"], -r["layer"]))
    else:
        best = max(table, key=lambda r: (-r["degenerate"], r["score"], -r["kl"], -r["layer"]))
    return {
        "method": "arditi2024",
        "candidates": candidates,
        "kl_bound": kl_bound,
        "max_degenerate": max_degenerate,
        "refusal_plain": {"harmful": base_h, "harmless": base_s},
        "n_eval": {"harmful": nh, "harmless": ns},
        "max_new_tokens": max_new_tokens,
        "table": table,
        "chosen": best["layer"],
        "kl_fallback": not eligible,
        "fallback": "coherent" if not eligible and coherent else ("least_degenerate" if not eligible else None),
    }


def choose_alpha(
    sm,
    direction: torch.Tensor,
    layer: int,
    harmless: list[str],
    *,
    judge,
    grid,
    target: float = 0.9,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    progress: bool = False,
    add_scope: str = "all",
) -> tuple[float, list[dict]]:
    """Smallest α in ``grid`` whose addition at ``layer`` makes ≥ ``target`` of harmless prompts refused
    coherently (else the α with the highest rate, ties to the smaller α); all α in one batched pass."""
    specs = {"add": (layer, direction, "add", [layer], add_scope)}
    texts = sm.format(harmless)
    rows = [(t, "add", float(a)) for a in grid for t in texts]
    with progress_bar(progress, len(rows), "choosing alpha") as bar:
        comps = run_rows(sm, rows, specs, fn=_generator(sm, max_new_tokens), batch_size=batch_size, progress=bar)
    n = len(texts)
    verdicts = as_judge(judge).verdicts([r[0] for r in rows], comps)
    sweep = [
        {
            "alpha": float(a),
            "induce": _rate([v.refusal for v in verdicts[i * n : (i + 1) * n]]),
            "degenerate": _rate([v.degenerate for v in verdicts[i * n : (i + 1) * n]]),
        }
        for i, a in enumerate(grid)
    ]
    hits = [r for r in sweep if r["induce"] >= target]
    pick = hits[0] if hits else max(sweep, key=lambda r: (r["induce"], -r["alpha"]))
    return pick["alpha"], sweep


def _rate(flags) -> float:
    return round(sum(flags) / len(flags), 6) if flags else 0.0


__all__ = ["candidate_layers", "choose_alpha", "evaluate_candidates", "run_rows"]
