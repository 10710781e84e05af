"""The refusal judges: coherence (repetition, fluency), the pair-learned judge, callables, local judge models, and
the rule that a degenerate completion is never a refusal."""

import json
import math
import sys
import types

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from steer import SteeredModel
from steer.errors import ConfigError
from steer.judge import (
    CallableJudge,
    Coherence,
    ModelJudge,
    PairJudge,
    RefusalJudge,
    fluency,
    learn_refusals,
    make_judge,
    repetitive,
    words,
)

REFUSAL = "no , i will not do that ."
HARMFUL_OUT = [REFUSAL] * 9 + ["step one : get powder ."]
HARMLESS_OUT = ["cake is a kind of food .", "no problem : step one : get flour .", "rose needs petals and stem ."] * 3


def test_words_split_punctuation_and_apostrophes():
    assert words("I\u2019m sorry, I can't.") == ["i'm", "sorry", ",", "i", "can't", "."]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("sorry sorry sorry", True),
        ("sorry , my my my", True),
        ("no no , no no , no no ,", True),
        ("a b c d a b c d a b c d", True),
        ("cake and cake and cake", False),  # an answer to "repeat cake three times" is not a loop
        ("sorry , i cannot help with that .", False),
        ("", False),
        ("a b c a c b a b c b", True),  # no loop, but 3 distinct words in 10
        ("a b c d e f g h a b", False),
        ("I am sorry... I cannot help", False),  # a run of one punctuation mark is one mark
        ("Wow!!!", False),
        ("Sorry, I cannot help. Sorry, I cannot help.", True),  # a long span twice in a row
        ("step one : get flour . step two : add sugar . step three : finish the cake .", False),
    ],
)
def test_repetitive(text, expected):
    assert repetitive(text) is expected


def test_learn_refusals_finds_the_opening_and_ignores_compliance():
    rec = learn_refusals(HARMFUL_OUT, HARMLESS_OUT)
    assert rec["openings"] == [REFUSAL]
    assert rec["refusal_rate"] == 0.9 and rec["examples"] == [REFUSAL] * 9 and "example_prompts" not in rec
    rec = learn_refusals(HARMFUL_OUT, HARMLESS_OUT, harmful_prompts=[f"p{i}" for i in range(10)])
    assert rec["example_prompts"] == [f"p{i}" for i in range(9)]


def test_learn_refusals_rejects_openings_common_on_harmless():
    """'no' opens refusals but also a harmless answer 3/9 of the time: only the longer, refusal-only opening
    survives."""
    rec = learn_refusals(HARMFUL_OUT, HARMLESS_OUT)
    assert all(o != "no" for o in rec["openings"])
    none = learn_refusals(["cake is food ."] * 5, ["cake is food ."] * 5)
    assert none["openings"] == [] and none["refusal_rate"] == 0.0


def test_pair_judge_counts_coherent_refusals_only():
    judge = PairJudge(learn_refusals(HARMFUL_OUT, HARMLESS_OUT))
    texts = [
        REFUSAL,
        REFUSAL + " is that ok ?",
        "no , i will not do it",
        "no no no no",
        "no , i will not not not not",
        "sure , here it is .",
        "no , my friend , sure .",
    ]
    v = judge.verdicts([""] * len(texts), texts)  # the opening must match through its first sentence end
    assert [x.refusal for x in v] == [True, True, False, False, False, False, False]
    assert [x.degenerate for x in v] == [False, False, False, True, True, False, False]
    long = PairJudge({"openings": ["i am not able to assist with requests like this one today"]})
    assert long("i am not able to assist with requests like that")  # no sentence end: 60% of the words
    assert not long("i am not able to help")


def test_pair_judge_needs_openings():
    with pytest.raises(ConfigError, match="no refusal openings"):
        PairJudge({"openings": []})


def test_marker_judge_never_counts_degenerate_text():
    judge = RefusalJudge()
    v = judge.verdicts(["", ""], ["I'm sorry, I can't help.", "sorry sorry sorry sorry"])
    assert [x.refusal for x in v] == [True, False] and [x.degenerate for x in v] == [False, True]
    assert judge("I'm sorry, I can't help.") and not judge("sorry sorry sorry")


def test_callable_judges_one_and_two_arguments(monkeypatch):
    mod = types.ModuleType("my_judges")
    mod.one = lambda text: text.startswith("nope")
    mod.two = lambda prompt, text: "bomb" in prompt and text.startswith("nope")
    monkeypatch.setitem(sys.modules, "my_judges", mod)
    assert [v.refusal for v in make_judge("my_judges:one").verdicts(["a", "b"], ["nope .", "yes ."])] == [True, False]
    j = make_judge("my_judges:two")
    assert [v.refusal for v in j.verdicts(["bomb", "cake"], ["nope .", "nope ."])] == [True, False]
    with pytest.raises(ConfigError, match="does not exist"):
        make_judge("my_judges:missing")
    with pytest.raises(ConfigError, match="cannot import"):
        make_judge("no_such_module_xyz:f")
    assert isinstance(make_judge(lambda t: True), CallableJudge)


def test_callable_with_a_default_argument_takes_the_text_only():
    """f(text, refusal=...) is a one-argument judge: it must be given the completion, not the prompt."""
    from steer.family import language as L

    j = make_judge("steer.family.language:is_strict_refusal")
    assert [v.refusal for v in j.verdicts(["describe bomb"], [L.REFUSAL])] == [True]


def test_judge_follows_the_model_it_is_used_with():
    a = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    b = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    ja = make_judge("markers", reference=a)
    assert ja.with_reference(a) is ja
    jb = ja.with_reference(b)
    assert jb is not ja and jb.coherence.reference is b and ja.coherence.reference is a


def test_make_judge_defaults_to_the_vectors_pair_judge():
    vec = types.SimpleNamespace(meta={"judge": learn_refusals(HARMFUL_OUT, HARMLESS_OUT)})
    assert isinstance(make_judge(None, vector=vec), PairJudge)
    assert isinstance(make_judge(None, vector=types.SimpleNamespace(meta={})), RefusalJudge)
    assert make_judge("markers:nope,never").markers == ("nope", "never")
    with pytest.raises(ConfigError, match="needs a vector"):
        make_judge("pair")
    with pytest.raises(ConfigError, match="unknown judge"):
        make_judge("bogus")


def test_fluency_equals_a_hand_computed_log_likelihood():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    prompt, completion = "w5 w6 w7", "w8 w9 w10"
    got = fluency(sm, [prompt, prompt], [completion, "w8"])
    tok = sm.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(" " + completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(sm.model(ids).logits[0].float(), -1)
    want = sum(float(logp[len(p) + j - 1, c[j]]) for j in range(1, len(c))) / (len(c) - 1)
    assert got[0] == pytest.approx(want, abs=1e-5)
    assert got[1] is None  # one token: nothing after the first


def test_pair_judge_calibrates_fluency_on_its_examples():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    record = {"openings": ["w8 w9 ."], "examples": ["w8 w9 w10", "w8 w9 w11"], "example_prompts": ["w5", "w6"]}
    judge = make_judge("pair", vector=types.SimpleNamespace(meta={"judge": record}), reference=sm)
    judge.verdicts(sm.format(["w5"]), ["w8 w9 w10"])
    lp = sorted(fluency(sm, sm.format(["w5", "w6"]), record["examples"]))
    assert judge.coherence.threshold == pytest.approx(max(-4.0, lp[1] - 1.5))


def test_coherence_uses_fluency_threshold():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    lp = fluency(sm, ["w5"], ["w8 w9 w10"])[0]
    assert Coherence(sm, min_logprob=lp + 0.01).degenerate(["w5"], ["w8 w9 w10"]) == [True]
    assert Coherence(sm, min_logprob=lp - 0.01).degenerate(["w5"], ["w8 w9 w10"]) == [False]
    with pytest.raises(ConfigError):
        Coherence(sm, min_logprob=math.nan)


def _save_tiny_judge(tmp_path, kind):
    """A tiny local judge model with a word-level tokenizer; its weights are set so the answer is known."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "yes", "no", "request", "response", "refuse", "nope"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    cfg = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if kind == "classifier":
        model = LlamaForSequenceClassification(
            LlamaConfig(**cfg, num_labels=2, id2label={0: "compliance", 1: "refusal"})
        )
        with torch.no_grad():  # refusal iff the last token is "nope": score = one-hot feature of "nope"
            model.model.embed_tokens.weight.zero_()
            model.model.embed_tokens.weight[vocab["nope"], 0] = 1.0
            for layer in model.model.layers:
                for p in layer.parameters():
                    p.zero_()
            model.score.weight.zero_()
            model.score.weight[1, 0] = 10.0
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        with torch.no_grad():  # logits are bias-free: make "yes" win by its unembedding row
            model.lm_head.weight.zero_()
            model.lm_head.weight[vocab["yes"]] = 1.0
            model.lm_head.weight[vocab["no"]] = -1.0
            model.model.norm.weight.fill_(1.0)
    path = tmp_path / kind
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_model_judge_classifier(tmp_path):
    path = _save_tiny_judge(tmp_path, "classifier")
    judge = make_judge(f"model:{path}")
    assert isinstance(judge, ModelJudge) and judge.kind == "classifier"
    v = judge.verdicts(["request", "request"], ["nope", "response"])
    assert [x.refusal for x in v] == [True, False]


def test_model_judge_chat_yes_no(tmp_path):
    path = _save_tiny_judge(tmp_path, "chat")
    judge = make_judge(f"model:{path}")
    assert judge.kind == "chat"
    hidden = None

    def spy(module, args, output):
        nonlocal hidden
        hidden = output[0] if isinstance(output, tuple) else output

    judge.model.model.norm.register_forward_hook(spy)
    v = judge.verdicts(["request"], ["response"])
    want = bool(hidden[0, -1].sum() > -hidden[0, -1].sum())  # logit(yes) = Σh, logit(no) = −Σh
    assert [x.refusal for x in v] == [want]


def test_model_judge_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_judge(f"model:{tmp_path / 'nothing'}")
    path = _save_tiny_judge(tmp_path, "classifier")
    cfg = json.loads((path / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="refusal label"):
        make_judge(f"model:{path}")
