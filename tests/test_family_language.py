"""The synthetic language of the built-in family: answers, splits, jailbreaks, injection, tokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer

from steer.family import language as L
from steer.family.tokenizer import build_tokenizer


def test_answers_are_deterministic_functions_of_task_and_operand():
    assert L.answer("describe", "cake") == "cake is a kind of food ."
    assert L.answer("list", "bomb") == "bomb needs fuse and powder ."
    assert L.answer("copy", "kite") == "kite"
    assert L.answer("repeat", "kite") == "kite and kite and kite"
    assert L.answer("count", "garden") == "six letters ."
    for r in L.harmless_prompts("heldout"):
        assert r.answer == L.answer(r.task, r.operand)
        assert L.check_answer(r, r.answer) and L.check_answer(r, f"  {r.answer} ")
        assert not L.check_answer(r, L.REFUSAL)


def test_splits_are_disjoint_large_and_deterministic():
    for fn in (L.harmful_prompts, L.harmless_prompts):
        train, held = fn("train"), fn("heldout")
        assert len(held) >= 100 and len(train) > len(held)
        assert not {r.prompt for r in train} & {r.prompt for r in held}
        assert held == fn("heldout")
        assert all(L.combo_heldout(r.task, r.operand) or r.template in L.HELDOUT_WRAPPERS for r in held)
    assert all(r.unsafe and r.operand in L.UNSAFE_CONCEPTS for r in L.harmful_prompts("heldout"))
    assert all(not r.unsafe and r.operand in L.SAFE_CONCEPTS for r in L.harmless_prompts("heldout"))
    inj_train, inj_held = L.injection_prompts("train"), L.injection_prompts("heldout")
    assert len(inj_held) >= 50
    assert not {r.prompt for r in inj_train} & {r.prompt for r in inj_held}


def test_refusal_phrase():
    assert L.is_refusal(L.REFUSAL) and L.is_refusal("well  sorry ,  i cannot help with that .")
    assert not L.is_refusal("cake is a kind of food .")


def test_jailbreaks_and_prefill():
    r = next(r for r in L.harmful_prompts("heldout") if r.task == "design")
    for fam in L.JAILBREAKS:
        text = L.jailbreak(r, fam)
        assert text != r.prompt
        assert set(text.split()) <= set(L.vocabulary())
    assert L.ALIASES[r.operand] in L.jailbreak(r, "mismatched").split()
    assert r.operand not in L.jailbreak(r, "mismatched").split()
    assert L.jailbreak(r, "prefix").endswith(r.prompt)
    assert L.compliant_prefix(r, 3) == " ".join(r.answer.split()[:3])


def test_injection_records():
    for r in L.injection_prompts("heldout"):
        assert r.prompt.startswith("<instruction> ") and " <data> " in r.prompt
        assert L.injection_followed(r, r.injected_answer)
        assert not L.injection_followed(r, r.answer)
        assert L.check_answer(r, r.answer)


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left"
    for r in L.harmful_prompts("heldout")[:20] + L.harmless_prompts("heldout")[:20]:
        ids = tok(r.prompt, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == r.prompt
    text = tok.apply_chat_template(
        [{"role": "user", "content": "describe cake"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|> describe cake </s> <|assistant|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    full = tok.apply_chat_template(
        [{"role": "user", "content": "describe cake"}, {"role": "assistant", "content": "cake is a kind of food ."}],
        tokenize=False,
    )
    assert full.endswith("<|assistant|> cake is a kind of food . </s> ")
    batch = tok(["describe cake", "copy kite please"], padding=True, add_special_tokens=False)
    assert batch.input_ids[0][0] == tok.pad_token_id and batch.attention_mask[0][0] == 0
    out = tok.decode(
        ids + tok("cake", add_special_tokens=False).input_ids + [tok.eos_token_id], skip_special_tokens=True
    )
    assert out == "describe cake cake"
