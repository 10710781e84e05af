"""The past length (prompt vs decode step) read from every spelling transformers has used, and the hooks driven
through each: a renamed cache argument must not turn decode steps into prompts (transformers 5.24 renamed
``past_key_values`` to ``cache`` and dropped ``cache_position``)."""

import inspect

import pytest
import torch
from capture import around
from tiny_models import tiny_model, tiny_tokenizer
from torch import nn
from transformers import DynamicCache

from steer import SteeredModel
from steer.errors import StateError
from steer.kernels import use
from steer.positions import past_length


@pytest.fixture(autouse=True)
def reference_kernel():
    previous = use("reference")
    yield
    use(previous)


class _Cache:
    """A cache of a kind steer has never seen: only the method every transformers Cache has."""

    def __init__(self, n):
        self.n = n

    def get_seq_length(self, layer_idx=0):
        return self.n


def _legacy(n):
    k = torch.zeros(2, 4, n, 8)
    return ((k, k), (k, k))


@pytest.mark.parametrize(
    "kwargs,seq,expected",
    [
        ({"cache_position": torch.arange(7, 8)}, 1, 7),
        ({"past_key_values": _Cache(9)}, 1, 9),
        ({"past_key_value": _Cache(9)}, 1, 9),
        ({"cache": _Cache(9)}, 1, 9),
        ({"kv_state": _Cache(9)}, 1, 9),  # any name: found by what it is, not what it is called
        ({"past_key_values": _legacy(5)}, 1, 5),  # legacy tuple cache
        ({"attention_mask": torch.ones(2, 12)}, 1, 11),  # generate's mask covers past + new tokens
        ({"position_ids": torch.tensor([[3], [6]])}, 1, 6),  # the unpadded row's position
        ({"cache": _Cache(0), "attention_mask": torch.ones(2, 5)}, 5, 0),
        ({}, 5, 0),  # nothing: no way to see a past, a fresh sequence
        ({"cache": None, "attention_mask": torch.ones(1, 4)}, 4, 0),
    ],
)
def test_past_length_each_spelling(kwargs, seq, expected):
    assert past_length((), kwargs, seq) == expected


def test_positional_cache_is_found():
    assert past_length((torch.zeros(1, 1, dtype=torch.long), None, None, _Cache(4)), {}, 1) == 4


def test_disagreeing_sources_raise():
    """A cache that says 'prompt' while the mask says 'continuation' is refused, not guessed."""
    with pytest.raises(StateError, match="cannot tell"):
        past_length((), {"cache": _Cache(0), "attention_mask": torch.ones(1, 9)}, 1)
    with pytest.raises(StateError):
        past_length((), {"cache_position": torch.arange(3, 4), "attention_mask": torch.ones(1, 1)}, 1)


def _cache_kwarg(model) -> str:
    """The name the installed transformers' decoder forward gives its cache argument."""
    params = inspect.signature(model.model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise AssertionError(f"no cache argument in {list(params)}")


class _Renamed(nn.Module):
    """A causal LM whose forward takes the cache under a name no transformers release used (``kv``), with or
    without an attention mask: the hooks must still tell prompt from decode step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.name = _cache_kwarg(inner)

    def forward(self, input_ids, kv=None, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{self.name: kv})


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_hooks_under_a_renamed_cache(vec, scope, with_mask):
    inner = tiny_model("llama")
    sm = SteeredModel(_Renamed(inner), tiny_tokenizer(), layers_path="inner.model.layers")
    ids = torch.tensor([[5, 6, 7, 8]])
    with around(sm.layers[1], lambda: sm.steer(vec, alpha=2.0, layers=[1], scope=scope)) as (pre, post, _):
        with torch.no_grad():
            cache = DynamicCache()
            out = sm.model(ids, kv=cache, attention_mask=torch.ones(1, 4) if with_mask else None)
            nxt = out.logits[:, -1:].argmax(-1)
            sm.model(nxt, kv=cache, attention_mask=torch.ones(1, 5) if with_mask else None)
    assert [p.shape[1] for p in pre] == [4, 1]
    for step, (a, b) in enumerate(zip(pre, post)):
        steered = (scope == "prompt") == (step == 0)
        assert torch.equal(b, a + 2.0 * vec.directions[1] if steered else a), (scope, step)


def test_gate_is_held_through_decode_steps_on_the_installed_spelling(sm, vec):
    """The conditional gate is decided once, at the prompt, and held: a decode step never re-decides it."""
    from steer import Condition

    cond = Condition(layer=0, direction=torch.ones(vec.directions[0].shape[-1]), threshold=-1e9)
    ids = torch.tensor([[5, 6, 7, 8]])
    with sm.steer(vec, alpha=1.0, layers=[1], condition=cond) as handle:
        with torch.no_grad():
            sm.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        assert handle.last_gate.tolist() == [True]
        cond.threshold = 1e9  # a re-decision at a decode step would now close the gate
        calls = []
        original = handle._decide_gate
        handle._decide_gate = lambda h: (calls.append(h.shape), original(h))
        with torch.no_grad():
            sm.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        assert calls == [torch.Size([1, 4, vec.directions[0].shape[-1]])]  # the prompt only
