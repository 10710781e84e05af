"""Effect sizes of the three vector kinds on the built-in family (held-out prompts), as Markdown tables.

    python benchmarks/vectors_table.py [--json OUT.json]

* refusal direction from ``aligned`` (train prompts): held-out AUC at the recommended layer; refusal on held-out
  harmful prompts of ``base`` / ``compromised`` before and after ADDING it (α picked on train prompts), and of
  ``aligned`` before and after ABLATING it from every layer (Arditi et al. 2024);
* safety task vector ``aligned − base``: max |logit| difference of base + 1·τ vs aligned; refusal of
  ``compromised`` + α·τ and of ``compromised`` − (compromised − aligned) (Safety Arithmetic);
* SAE features (needs sae-lens): FVU / L0 / dead features of a TopK SAE trained on ``aligned`` and the held-out
  AUC of the best feature.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from steer import SteeredModel
from steer.activations import collect
from steer.family import build_family
from steer.family import language as L
from steer.vectors.refusal import compute_refusal
from steer.vectors.stats import auc
from steer.vectors.task import apply_task_vector, compute_task_vector


def refusal_rate(sm, prompts, **kw) -> float:
    outs = sm.generate(prompts, max_new_tokens=10, **kw)
    return sum(map(L.is_refusal, outs)) / len(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    paths = build_family(progress=True)
    sms = {m: SteeredModel.from_pretrained(paths[m]) for m in ("base", "aligned", "compromised")}
    rng = random.Random(0)
    h_train = rng.sample([r.prompt for r in L.harmful_prompts("train")], 128)
    s_train = rng.sample([r.prompt for r in L.harmless_prompts("train")], 128)
    h_test = [r.prompt for r in L.harmful_prompts("heldout")]
    s_test = [r.prompt for r in L.harmless_prompts("heldout")]
    out: dict = {}

    vec = compute_refusal(sms["aligned"], h_train, s_train, n_eval=32)
    layer = vec.recommended["layers"][0]
    d = vec.directions[layer]
    sh = collect(sms["aligned"], h_test, layers=[layer])[:, 0] @ d
    ss = collect(sms["aligned"], s_test, layers=[layer])[:, 0] @ d
    out["refusal"] = {"layer": layer, "scope": vec.recommended.get("scope"), "heldout_auc": auc(sh, ss), "rows": []}
    grid = [0.5, 1.0, 2.0, 4.0, 8.0]
    for name in ("base", "compromised"):
        sm = sms[name]
        rows = sm.generate_grid(h_train[:48], grid, vector=vec, layers=[layer], max_new_tokens=10)
        alpha = max(grid, key=lambda a: (sum(L.is_refusal(r["completion"]) for r in rows if r["alpha"] == a), -a))
        out["refusal"]["rows"].append(
            {
                "model": name,
                "op": f"add α={alpha:g} at layer {layer}",
                "before": refusal_rate(sm, h_test),
                "after": refusal_rate(sm, h_test, vector=vec, alphas=alpha, layers=[layer]),
                "harmless_after": refusal_rate(sm, s_test, vector=vec, alphas=alpha, layers=[layer]),
            }
        )
    al = sms["aligned"]
    out["refusal"]["rows"].append(
        {
            "model": "aligned",
            "op": f"ablate layer-{layer} direction at every layer",
            "before": refusal_rate(al, h_test),
            "after": refusal_rate(
                al, h_test, vector=vec, mode="ablate", scope="all", layers=list(range(al.num_layers)), alphas=1.0
            ),
            "harmless_after": refusal_rate(
                al, s_test, vector=vec, mode="ablate", scope="all", layers=list(range(al.num_layers)), alphas=1.0
            ),
        }
    )

    tau = compute_task_vector(al.model, sms["base"].model, progress=False)
    enc = al.encode(al.format(s_test[:64]), True, position_ids=True)
    with torch.no_grad():
        want = al.model(**enc).logits
        with apply_task_vector(sms["base"].model, tau, 1.0):
            got = sms["base"].model(**enc).logits
    comp = sms["compromised"]
    harm = compute_task_vector(comp.model, al.model, role="harm", progress=False)
    task_rows = []
    for label, v, a in (
        ("compromised + 1.0·τ_safety", tau, 1.0),
        ("compromised − 1.0·τ_harm", harm, -1.0),
        ("compromised − 0.5·τ_harm", harm, -0.5),
    ):
        with apply_task_vector(comp.model, v, a):
            task_rows.append(
                {"model": label, "harmful": refusal_rate(comp, h_test), "harmless": refusal_rate(comp, s_test)}
            )
    out["task"] = {"base_plus_tau_max_logit_diff": float((want - got).abs().max()), "rows": task_rows}

    try:
        from steer.vectors.sae import compute_sae_features, heldout_auc

        sae = compute_sae_features(al, layer, h_train, s_train, train=True, reduce="last", steps=800)
        aucs = heldout_auc(al, sae, h_test, s_test)
        out["sae"] = {
            "layer": layer,
            **sae.meta["sae"]["stats"],
            "best_heldout_auc": max(max(a, 1 - a) for a in aucs.values()),
        }
    except ImportError as exc:
        out["sae"] = {"skipped": str(exc)}

    r = out["refusal"]
    print(
        f"\nRefusal direction (diff-in-means, aligned, 128+128 train prompts): layer {r['layer']}, "
        f"add scope {r['scope']}, held-out AUC {r['heldout_auc']:.3f}\n"
    )
    print("| model | intervention | harmful refusal before | after | harmless refusal after |\n|---|---|---|---|---|")
    for row in r["rows"]:
        print(
            f"| {row['model']} | {row['op']} | {100 * row['before']:.1f}% | {100 * row['after']:.1f}% | "
            f"{100 * row['harmless_after']:.1f}% |"
        )
    t = out["task"]
    print(f"\nTask vector: base + 1.0·τ vs aligned, max |Δlogit| = {t['base_plus_tau_max_logit_diff']:.2e}\n")
    print("| model | harmful refusal | harmless refusal |\n|---|---|---|")
    for row in t["rows"]:
        print(f"| {row['model']} | {100 * row['harmful']:.1f}% | {100 * row['harmless']:.1f}% |")
    s = out["sae"]
    if "skipped" in s:
        print(f"\nSAE: skipped ({s['skipped']})")
    else:
        print(
            f"\nSAE (TopK, layer {s['layer']}): FVU {s['fvu']:.4f}, L0 {s['l0']:.1f}, dead {s.get('dead')}, "
            f"best held-out feature AUC {s['best_heldout_auc']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
