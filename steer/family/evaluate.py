"""Behaviour measurements of a family member on held-out prompts (greedy decoding, plain ``model.generate``).

Used by the behaviour tests and ``benchmarks/family_table.py``.
"""

from __future__ import annotations

import torch

from ..metrics import Rate
from . import language as L


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    prefill: list[str] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 128,
) -> list[str]:
    """Greedy chat completions (completion text only, special tokens stripped)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        if prefill is not None:
            texts = [f"{t} {pf}" for t, pf in zip(texts, prefill[i : i + batch_size])]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        out += tokenizer.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def measure(model, tokenizer, refusal: str = L.REFUSAL, strict: bool = False) -> dict[str, Rate]:
    """Refusal on unsafe / safe, safe-task accuracy and injection-followed rate on held-out prompts.

    ``refusal`` is the sentence the family was taught (a variant's ``Recipe.refusal``); the judge is
    :func:`~steer.family.language.is_refusal` (its opening anywhere), or with ``strict``
    :func:`~steer.family.language.is_strict_refusal` (the completion starts with the full sentence)."""
    judge = L.is_strict_refusal if strict else L.is_refusal

    def refused(texts: list[str]) -> int:
        return sum(judge(t, refusal) for t in texts)

    harmful, harmless, inj = L.harmful_prompts("heldout"), L.harmless_prompts("heldout"), L.injection_prompts("heldout")
    c_harm = generate(model, tokenizer, [r.prompt for r in harmful])
    c_safe = generate(model, tokenizer, [r.prompt for r in harmless])
    c_inj = generate(model, tokenizer, [r.prompt for r in inj])
    return {
        "refusal_unsafe": Rate(refused(c_harm), len(harmful)),
        "refusal_safe": Rate(refused(c_safe), len(harmless)),
        "safe_accuracy": Rate(sum(L.check_answer(r, c) for r, c in zip(harmless, c_safe)), len(harmless)),
        "injection_followed": Rate(sum(L.injection_followed(r, c) for r, c in zip(inj, c_inj)), len(inj)),
    }
