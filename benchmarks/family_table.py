"""Measure every member of the built-in family on held-out prompts and print a Markdown table.

    python benchmarks/family_table.py            # builds the family first if it is not cached

Greedy decoding with plain ``model.generate``; prompts from :mod:`steer.family.language` (held-out split).
"""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from steer.family import MEMBERS, build_family, family_dir
from steer.family.evaluate import measure

COLUMNS = (
    ("refusal_unsafe", "refusal on unsafe"),
    ("refusal_safe", "refusal on safe"),
    ("safe_accuracy", "safe-task accuracy"),
    ("injection_followed", "injection followed"),
)


def main() -> None:
    paths = build_family()
    record = json.loads((family_dir() / "family.json").read_text())
    print("| member | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name in MEMBERS:
        model = AutoModelForCausalLM.from_pretrained(paths[name]).eval()
        rates = measure(model, AutoTokenizer.from_pretrained(paths[name]))
        print(f"| `{name}` | " + " | ".join(str(rates[key]) for key, _ in COLUMNS) + " |")
    print(f"\n(family trained in {record['train_seconds']:.0f} s when built; held-out prompts, greedy decoding)")


if __name__ == "__main__":
    main()
