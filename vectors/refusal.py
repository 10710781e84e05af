"""Refusal directions by difference in means (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a
Single Direction"), with measured layer selection and a CAST condition (Lee et al. 2024).

Conventions of steer's vector files (every kind follows them):

* **Layers** are 0-based decoder blocks; ``direction.{l}`` belongs to block ``l``'s *output* (the residual
  stream HF reports as ``hidden_states[l + 1]``) unless the file's ``site`` says ``input``.
* **Positions**: a refusal direction is ``mean(harmful) − mean(harmless)`` of activations at one position set
  of the chat-formatted prompt: ``last`` (the last prompt token, i.e. the end of the generation prompt),
  ``post_instruction`` (the template tokens after the user's text, averaged — which equals the mean of the
  per-position differences) or ``mean`` (the mean over the prompt's tokens). The condition always reads the
  last prompt token.
* **Scale / α**: directions are stored *unnormalised* (their norms are in ``meta["norms"]``), so ``add`` with
  α = 1 moves a harmless prompt's activation by the full harmful − harmless mean gap; ablation uses the unit
  direction and α = 1 removes the component entirely (α is β of ``h − β(h·r̂)r̂``). ``recommended.alpha`` is
  the smallest measured α that makes the model refuse harmless prompts when added at
  ``recommended.layers``; ``recommended.source_layer`` is the layer whose direction to use when steering
  several layers (e.g. ablating from every layer, as Arditi et al. do).
* **Provenance**: ``prompt_sets`` holds the sha256 of each prompt list (UTF-8, prompts joined by ``\\n``).
* **Judge**: ``judge`` records what the source model's refusals look like (:func:`steer.judge.learn_refusals`:
  its greedy completions on harmful prompts that share an opening rare on harmless prompts); every later
  judgement of this vector (selection, ``steer tune``, ``steer eval``) uses it by default.

The Python API::

    from steer import SteeredModel
    from steer.vectors.refusal import compute_refusal
    sm = SteeredModel.from_pretrained("builtin:aligned")
    vec = compute_refusal(sm, harmful_prompts, harmless_prompts)      # -> SteeringVector (kind="refusal")
    vec.save("refusal.safetensors")
    sm.generate(prompts, vector=vec)                                   # add at the recommended layer / α
    sm.generate(prompts, vector=vec, mode="ablate", layers=list(range(sm.num_layers)), alphas=1.0)
    sm.generate(prompts, vector=vec, mode="conditional")               # gated by the stored condition
"""

from __future__ import annotations

import hashlib

import torch

from steer.activations import collect
from steer.errors import ConfigError
from steer.judge import Coherence, PairJudge, RefusalJudge, learn_refusals, make_judge
from steer.layers import check_layers

from .condition import fit_condition, unit_diff
from .selection import candidate_layers, choose_alpha, evaluate_candidates

POSITIONS = ("last", "post_instruction", "mean")
ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def prompt_sha256(prompts: list[str]) -> str:
    """sha256 of a prompt list (UTF-8, joined by newlines): the provenance id of a prompt set."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def _texts(prompts, what: str) -> list[str]:
    out = [p if isinstance(p, str) else getattr(p, "prompt", None) for p in prompts]
    if len(out) < 2 or any(not isinstance(p, str) for p in out):
        raise ConfigError(
            f"{what} prompts are missing or malformed",
            expected="at least 2 prompt strings",
            found=f"{len(out)} items",
            fix=f"pass a list of {what} prompts (or records with .prompt)",
        )
    return out


def diff_in_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """``[L, d]`` mean(harmful) − mean(harmless) of ``[N, L, d]`` activations (``[N, L, k, d]``: positions
    averaged first). Accumulated in float64."""
    h, s = harmful.double(), harmless.double()
    if h.dim() == 4:
        h, s = h.mean(2), s.mean(2)
    return (h.mean(0) - s.mean(0)).float()


def _subset(prompts: list[str], n: int) -> list[str]:
    if len(prompts) <= n:
        return list(prompts)
    step = len(prompts) / n
    return [prompts[int(i * step)] for i in range(n)]


def _load(model, **kw):
    if model is None or hasattr(model, "num_layers"):
        return model
    from steer.model import SteeredModel

    return SteeredModel.from_pretrained(model, **kw)


@torch.no_grad()
def compute_refusal(
    sm,
    harmful,
    harmless,
    *,
    positions: str = "last",
    layers: list[int] | None = None,
    select: bool = True,
    calibrate_on=None,
    judge=None,
    n_eval: int = 32,
    kl_bound: float = 0.1,
    max_new_tokens: int = 12,
    alpha_grid=ALPHA_GRID,
    alpha_target: float = 0.9,
    condition: bool = True,
    batch_size: int = 32,
    progress: bool = False,
    model_name: str | None = None,
    add_scope: str = "auto",
):
    """Refusal directions for every layer of ``sm`` (or ``layers``) as a :class:`~steer.SteeringVector`.

    ``harmful`` / ``harmless``: prompt strings (or records with ``.prompt``). ``select``: measure candidate
    layers on ``n_eval`` prompts of each set (see :mod:`steer.vectors.selection`) and recommend one; without it
    the candidate with the largest gap relative to the activation norm is recommended, α = 1, unmeasured.
    ``calibrate_on``: another model (a SteeredModel or a path / ``builtin:NAME``) on which to re-fit the
    condition's layer and threshold (the directions stay this model's). ``judge``: anything
    :func:`steer.judge.make_judge` takes (default: the judge learned here from ``sm``'s own completions, see
    :func:`learn_judge`; refusal markers if ``sm`` shows no consistent refusal). ``add_scope``: token scope of
    the additions measured and recommended (``"all"`` as Arditi et al.; ``"prompt"`` steers only the prompt's positions,
    which keeps small models from repeating the refusal's first word; ``"auto"``, the default, measures both
    and keeps the better).
    """
    if positions not in POSITIONS:
        raise ConfigError(
            "unknown positions", expected=" | ".join(POSITIONS), found=repr(positions), fix="use --positions last"
        )
    harmful, harmless = _texts(harmful, "harmful"), _texts(harmless, "harmless")
    layers = check_layers(layers if layers is not None else range(sm.num_layers), sm.num_layers)
    learned = judge is None or judge in ("auto", "pair")
    if not learned:
        judge = make_judge(judge, reference=sm)  # a bad spec fails here, before any generation
    record = learn_judge(
        sm, _subset(harmful, n_eval), _subset(harmless, n_eval), max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    if learned and not record["openings"] and judge == "pair":
        raise ConfigError(
            "the model shows no consistent refusal to learn a pair judge from",
            expected="an opening shared by >= 10% of its harmful completions and <= 5% of harmless",
            found=f"completions such as {record.get('examples')[:2] or 'none'}",
            fix="use --judge markers (or another judge), or compute the vector from an aligned model",
        )
    if learned:
        judge = (
            PairJudge(record, coherence=Coherence(sm)) if record["openings"] else RefusalJudge(coherence=Coherence(sm))
        )
    kw = dict(layers=layers, batch_size=batch_size)
    acts_h = collect(sm, harmful, positions=positions, progress=progress and "harmful activations", **kw)
    acts_s = collect(sm, harmless, positions=positions, progress=progress and "harmless activations", **kw)
    diff = diff_in_means(acts_h, acts_s)
    directions = {l: diff[i] for i, l in enumerate(layers)}
    ref = acts_s.float().mean(0)  # the harmless mean per layer: the reference point of affine ops (ACE)
    means = {f"mean.{l}": (ref[i].mean(0) if ref.dim() == 3 else ref[i]).contiguous() for i, l in enumerate(layers)}
    if positions == "last":
        last_h, last_s = acts_h, acts_s
    elif positions == "post_instruction":
        last_h, last_s = acts_h[:, :, -1], acts_s[:, :, -1]
    else:
        last_h = collect(sm, harmful, positions="last", **kw)
        last_s = collect(sm, harmless, positions="last", **kw)
    del acts_h, acts_s

    cands = candidate_layers(layers, sm.num_layers)
    if select:
        scopes = ("all", "prompt") if add_scope == "auto" else (add_scope,)
        tried = {}
        for scope in scopes:  # "auto": measure both token scopes of the addition and keep the better one
            tried[scope] = evaluate_candidates(
                sm,
                directions,
                _subset(harmful, n_eval),
                _subset(harmless, n_eval),
                candidates=cands,
                judge=judge,
                max_new_tokens=max_new_tokens,
                kl_bound=kl_bound,
                batch_size=batch_size,
                progress=progress,
                add_scope=scope,
            )

        def top(scope):  # ties: fewer degenerate completions, then "prompt" (leaves generated tokens alone)
            rows = [r for r in tried[scope]["table"] if r["layer"] == tried[scope]["chosen"]]
            return (rows[0]["eligible"], rows[0]["score"], -rows[0]["degenerate"], scope == "prompt")

        add_scope = max(scopes, key=top)
        sel = tried[add_scope]
        sel["add_scope"] = add_scope
        if len(scopes) > 1:
            sel["add_scope_scores"] = {sc: top(sc)[1] for sc in scopes}
        best = sel["chosen"]
        alpha, sweep = choose_alpha(
            sm,
            directions[best],
            best,
            _subset(harmless, n_eval),
            judge=judge,
            grid=list(alpha_grid),
            target=alpha_target,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            add_scope=add_scope,
        )
        sel.update(
            alpha_sweep=sweep,
            alpha_target=alpha_target,
            judge=getattr(judge, "describe", lambda: {"name": repr(judge)})(),
        )
    else:
        add_scope = "all" if add_scope == "auto" else add_scope  # nothing measured: Arditi et al.'s default
        norms = {
            l: float(directions[l].norm() / last_s[:, layers.index(l)].norm(dim=-1).mean().clamp_min(1e-12))
            for l in cands
        }
        best, alpha = max(cands, key=lambda l: norms[l]), 1.0
        sel = {
            "method": "norm_ratio",
            "measured": False,
            "candidates": cands,
            "table": [{"layer": l, "norm_ratio": round(r, 6)} for l, r in norms.items()],
            "chosen": best,
        }

    fp = sm.fingerprint()
    if model_name:
        fp["name_or_path"] = model_name
    meta = {
        "kind": "refusal",
        "op": "add",
        "site": "output",
        "scope": "all",
        "model": fp,
        "recommended": {"layers": [best], "alpha": alpha, "mode": "add", "source_layer": best, "scope": add_scope},
        "provenance": {
            "method": "diff_in_means",
            "positions": positions,
            "prompt_sets": {"harmful": prompt_sha256(harmful), "harmless": prompt_sha256(harmless)},
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "model": fp["name_or_path"],
        },
        "selection": sel,
        "judge": record,
    }
    cond_dir = None
    if condition:
        meta["condition"], cond_dir, meta["condition_table"] = fit_condition(last_h, last_s, layers, max_layer=best)
        target = _load(calibrate_on)
        if target is not None:
            cal_layers = [l for l in layers if l <= best]
            th = collect(target, harmful, positions="last", layers=cal_layers, batch_size=batch_size)
            ts = collect(target, harmless, positions="last", layers=cal_layers, batch_size=batch_size)
            fixed = {l: unit_diff(last_h[:, layers.index(l)], last_s[:, layers.index(l)]) for l in cal_layers}
            cal, cond_dir, table = fit_condition(th, ts, cal_layers, max_layer=best, directions=fixed)
            tfp = target.fingerprint()
            named = (
                calibrate_on
                if isinstance(calibrate_on, str)
                else (getattr(target, "source", None) or tfp["name_or_path"])
            )
            cal["calibrated_on"] = named or tfp["architecture"]
            cal["source_fit"] = meta["condition"]
            meta["condition"], meta["condition_table"] = cal, table
    from steer.vector import SteeringVector

    return SteeringVector(directions, meta, condition_direction=cond_dir, extra=means)


def learn_judge(sm, harmful: list[str], harmless: list[str], *, max_new_tokens: int = 12, batch_size: int = 32) -> dict:
    """The pair judge's record: ``sm``'s own greedy completions on ``harmful`` and ``harmless`` prompts, and the
    openings that mark its refusals (:func:`steer.judge.learn_refusals`)."""
    comps = sm.generate(list(harmful) + list(harmless), max_new_tokens=max_new_tokens, batch_size=batch_size)
    record = learn_refusals(comps[: len(harmful)], comps[len(harmful) :], harmful_prompts=list(harmful))
    record["max_new_tokens"] = max_new_tokens
    return record


def selection_table(vec):
    """A rich Table of a refusal vector's layer selection (what ``steer vectors refusal`` prints)."""
    from rich.table import Table

    sel = vec.meta.get("selection") or {}
    rec = vec.recommended
    table = Table(title=f"refusal direction: layer {rec.get('layers')} α={rec.get('alpha')}")
    rows = sel.get("table") or []
    cols = [
        c
        for c in ("layer", "induce", "degenerate", "bypass", "kl", "score", "eligible", "norm", "norm_ratio")
        if rows and c in rows[0]
    ]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        mark = " *" if r["layer"] == sel.get("chosen") else ""
        table.add_row(
            *[(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) + (mark if c == "layer" else "") for c in cols]
        )
    plain = sel.get("refusal_plain")
    if plain:
        table.caption = (
            f"plain refusal: harmful {plain['harmful']:.2f}, harmless {plain['harmless']:.2f}; "
            f"induce = refusal on harmless with +r_l at l; bypass = refusal on harmful with r̂_l "
            f"ablated everywhere; KL bound {sel.get('kl_bound')}"
        )
    return table
