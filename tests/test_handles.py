"""One contract, every vector kind: each entry of steer.kinds.KINDS is reached through SteeredModel.steer, returns a
SteeringHandle, steers, leaves a neutral row bit-exactly unsteered, mixes per-row values in one batch as solo runs
do (all but merged mode, which has one α), and leaves the model exactly as it was on exit, errors included. A
new kind added to the table without a case here fails test_every_kind_is_covered."""

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer

from steer import SteeredModel, SteeringVector
from steer.kinds import KINDS, SteeringHandle, kind_for
from steer.resolve import resolve
from steer.sae_clamp import SAEWeights
from steer.vectors.task import compute_task_vector

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
LAYER, M = 1, 16


def _sae_vector(sm):
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(M, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    w = SAEWeights(W_dec.T.clone() * 3, torch.zeros(M), W_dec, torch.zeros(D), "relu", None, None)
    meta = {"kind": "sae", "model": sm.fingerprint(), "sae": {"layer": LAYER, "site": "output", **w.info()}}
    return SteeringVector({LAYER: W_dec[[5]]}, meta, None, w.tensors())


def _case(name, sm):
    """(vector, config overrides, strong value, neutral value) for a kind."""
    if name == "activation":
        return SteeringVector({LAYER: torch.randn(D) * 3}), {"layers": [LAYER]}, 1.5, 0.0
    if name.startswith("task"):
        tau = compute_task_vector(tiny_model("llama", seed=1), sm.model, progress=False)
        return tau, {"mode": "merged" if name == "task_merged" else None}, 0.7, 0.0
    if name == "sae_clamp":
        return _sae_vector(sm), {"mode": "clamp", "extra": {"features": [5, 7]}}, 6.0, None
    if name == "stack":
        from steer.stack import make_stack

        tau = compute_task_vector(tiny_model("llama", seed=1), sm.model, progress=False)
        tau.meta["recommended"] = {"mode": "per_request", "alpha": 0.5}
        direction = SteeringVector({LAYER: torch.randn(D) * 3}, {"recommended": {"layers": [LAYER], "alpha": 1.0}})
        return make_stack([tau, direction]), {}, 1.5, 0.0
    raise AssertionError(f"no contract case for kind {name!r}")


def test_every_kind_is_covered():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    for name in KINDS:
        _case(name, sm)


@pytest.mark.parametrize("name", list(KINDS))
def test_handle_contract(name, exact_and_one_thread):
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    vec, overrides, strong, neutral = _case(name, sm)
    assert kind_for(vec, overrides.get("mode")).name == name
    weights = {k: v.clone() for k, v in sm.model.state_dict().items()}
    base = sm.model(IDS).logits
    with sm.steer(vec, **overrides) as h:
        assert isinstance(h, SteeringHandle) and h.active
        h.begin(IDS.shape[1])
        h.set_alphas(strong)
        steered = sm.model(IDS).logits
        assert not torch.allclose(steered, base)  # it steers
        h.set_alphas(neutral)
        assert torch.equal(sm.model(IDS).logits, base)  # a neutral value leaves every row as it was
        if name != "task_merged":  # per-row values in one batch == solo runs
            h.set_alphas([strong, neutral, strong])
            mixed = sm.model(IDS).logits
            torch.testing.assert_close(mixed[[0, 2]], steered[[0, 2]], rtol=1e-5, atol=1e-5)
            assert torch.equal(mixed[1], base[1])
    assert not h.active
    h.remove()  # idempotent
    assert torch.equal(sm.model(IDS).logits, base)
    assert all(torch.equal(v, weights[k]) for k, v in sm.model.state_dict().items())  # bit-exact
    assert_unhooked(sm.model, sm.layers)
    with pytest.raises(RuntimeError, match="boom"):  # an error in the body: everything comes off
        with sm.steer(vec, **overrides) as h:
            h.set_alphas(strong)
            raise RuntimeError("boom")
    assert not h.active and torch.equal(sm.model(IDS).logits, base)
    assert_unhooked(sm.model, sm.layers)


def test_resolve_is_pure(sm):
    """resolve() validates and settles every choice without touching the model or the caller's objects."""
    from steer.config import Condition, SteeringConfig

    cond = Condition(layer=0, direction=torch.randn(D), threshold=0.1)
    config = SteeringConfig(layers=[LAYER], mode="add", condition=cond, alpha=2.0)
    vec = SteeringVector({LAYER: torch.randn(D)})
    before = (dict(vars(config)), dict(vars(cond)), dict(vec.meta))
    tensors = [t.clone() for t in (cond.direction, *vec.directions.values())]
    params = [p.detach().clone() for p in sm.model.parameters()]
    res = resolve(config, vec, sm.model)
    now = [cond.direction, *vec.directions.values()]
    assert all(torch.equal(a, b) for a, b in zip(tensors, now))  # no tensor edited in place
    assert all(torch.equal(a, b) for a, b in zip(params, sm.model.parameters()))
    assert (res.kind, res.mode, res.layers, res.alpha, res.scope, res.site) == (
        "activation",
        "add",
        (1,),
        2.0,
        "all",
        "output",
    )
    assert res.condition is not cond and res.condition.layer == 0
    assert (dict(vars(config)), dict(vars(cond)), dict(vec.meta)) == before
    assert_unhooked(sm.model, sm.layers)
    neg = Condition(layer=-1, direction=torch.randn(D), threshold=0.1)  # a negative layer: resolved on a copy
    res = resolve(SteeringConfig(layers=[3], condition=neg, scope="generated"), vec, sm.model)
    assert neg.layer == -1 and res.condition.layer == 3
