"""Conditional parameter steering: a task vector gated per request (steer.lowrank, the gate pass).

A row whose gate opens runs θ + α·τ, a row whose gate stays closed runs the weights untouched, in one batch; the
gate is the condition read on the model without the gated τ (the gate pass), so each row of a mixed batch equals
that request alone. Checked against plain references: merged weights (MergedTaskSteering) for open rows, the
unsteered model bit for bit for closed rows, and the projection of the unsteered block output for the gate."""

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer

from steer import Condition, SteeredModel, SteeringVector
from steer.errors import ConfigError
from steer.lowrank import TaskSteering
from steer.params import MergedTaskSteering
from steer.serve.engine import Engine, Job
from steer.serve.protocol import Policy, Request, Sampling, SteerSpec
from steer.vectors.task import compute_task_vector

pytestmark = pytest.mark.usefixtures("exact_and_one_thread")

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13 w14 w15 w16", "w14", "w20 w21 w22", "w30 w31 w32 w33"]
COND_LAYER = 1


@torch.no_grad()
def _scores(sm, texts, unit, reduce="last"):
    """The reference gate score: block COND_LAYER's output of the unsteered model, projected on ``unit``."""
    enc = sm.encode(texts, True, position_ids=True)
    seen = []
    hook = sm.layers[COND_LAYER].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        sm.model(**enc)
    finally:
        hook.remove()
    h = seen[0].float()
    if reduce == "last":
        return h[:, -1] @ unit
    m = enc["attention_mask"].float()[..., None]
    return ((h * m).sum(1) / m.sum(1)) @ unit


def _gated(sm, rank, reduce="last"):
    """A task vector of ``sm``'s architecture with a condition that opens for half of PROMPTS."""
    arch = sm.model.config.model_type
    vec = compute_task_vector(tiny_model(arch, seed=1), tiny_model(arch, seed=2), rank=rank, progress=False)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    s = _scores(sm, sm.format(PROMPTS), unit, reduce).sort().values
    vec.meta["condition"] = {"layer": COND_LAYER, "threshold": float(s[2] + s[3]) / 2, "reduce": reduce}
    vec.meta["recommended"] = {"mode": "conditional", "alpha": 1.0}
    vec.condition_direction = direction
    return vec, unit


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def sm(request):
    return SteeredModel(tiny_model(request.param, seed=2), tiny_tokenizer())


@torch.no_grad()
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("reduce", ["last", "mean"])
def test_open_rows_get_theta_plus_alpha_tau_closed_rows_the_weights_untouched(sm, rank, reduce):
    vec, unit = _gated(sm, rank, reduce)
    texts = sm.format(PROMPTS)
    enc = sm.encode(texts, True, position_ids=True)
    want_scores = _scores(sm, texts, unit, reduce)
    want_gate = want_scores > vec.condition["threshold"]
    assert 0 < int(want_gate.sum()) < len(PROMPTS)
    alphas = [1.0, -0.5, 2.0, 1.0, 0.7, -1.0]
    base = sm.model(**enc).logits
    ref = []
    for i, a in enumerate(alphas):
        with MergedTaskSteering(sm.model, vec, a):
            ref.append(sm.model(**{k: v[i : i + 1] for k, v in enc.items()}).logits)
    ref = torch.cat(ref)
    with sm.steer(vec) as h:
        assert isinstance(h, TaskSteering) and h.mode == "conditional"
        h.set_alphas(alphas)
        h.begin(enc["input_ids"].shape[1])
        got = sm.model(**enc).logits
        assert torch.equal(h.last_gate, want_gate)
        assert torch.allclose(h.last_scores, want_scores, atol=1e-6)
    for i, g in enumerate(want_gate.tolist()):
        if g:
            assert (got[i] - ref[i]).abs().max() <= 1e-4, i
        else:
            assert torch.equal(got[i], base[i]), i
    assert_unhooked(sm.model, sm.layers)


@torch.no_grad()
def test_mixed_gate_batch_equals_each_request_alone(sm):
    vec, _ = _gated(sm, 4)
    alphas = [2.0, 2.0, -1.0, 2.0, 3.0, 1.0]
    mixed = sm.generate(PROMPTS, vector=vec, alphas=alphas, max_new_tokens=8)
    alone = [sm.generate([p], vector=vec, alphas=[a], max_new_tokens=8)[0] for p, a in zip(PROMPTS, alphas)]
    assert mixed == alone
    # closed rows are the unsteered model, open rows are θ + α·τ merged
    with sm.steer(vec) as h:
        h.set_alphas(alphas)
        sm.generate(PROMPTS, max_new_tokens=1)
        gates = h.last_gate.tolist()
    for p, a, g, m in zip(PROMPTS, alphas, gates, mixed):
        ref = sm.generate([p], vector=vec, alphas=[a], mode="merged", max_new_tokens=8)[0] if g else None
        assert m == (ref if g else sm.generate([p], max_new_tokens=8)[0])


@torch.no_grad()
def test_gate_pass_ignores_gated_tau_and_both_gates_compose(sm):
    """Two gated task vectors: each gate reads the model with every gated τ closed, whatever the attach order."""
    vec, unit = _gated(sm, 3)
    other = vec * -1.0  # same condition, opposite τ
    texts = sm.format(PROMPTS)
    enc = sm.encode(texts, True, position_ids=True)
    want = _scores(sm, texts, unit) > vec.condition["threshold"]
    for order in ((vec, other), (other, vec)):
        with sm.steer(order[0]) as a, sm.steer(order[1]) as b:
            for h in (a, b):
                h.set_alphas([5.0] * len(PROMPTS))
                h.begin(enc["input_ids"].shape[1])
            out = sm.model(**enc).logits
            assert torch.equal(a.last_gate, want) and torch.equal(b.last_gate, want)
        base = sm.model(**enc).logits
        assert (out - base).abs().max() <= 1e-4  # +5τ and −5τ cancel on the open rows too


@torch.no_grad()
def test_set_gates_and_row_changes(sm):
    vec, _ = _gated(sm, 3)
    enc = sm.encode(sm.format(PROMPTS[:2]), True, position_ids=True)
    base = sm.model(**enc).logits
    with sm.steer(vec) as h:
        h.set_alphas([1.0, 1.0])
        h.set_gates([False, True])
        h.begin(0)  # past the prompt: no gate pass, the carried gates hold
        got = sm.model(**enc).logits
        assert torch.equal(got[0], base[0]) and not torch.equal(got[1], base[1])
        with pytest.raises(ConfigError, match="one gate per row"):
            h.set_gates([True])
    with sm.steer(vec, mode="per_request") as h:
        with pytest.raises(ConfigError, match="conditional"):
            h.set_gates([True, False])


@torch.no_grad()
def test_batches_of_other_sizes_and_hidden_state_outputs(sm):
    """The set α survive a batch of another size; a gate pass asked for hidden states leaves nothing behind."""
    sm = SteeredModel(tiny_model(sm.model.config.model_type, seed=2), tiny_tokenizer())  # transformers hooks stay
    vec, _ = _gated(sm, 3)
    enc4 = sm.encode(sm.format(PROMPTS[:4]), True, position_ids=True)
    enc2 = sm.encode(sm.format(PROMPTS[4:]), True, position_ids=True)
    with sm.steer(vec) as h:
        h.set_alphas(2.0)
        a = sm.model(**enc4).logits
        b = sm.model(**enc2, output_hidden_states=True).logits
    with sm.steer(vec) as h:
        h.set_alphas(2.0)
        assert torch.equal(sm.model(**enc2).logits, b) and torch.equal(sm.model(**enc4).logits, a)
    # nothing of ours left, and no forward replaced that the same calls leave replaced without steering
    # (transformers 4.57 leaves its own capture wrappers on the blocks; a gate pass must not add more)
    twin = tiny_model(sm.model.config.model_type, seed=2)
    twin(**enc4), twin(**enc2, output_hidden_states=True)
    replaced = lambda m: {n: _depth(x) for n, x in m.named_modules() if "forward" in x.__dict__}  # noqa: E731
    ours, plain = replaced(sm.model), replaced(twin)
    assert not sm.model._forward_pre_hooks and all(d <= plain.get(n, 0) for n, d in ours.items()), (ours, plain)


def _depth(module) -> int:
    """How many wrappers deep a module's replaced forward is (following ``__wrapped__`` and closures)."""
    f, n = module.__dict__.get("forward"), 0
    while f is not None and n < 64:
        n += 1
        cells = [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if callable(c.cell_contents)]
        f = getattr(f, "__wrapped__", None) or next((c for c in cells if c is not f), None)
    return n


def test_bad_gated_task_configs_are_refused_before_attaching(sm):
    vec, _ = _gated(sm, 3)
    cond = Condition(layer=COND_LAYER, direction=torch.ones(D), threshold=0.0)
    with pytest.raises(ConfigError, match="merged"):
        sm.steer(vec, mode="merged", condition=cond)
    with pytest.raises(ConfigError, match="width"):
        sm.steer(vec, condition=Condition(layer=0, direction=torch.ones(D + 1), threshold=0.0))
    with pytest.raises(Exception, match="layer"):
        sm.steer(vec, condition=Condition(layer=len(sm.layers), direction=torch.ones(D), threshold=0.0))
    ungated = SteeringVector(vec.directions, {k: v for k, v in vec.meta.items() if k != "condition"}, None, vec.extra)
    with pytest.raises(ConfigError, match="condition"):
        sm.steer(ungated, mode="conditional")
    assert_unhooked(sm.model, sm.layers)


def _job(sm, prompt, alpha, max_tokens):
    text = sm.format([prompt])[0]
    req = Request("chat", "m", text, Sampling(max_tokens, 0.0, 1.0, None, (), 1), (SteerSpec("t", alpha),), False)
    return Job(req, prompt_ids=sm.tokenizer(text, add_special_tokens=False)["input_ids"])


def serve_matches_generate(sm, vec, alpha):
    """Serve PROMPTS through `steer serve`'s engine, rows joining between decode steps: each row equals
    SteeredModel.generate alone, the gates differ across rows, and nothing stays attached."""
    eng = Engine(sm, Policy(vectors={"t": vec}))
    jobs = [_job(sm, p, alpha, 3 + 2 * i) for i, p in enumerate(PROMPTS)]
    step, finished, pending = 0, [], list(jobs)
    while len(finished) < len(jobs):
        if pending and eng.can_join:
            finished += eng.add([pending.pop(0)])
        finished += eng.step()
        step += 1
        assert step < 200
    opened = []
    for p, j in zip(PROMPTS, jobs):
        assert j.error is None, j.error
        assert j.text == sm.generate([p], vector=vec, alphas=[alpha], max_new_tokens=j.request.sampling.max_tokens)[0]
        opened.append(j.gates["t"]["open"])
    assert 0 < sum(opened) < len(jobs)
    assert not eng.handles
    assert_unhooked(sm.model, sm.layers)


@torch.no_grad()
def test_serve_engine_gates_task_vectors_per_row_across_joins(sm):
    serve_matches_generate(sm, _gated(sm, 3)[0], 2.0)
