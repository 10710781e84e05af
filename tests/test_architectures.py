"""Layer discovery and exact steering on tiny random models of every supported architecture family."""

import pytest
import torch
from capture import around
from tiny_models import ARCHS, D, L, V, tiny_model

from steer import SteeredModel, SteeringVector
from steer.kernels import use


@pytest.fixture(autouse=True)
def reference_kernel():
    previous = use("reference")
    yield
    use(previous)


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery_matches_hidden_states_convention(arch):
    model = tiny_model(arch)
    sm = SteeredModel(model)
    assert sm.num_layers == L and sm.hidden_size == D
    outs = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: outs.append(o if isinstance(o, torch.Tensor) else o[0]))
        for b in sm.layers
    ]
    ids = torch.randint(3, V, (2, 5))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert len(hs) == L + 1
    for i in range(L - 1):  # HF applies the final norm to the last entry
        assert torch.equal(hs[i + 1], outs[i]), f"{arch}: hidden_states[{i + 1}] != block {i} output"


@pytest.mark.parametrize("arch", ARCHS)
def test_add_and_ablate_exact_under_generate(arch):
    model = tiny_model(arch)
    sm = SteeredModel(model)
    torch.manual_seed(1)
    v = torch.randn(D)
    vec = SteeringVector({1: v, 2: 2 * v})
    ids = torch.randint(3, V, (2, 5))
    for layer in (1, 2):
        with around(sm.layers[layer], lambda: sm.steer(vec, alpha=0.75, layers=[1, 2])) as (pre, post, _):
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=3,
                    do_sample=False,
                    pad_token_id=0,
                )
        assert len(pre) == 3 and pre[0].shape[1] == 5 and pre[1].shape[1] == 1  # prefill + 2 cached decode steps
        for a, b in zip(pre, post):
            assert torch.equal(b, a + 0.75 * vec.directions[layer])
    r = v / v.norm()
    with around(sm.layers[2], lambda: sm.steer(vec, alpha=1.0, layers=[2], mode="ablate", source_layer=1)) as (
        pre,
        post,
        _,
    ):
        with torch.no_grad():
            model(ids)
    expected = pre[0] - 1.0 * (pre[0] @ r)[..., None] * r
    assert torch.equal(post[0], expected)
    assert (post[0] @ r).abs().max() < 1e-5
