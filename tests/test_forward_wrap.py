"""ForwardWrap, the per-module hook steer steers through: it runs like a forward hook, comes off leaving the
module exactly as it was (in any removal order), and survives copies and other libraries' forward wrappers."""

import copy
import functools

import torch
from torch import nn

from steer.handle import ForwardWrap


def _lin():
    torch.manual_seed(0)
    return nn.Linear(4, 4)


def test_post_and_pre_run_like_hooks_and_removal_restores():
    m, x = _lin(), torch.randn(2, 4)
    base = m(x)
    seen = []
    w = ForwardWrap(
        m, post=lambda mod, args, out: out + 1.0, pre=lambda mod, args, kwargs: seen.append(args[0].shape) or None
    )
    assert torch.equal(m(x), base + 1.0) and seen == [(2, 4)]
    h = m.register_forward_hook(lambda mod, args, out: seen.append("hook sees") or out * 0 + out)
    assert torch.equal(m(x), base + 1.0)  # forward hooks see the wrapped (steered) output
    h.remove()
    w.remove()
    w.remove()  # idempotent
    assert "forward" not in m.__dict__ and torch.equal(m(x), base)


def test_any_removal_order_leaves_nothing():
    m, x = _lin(), torch.randn(3, 4)
    base = m(x)
    a = ForwardWrap(m, post=lambda mod, args, out: out + 1.0)
    b = ForwardWrap(m, post=lambda mod, args, out: out * 2.0)
    assert torch.equal(m(x), (base + 1.0) * 2.0)
    a.remove()  # not the outermost: inert inside b's chain
    assert torch.equal(m(x), base * 2.0)
    b.remove()  # unwinds b and the inert a
    assert "forward" not in m.__dict__ and torch.equal(m(x), base)


def test_another_librarys_forward_is_kept():
    m, x = _lin(), torch.randn(1, 4)
    base = m(x)

    def theirs(module, inp):  # e.g. accelerate: module.forward = partial(new_forward, module)
        return type(module).forward(module, inp) - 1.0

    m.forward = functools.partial(theirs, m)
    mine = m.forward
    w = ForwardWrap(m, post=lambda mod, args, out: out * 3.0)
    assert torch.equal(m(x), (base - 1.0) * 3.0)
    w.remove()
    assert m.forward is mine and torch.equal(m(x), base - 1.0)


def test_deepcopy_binds_the_copy():
    m, x = _lin(), torch.randn(2, 4)
    w = ForwardWrap(m, post=lambda mod, args, out: out + 1.0)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.weight.zero_()
        c.bias.zero_()
    assert torch.equal(c(x), torch.ones(2, 4))  # the copy's own weights, still wrapped
    assert not torch.equal(m(x), c(x))
    w.remove()


def test_order_matches_torch_hooks_and_stacking_over_another_wrapper():
    m, x = _lin(), torch.randn(1, 4)
    base = m(x)
    seen = []
    a = ForwardWrap(m, pre=lambda mod, args, kw: seen.append("a") or ((args[0] + 1.0,), kw))
    b = ForwardWrap(m, pre=lambda mod, args, kw: seen.append("b") or ((args[0] * 2.0,), kw))
    assert torch.equal(m(x), m.__class__.forward(m, (x + 1.0) * 2.0)) and seen[:2] == ["a", "b"]  # as pre-hooks
    mine = m.forward
    m.forward = functools.partial(lambda module, inp: mine(inp) - 1.0, m)  # another library wraps ours
    c = ForwardWrap(m, post=lambda mod, args, out: out * 0.0)  # ours again, outermost
    assert torch.equal(m(x), torch.zeros_like(base))
    c.remove()
    a.remove()
    b.remove()
    assert torch.equal(m(x), base - 1.0)  # their wrapper still works
    assert [k for k in m.__dict__ if k.startswith("_steer_forward")] != []  # ours stays inert inside theirs


def test_deepcopy_with_another_wrapper_underneath():
    m, x = _lin(), torch.randn(2, 4)
    m.forward = functools.partial(lambda module, inp: type(module).forward(module, inp), m)
    w = ForwardWrap(m, post=lambda mod, args, out: out + 1.0)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.weight.zero_()
        c.bias.zero_()
    assert torch.equal(c(x), torch.ones(2, 4))
    w.remove()
    assert torch.equal(c(x), torch.ones(2, 4))  # the copy keeps its own wrapper (as torch hooks are copied)
