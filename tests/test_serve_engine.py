"""The step-level engine of steer serve without HTTP: requests that join a running batch between decode steps
(different prompt lengths, so caches are re-padded and trimmed as rows come and go) give exactly what
SteeredModel.generate gives alone, for several architectures, steering kinds, scopes and conditional gates."""

import contextlib

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer

from steer import SteeredModel, SteeringVector
from steer.config import SteeringConfig
from steer.serve.engine import Engine, Job
from steer.serve.kv import CacheLayoutError, Rows, kv_tensors
from steer.serve.protocol import Policy, Request, Sampling, SteerSpec

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13 w14 w15 w16", "w14", "w20 w21 w22", "w30 w31 w32 w33"]


def _vectors(layers, threshold=0.0):
    g = torch.Generator().manual_seed(5)
    a, b = layers
    return {
        "v": SteeringVector({a: torch.randn(D, generator=g) * 4}, {"kind": "refusal"}),
        "w": SteeringVector({b: torch.randn(D, generator=g) * 4}, {"kind": "custom"}),
        "gated": SteeringVector(
            {b: torch.randn(D, generator=g) * 4},
            {
                "kind": "refusal",
                "condition": {"layer": a, "threshold": threshold},
                "recommended": {"mode": "conditional"},
            },
            condition_direction=torch.randn(D, generator=g),
        ),
    }


def _job(sm, prompt, steer, max_tokens, scope=None):
    text = sm.format([prompt], chat=True)[0]
    req = Request(
        "chat",
        "m",
        text,
        Sampling(max_tokens, 0.0, 1.0, None, (), 1),
        tuple(SteerSpec(n, a, scope=scope) for n, a in steer),
        False,
    )
    return Job(req, prompt_ids=sm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _solo(sm, vecs, prompt, steer, max_tokens, scope=None):
    with contextlib.ExitStack() as stack:
        for name, a in steer:
            h = stack.enter_context(sm.steer(vecs[name], SteeringConfig(scope=scope)))
            h.set_alphas([a])
        return sm.generate([prompt], max_new_tokens=max_tokens)[0]


def _run_staggered(eng, arrivals):
    """``arrivals``: {step: [jobs]}; run until every job is done, admitting each group at its step (or, for a
    cache that cannot be merged, once the batch is empty, as the scheduler does). Returns whether rows ever
    joined a running batch."""
    step, finished, waiting, joined = 0, [], [], False
    total = sum(len(v) for v in arrivals.values())
    while len(finished) < total:
        waiting += arrivals.get(step, [])
        if waiting and eng.can_join:
            joined |= bool(eng.jobs)
            finished += eng.add(waiting)
            waiting = []
        finished += eng.step()
        step += 1
        assert step < 500
    return joined


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma2"])
def test_rows_joining_and_leaving_equal_solo_runs(family):
    torch.manual_seed(0)
    sm = SteeredModel(tiny_model(family), tiny_tokenizer())
    n = len(sm.layers)
    vecs = _vectors((1, n - 1))
    eng = Engine(sm, Policy(vectors=vecs))
    cases = [
        (PROMPTS[0], [("v", 2.0)], 12),
        (PROMPTS[1], [], 3),
        (PROMPTS[2], [("w", -1.5)], 9),
        (PROMPTS[3], [("v", 1.0), ("w", 1.0)], 6),
        (PROMPTS[4], [("gated", 3.0)], 10),
        (PROMPTS[5], [("gated", 3.0), ("v", -2.0)], 5),
    ]
    jobs = [_job(sm, p, s, m) for p, s, m in cases]
    joined = _run_staggered(eng, {0: jobs[:2], 2: jobs[2:4], 3: jobs[4:5], 7: jobs[5:]})
    # rows really joined a running batch, except under gemma2's sliding-window cache (batch-level there)
    assert joined == (family != "gemma2")
    for (p, s, m), j in zip(cases, jobs):
        assert j.error is None, j.error
        assert j.text == _solo(sm, vecs, p, s, m), (family, p, s)
        assert j.finish_reason in ("stop", "length") and 1 <= j.completion_tokens <= m
    assert not eng.jobs and not eng.handles
    assert_unhooked(sm.model, sm.layers)


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_scopes_hold_when_rows_join_and_caches_are_trimmed(scope):
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    vecs = _vectors((1, 2))
    eng = Engine(sm, Policy(vectors=vecs))
    cases = [(PROMPTS[2], 3), (PROMPTS[0], 10), (PROMPTS[3], 8)]  # the longest prompt leaves first: a trim
    jobs = [_job(sm, p, [("v", 3.0)], m, scope=scope) for p, m in cases]
    _run_staggered(eng, {0: jobs[:1], 1: jobs[1:2], 5: jobs[2:]})
    for (p, m), j in zip(cases, jobs):
        assert j.text == _solo(sm, vecs, p, [("v", 3.0)], m, scope=scope)


def test_gate_decided_at_each_rows_prefill_and_carried():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    eng = Engine(sm, Policy(vectors=_vectors((1, 2))))
    probe = [_job(sm, p, [("gated", 4.0)], 1) for p in PROMPTS]
    eng.add(probe)
    scores = sorted(j.gates["gated"]["score"] for j in probe)
    vecs = _vectors((1, 2), threshold=(scores[2] + scores[3]) / 2)  # half the prompts on each side
    eng = Engine(sm, Policy(vectors=vecs))
    jobs = [_job(sm, p, [("gated", 4.0)], 8) for p in PROMPTS]
    _run_staggered(eng, {i: [j] for i, j in enumerate(jobs)})
    assert sorted(j.gates["gated"]["open"] for j in jobs) == [False] * 3 + [True] * 3
    for p, j in zip(PROMPTS, jobs):
        assert j.text == _solo(sm, vecs, p, [("gated", 4.0)], 8)


def test_rows_join_pads_and_trims_the_cache_exactly():
    """Rows.join/keep against a direct construction: the merged cache holds each row's keys right-aligned,
    zeros and a 0 mask on the left; keep() cuts the columns that are padding in every row kept."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)

    def rows(b, t, real):
        kv = [(torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)) for _ in range(2)]
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, r in enumerate(real):
            mask[i, t - r :] = 1
        return Rows.from_prefill(DynamicCache(ddp_cache_data=kv), mask, torch.arange(b)), kv

    a, kva = rows(2, 3, [3, 2])
    b, kvb = rows(1, 5, [5])
    a.join(b)
    merged = kv_tensors(a.cache)
    assert a.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    for (k, v), (ka, va), (kb, vb) in zip(merged, kva, kvb):
        assert torch.equal(k[:2, :, 2:], ka) and torch.equal(k[:2, :, :2], torch.zeros(2, 2, 2, 4))
        assert torch.equal(v[2:], vb) and torch.equal(k[2:], kb)
    a.keep([1, 0])  # the long row leaves: two columns are padding everywhere now
    assert a.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and a.next_ids.tolist() == [1, 0]
    for (k, _), (ka, _) in zip(kv_tensors(a.cache), kva):
        assert torch.equal(k, ka[[1, 0]])
    assert a.pos.tolist() == [2, 3]


def test_a_cache_that_cannot_be_merged_is_refused_by_name():
    class Odd:
        layers = None

    with pytest.raises(CacheLayoutError, match="DynamicCache"):
        kv_tensors(Odd())


def test_composition_follows_the_policy_order_whoever_shares_the_batch():
    """An ablation and an addition at the same layer do not commute. A request composing them gets the policy's
    order (here: add, then ablate) even when a running request attached the ablation first."""
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    g = torch.Generator().manual_seed(9)
    v = torch.randn(D, generator=g) * 4
    vecs = {  # the ablation removes what the addition adds (same direction): order decides everything
        "add": SteeringVector({1: v}, {"kind": "custom"}),
        "abl": SteeringVector({1: v.clone()}, {"kind": "refusal", "recommended": {"mode": "ablate"}}),
    }
    both = [("add", 2.0), ("abl", 1.0)]
    in_order = _solo(sm, vecs, PROMPTS[1], both, 8)
    assert in_order != _solo(sm, vecs, PROMPTS[1], both[::-1], 8)  # the order matters for this pair
    eng = Engine(sm, Policy(vectors=vecs))
    first = _job(sm, PROMPTS[0], [("abl", 1.0)], 12)
    second = _job(sm, PROMPTS[1], [("abl", 1.0), ("add", 2.0)], 8)  # listed the other way round
    assert _run_staggered(eng, {0: [first], 2: [second]})
    assert second.text == in_order and first.text == _solo(sm, vecs, PROMPTS[0], [("abl", 1.0)], 12)
    assert_unhooked(sm.model, sm.layers)


def test_a_tiny_temperature_is_greedy_not_an_error():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    eng = Engine(sm, Policy(vectors={}))
    text = sm.format([PROMPTS[0]], chat=True)[0]
    req = Request("chat", "m", text, Sampling(6, 1e-30, 1.0, 0, (), 1), (), False)
    job = Job(req, prompt_ids=sm.tokenizer(text, add_special_tokens=False)["input_ids"])
    _run_staggered(eng, {0: [job]})
    assert job.error is None and job.text == sm.generate([PROMPTS[0]], max_new_tokens=6)[0]
