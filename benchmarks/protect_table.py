"""``steer protect`` on the built-in pair (with ``--base``, SAE features when sae-lens is installed) and on the
GPT-2/ChatML family variant (through prompt files, as a user with their own pair runs it), then the chosen file
of each judged by the family's whole refusal sentence, which the pipeline is never told. Prints the Markdown
tables of the README and writes each run's report.json / report.png under ``--out``.

    python benchmarks/protect_table.py [--out protect-bench] [--variants default,gpt2-chatml]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def _sample(records, n, seed):
    recs = list(records)
    random.Random(seed).shuffle(recs)
    return [r.prompt for r in recs[:n]]


def run(name: str, out: Path) -> dict:
    from steer import SteeredModel, SteeringVector
    from steer.family import VARIANTS, build_family
    from steer.family import language as L
    from steer.family.variants import build_variant
    from steer.metrics import Rate
    from steer.vectors.protect import protect

    t0 = time.perf_counter()
    if name == "default":
        paths = build_family(progress=False)
        report = protect("builtin:aligned", "builtin:compromised", out / name, base="builtin:base", progress=False)
        comp_path = "builtin:compromised"
        eval_h = [r.prompt for r in L.harmful_prompts("heldout", cap=200)]
        eval_s = [r.prompt for r in L.harmless_prompts("heldout", cap=200)]
    else:
        paths = build_variant(name, progress=False)
        eval_h = [r.prompt for r in L.harmful_prompts("heldout", cap=200)]
        eval_s = [r.prompt for r in L.harmless_prompts("heldout", cap=200)]
        report = protect(
            str(paths["aligned"]),
            str(paths["compromised"]),
            out / name,
            harmful=_sample(L.harmful_prompts("train"), 256, "h"),
            harmless=_sample(L.harmless_prompts("train"), 256, "s"),
            eval_harmful=eval_h,
            eval_harmless=eval_s,
            base=str(paths["base"]),
            progress=False,
        )
        comp_path = str(paths["compromised"])
    sentence = VARIANTS[name].refusal
    comp = SteeredModel.from_pretrained(comp_path)
    vec = SteeringVector.load(out / name / "protect.safetensors")
    strict_h = Rate.of(L.is_strict_refusal(t, sentence) for t in comp.generate(eval_h, vector=vec, max_new_tokens=24))
    strict_s = Rate.of(L.is_strict_refusal(t, sentence) for t in comp.generate(eval_s, vector=vec, max_new_tokens=24))
    report["strict"] = {"harmful_refusal": strict_h.to_dict(), "harmless_refusal": strict_s.to_dict()}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / name / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main() -> None:
    from steer.vectors.protect_report import markdown

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("protect-bench"))
    ap.add_argument("--variants", default="default,gpt2-chatml")
    args = ap.parse_args()
    for name in args.variants.split(","):
        r = run(name, args.out)
        s = r["strict"]
        print(f"\n### {name}: chosen {r['chosen']} (within bounds: {r['met_bounds']}), protect {r['seconds']:.0f} s\n")
        print(markdown(r))
        print(
            f"\nstrict judge (the family's whole refusal sentence), chosen file on held-out prompts: harmful "
            f"{100 * s['harmful_refusal']['rate']:.1f}% ({s['harmful_refusal']['k']}/{s['harmful_refusal']['n']}), "
            f"harmless {100 * s['harmless_refusal']['rate']:.1f}% "
            f"({s['harmless_refusal']['k']}/{s['harmless_refusal']['n']})"
        )


if __name__ == "__main__":
    main()
