"""The vLLM plugin's per-slot bookkeeping without vLLM (steer.vllm.state imports no vLLM): vLLM's BatchUpdate
can refill a slot, or move a request onto it, without reporting the request that held it as removed; that
request's gate decisions must travel with it and come back when it returns."""

import torch

from steer import SteeringVector
from steer.serve.protocol import SteerSpec
from steer.vllm.state import SteerState


class Params:
    def __init__(self):
        self.extra_args = {"steer": "{}"}


def _state():
    g = torch.Generator().manual_seed(0)
    gated = SteeringVector(
        {1: torch.randn(8, generator=g)},
        {
            "kind": "refusal",
            "condition": {"layer": 0, "threshold": 0.0},
            "recommended": {"mode": "conditional", "scope": "generated"},
        },
        condition_direction=torch.randn(8, generator=g),
    )
    return SteerState({"gated": gated}, hidden_size=8, num_layers=2, architecture="x", slots=4, device="cpu")


def test_gate_decisions_survive_unreported_refills_and_moves():
    st = _state()
    spec = (SteerSpec("gated", 2.0),)
    a, b, c = Params(), Params(), Params()
    st.set_slot(0, spec, 5, a)
    st.set_slot(1, spec, 5, b)
    st.gate[0, 0], st.gate[1, 0] = 1.0, 1.0  # both decided "open" at their last prompt token
    st.set_slot(0, spec, 7, c)  # vLLM refills slot 0 with c; a was not reported removed
    assert a.extra_args["_steer_gate"][0] == [1.0] and float(st.gate[0, 0]) == 0.0
    st.move(1, 0, swap=False)  # b moves down onto slot 0 (c's): c's decisions must be kept too
    st.gate[0, 0] = 1.0
    assert "_steer_gate" in c.extra_args and float(st.gate[1, 0]) == 0.0 and st.slot_params[0] is b
    st.set_slot(2, spec, 5, a)  # a comes back: its decision with it
    assert float(st.gate[2, 0]) == 1.0 and float(st.coef[2, 0, 1]) == 2.0
    st.release(0)
    assert b.extra_args["_steer_gate"][0] == [1.0] and 0 not in st.slot_params


def test_steer_leaves_unsteered_tokens_bit_exact_and_gates_by_slot():
    st = _state()
    st.set_slot(0, (SteerSpec("gated", 3.0),), 2, Params())
    st.set_slot(1, (), 2, Params())
    x = torch.randn(4, 8)
    qsl = torch.tensor([0, 2, 4])  # two requests of two prompt tokens each
    pos = torch.tensor([0, 1, 0, 1])
    out = st.steer(1, x, pos, qsl)
    assert torch.equal(out, x)  # prompt tokens (scope generated) and the unsteered request: unchanged
    st.gate[0, 0] = 1.0
    gen = st.steer(1, x[:2], torch.tensor([2, 2]), torch.tensor([0, 1, 2]))  # one generated token each
    want = x[0] + 3.0 * st.vectors["gated"].directions[1]
    assert torch.allclose(gen[0], want, atol=1e-6) and torch.equal(gen[1], x[1])


def test_vectors_that_do_not_fit_the_model_stop_the_engine_by_name():
    import pytest

    from steer.errors import ConfigError, ModelMismatchError

    wide = SteeringVector({1: torch.randn(16)}, {"kind": "custom"})
    with pytest.raises(ModelMismatchError, match="STEER_VECTORS: vector 'w'.*hidden size"):
        SteerState({"w": wide}, hidden_size=8, num_layers=2, architecture="x", slots=2, device="cpu")
    deep = SteeringVector({5: torch.randn(8)}, {"kind": "custom"})
    with pytest.raises(ModelMismatchError, match="layers"):
        SteerState({"d": deep}, hidden_size=8, num_layers=2, architecture="x", slots=2, device="cpu")
    angular = SteeringVector({1: torch.randn(8)}, {"kind": "custom", "recommended": {"mode": "angular"}})
    with pytest.raises(ConfigError, match="angular"):
        SteerState({"a": angular}, hidden_size=8, num_layers=2, architecture="x", slots=2, device="cpu")
