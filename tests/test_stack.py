"""Stacks (steer.stack): a task vector and directions in one file, one α and one gate per request.

Checked against plain references: an ungated stack equals its members attached one by one (bit for bit) and
merged θ + α·w_τ·τ plus a hand-written hook adding α·w_r·v at the member's layer (1e-4); in a gated stack, open
rows equal the ungated stack, closed rows equal the unsteered model bit for bit, and the gate equals the
projection of the unsteered block output; mixed-gate generation equals each request alone."""

import pytest
import torch
from capture import assert_unhooked
from test_task_gate import COND_LAYER, PROMPTS, _gated, _scores, serve_matches_generate
from tiny_models import D, tiny_model, tiny_tokenizer

from steer import SteeredModel, SteeringVector
from steer.errors import ConfigError, VectorFileError
from steer.params import MergedTaskSteering
from steer.stack import StackSteering, make_stack, members_of

pytestmark = pytest.mark.usefixtures("exact_and_one_thread")

W_TAU, W_DIR, DIR_LAYER = -0.75, 2.5, 2


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def sm(request):
    return SteeredModel(tiny_model(request.param, seed=2), tiny_tokenizer())


def _parts(sm, scope="prompt"):
    tau, unit = _gated(sm, 3)
    cond, cdir = tau.condition, tau.condition_direction
    tau.meta["recommended"] = {"mode": "per_request", "alpha": W_TAU}
    v = torch.randn(D, generator=torch.Generator().manual_seed(7))
    direction = SteeringVector({DIR_LAYER: v}, {"kind": "refusal"})
    direction.meta["recommended"] = {"alpha": W_DIR, "layers": [DIR_LAYER], "mode": "add", "scope": scope}
    return tau, direction, cond, cdir, unit


def _stack(sm, gated=True, scope="prompt"):
    tau, direction, cond, cdir, unit = _parts(sm, scope)
    st = make_stack([tau, direction], condition=cond if gated else None, condition_direction=cdir if gated else None)
    return st, tau, direction, unit


def test_file_round_trip_keeps_every_member(tmp_path, sm):
    st, tau, direction, _ = _stack(sm)
    back = SteeringVector.load(st.save(tmp_path / "s.safetensors"))
    assert back.kind == "stack" and back.condition["layer"] == COND_LAYER
    assert torch.equal(back.condition_direction, st.condition_direction)
    got = members_of(back)
    assert [m.kind for m in got] == ["task", "refusal"]
    assert got[1].recommended == direction.recommended and torch.equal(
        got[1].directions[DIR_LAYER], direction.directions[DIR_LAYER]
    )
    assert got[0].extra.keys() == tau.extra.keys() and all(
        torch.equal(got[0].extra[k], tau.extra[k]) for k in tau.extra
    )
    with pytest.raises(VectorFileError, match="not scaled"):
        back * 2.0


@torch.no_grad()
def test_ungated_stack_equals_members_one_by_one_and_the_plain_reference(sm):
    st, tau, direction, _ = _stack(sm, gated=False, scope="all")
    enc = sm.encode(sm.format(PROMPTS), True, position_ids=True)
    alphas = [1.0, 0.0, -0.5, 2.0, 1.0, 0.3]
    with sm.steer(st) as h:
        assert isinstance(h, StackSteering)
        h.set_alphas(alphas)
        got = sm.model(**enc).logits
    a = torch.tensor(alphas)
    with sm.steer(tau, mode="per_request") as ht, sm.steer(direction) as hd:
        ht.set_alphas(a * W_TAU)
        hd.set_alphas(a * W_DIR)
        assert torch.equal(sm.model(**enc).logits, got)
    base = sm.model(**enc).logits
    assert torch.equal(got[1], base[1])  # α = 0: unsteered, bit for bit
    v = direction.directions[DIR_LAYER]
    for i, x in enumerate(alphas):
        row = {k: t[i : i + 1] for k, t in enc.items()}

        def add(m, args, out, x=x):  # the plain reference: h + α·w·v at the member's layer
            return (out[0] + x * W_DIR * v, *out[1:]) if isinstance(out, tuple) else out + x * W_DIR * v

        hook = sm.layers[DIR_LAYER].register_forward_hook(add)
        try:
            with MergedTaskSteering(sm.model, tau, x * W_TAU):
                ref = sm.model(**row).logits
        finally:
            hook.remove()
        assert (got[i] - ref[0]).abs().max() <= 1e-4, i
    assert_unhooked(sm.model, sm.layers)


@torch.no_grad()
def test_gated_stack_open_rows_steered_closed_rows_untouched(sm):
    st, _, _, unit = _stack(sm, scope="all")
    ungated = make_stack(members_of(st))
    texts = sm.format(PROMPTS)
    enc = sm.encode(texts, True, position_ids=True)
    want = _scores(sm, texts, unit) > st.condition["threshold"]
    assert 0 < int(want.sum()) < len(PROMPTS)
    alphas = [1.0, 2.0, 1.0, 0.5, 1.0, 1.5]
    base = sm.model(**enc).logits
    with sm.steer(ungated) as h:
        h.set_alphas(alphas)
        steered = sm.model(**enc).logits
    with sm.steer(st) as h:
        assert h.mode == "conditional"
        h.set_alphas(alphas)
        h.begin(enc["input_ids"].shape[1])
        got = sm.model(**enc).logits
        gate, scores = h.last_gate, h.last_scores
    assert torch.equal(gate, want)
    assert torch.allclose(scores, _scores(sm, texts, unit), atol=1e-6)
    for i, g in enumerate(want.tolist()):
        assert torch.equal(got[i], steered[i] if g else base[i]), i
    assert_unhooked(sm.model, sm.layers)


@torch.no_grad()
def test_mixed_gate_generation_equals_each_request_alone(sm):
    st, *_ = _stack(sm)
    alphas = [1.0, 1.0, 2.0, 1.0, 0.5, 1.0]
    mixed = sm.generate(PROMPTS, vector=st, alphas=alphas, max_new_tokens=8)
    alone = [sm.generate([p], vector=st, alphas=[a], max_new_tokens=8)[0] for p, a in zip(PROMPTS, alphas)]
    assert mixed == alone
    with sm.steer(st) as h:
        h.set_alphas(alphas)
        sm.generate(PROMPTS, max_new_tokens=1)
        gates = h.last_gate.tolist()
    plain = sm.generate(PROMPTS, max_new_tokens=8)
    assert all(m == p for m, p, g in zip(mixed, plain, gates) if not g)
    assert any(m != p for m, p, g in zip(mixed, plain, gates) if g)


@torch.no_grad()
def test_set_gates_carries_decisions(sm):
    st, *_ = _stack(sm, scope="all")
    enc = sm.encode(sm.format(PROMPTS[:2]), True, position_ids=True)
    base = sm.model(**enc).logits
    with sm.steer(make_stack(members_of(st))) as h:  # ungated: every member on every row
        h.set_alphas([1.0, 1.0])
        both = sm.model(**enc).logits
    with sm.steer(st) as h:
        h.set_alphas([1.0, 1.0])
        h.set_gates([False, True])
        h.begin(0)
        got = sm.model(**enc).logits
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], both[1])  # the direction follows the gate too
        with pytest.raises(ConfigError, match="one gate per row"):
            h.set_gates([True])


@torch.no_grad()
def test_batches_of_other_sizes_after_one_set_alphas(sm):
    """One α for every row, then prefills of 2, 3 and 1 rows: each batch equals a fresh handle on it."""
    st, *_ = _stack(sm, scope="all")
    batches = [PROMPTS[:2], PROMPTS[2:5], PROMPTS[5:]]
    encs = [sm.encode(sm.format(b), True, position_ids=True) for b in batches]
    with sm.steer(st) as h:
        h.set_alphas(1.5)
        got = [sm.model(**e).logits for e in encs]
    for e, g in zip(encs, got):
        with sm.steer(st) as h:
            h.set_alphas(1.5)
            assert torch.equal(sm.model(**e).logits, g)


def test_bad_stacks_are_refused_before_attaching(sm):
    tau, direction, cond, cdir, _ = _parts(sm)
    with pytest.raises(ConfigError, match="exactly one task"):
        sm.steer(make_stack([direction, direction], condition=cond, condition_direction=cdir))
    with pytest.raises(ConfigError, match="exactly one task"):
        sm.steer(make_stack([tau, tau, direction], condition=cond, condition_direction=cdir))
    early = SteeringVector({0: direction.directions[DIR_LAYER]}, {"kind": "refusal"})
    early.meta["recommended"] = {"alpha": 1.0, "layers": [0], "mode": "add"}
    with pytest.raises(ConfigError, match="before the gate"):
        sm.steer(make_stack([tau, early], condition=cond, condition_direction=cdir))
    st = make_stack([tau, direction], condition=cond, condition_direction=cdir)
    with pytest.raises(ConfigError, match="each member"):
        sm.steer(st, layers=[1])
    with pytest.raises(ConfigError, match="at least two"):
        make_stack([tau])
    gated_member = SteeringVector(direction.directions, {**direction.meta, "condition": cond}, cdir)
    gated_member.meta["recommended"] = {**direction.recommended, "mode": "conditional"}
    with pytest.raises(ConfigError, match="gated on its own"):
        make_stack([tau, gated_member], condition=cond, condition_direction=cdir)
    from steer import Condition

    h = sm.steer(make_stack([tau, direction]), mode="per_request", condition=Condition(COND_LAYER, cdir, 0.0))
    assert h.mode == "conditional" and h.condition is not None  # a condition given: the stack is gated
    h.remove()
    wide = SteeringVector({DIR_LAYER: torch.ones(D + 1)}, {"kind": "refusal"})
    with pytest.raises(Exception, match="hidden size"):
        sm.steer(make_stack([tau, wide]))
    assert_unhooked(sm.model, sm.layers)


@pytest.mark.parametrize(
    "name, match",
    [
        ("m7.direction.0", "bad member"),
        ("x0.direction.0", "no member"),
        ("m0.direction.x", "bad layer"),
        ("m0.direction.-3", "bad layer"),
        ("m\u00b2.direction.0", "bad member"),
        ("m1.direction.02", "two tensors for layer 2"),
        ("m0.weights", "unknown stack tensor"),
    ],
)
def test_malformed_stack_files_are_refused_by_name(tmp_path, sm, name, match):
    st, *_ = _stack(sm)
    bad = SteeringVector({}, dict(st.meta), st.condition_direction, {**st.extra, name: torch.ones(D)})
    with pytest.raises(VectorFileError, match=match):
        members_of(SteeringVector.load(bad.save(tmp_path / "b.safetensors")))
    top = SteeringVector({1: torch.ones(D)}, dict(st.meta), st.condition_direction, dict(st.extra))
    with pytest.raises(VectorFileError, match="in its members"):
        members_of(top)
    odd = SteeringVector({}, {**st.meta, "members": ["a", "b"]}, st.condition_direction, dict(st.extra))
    assert odd.describe()["members"] == [None, None]
    with pytest.raises(VectorFileError, match="metadata is invalid"):
        members_of(odd)


def test_the_stack_carries_its_members_judge(sm):
    tau, direction, cond, cdir, _ = _parts(sm)
    direction.meta["judge"] = {"kind": "pair", "openings": ["no ."]}
    st = make_stack([tau, direction], condition=cond, condition_direction=cdir)
    assert st.meta["judge"] == direction.meta["judge"]
    direction.meta["recommended"]["alpha"] = 9.0  # the stack holds its own copy of each member's metadata
    assert members_of(st)[1].recommended["alpha"] == W_DIR


@torch.no_grad()
def test_serve_engine_gates_a_stack_per_row_across_joins(sm):
    serve_matches_generate(sm, _stack(sm)[0], 1.0)
