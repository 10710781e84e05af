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
    w = ForwardWrap(m, post=lambda mod, args, out: out + 1.0,
                    pre=lambda mod, args, kwargs: seen.append(args[0].shape) or None)
    assert torch.equal(m(x), base + 1.0) and seen == [(2, 4)]
    h = m.register_forward_hook(lambda mod, args, out: seen.append("hook sees") or out * 0 + out)
    assert torch.equal(m(x), base + 1.0)          # forward hooks see the wrapped (steered) output
    h.remove()
    w.remove()
    w.remove()                                    # idempotent
    assert "forward" not in m.__dict__ and torch.equal(m(x), base)


def test_any_removal_order_leaves_nothing():
    m, x = _lin(), torch.randn(3, 4)
    base = m(x)
    a = ForwardWrap(m, post=lambda mod, args, out: out + 1.0)
    b = ForwardWrap(m, post=lambda mod, args, out: out * 2.0)
    assert torch.equal(m(x), (base + 1.0) * 2.0)
    a.remove()                                    # not the outermost: inert inside b's chain
    assert torch.equal(m(x), base * 2.0)
    b.remove()                                    # unwinds b and the inert a
    assert "forward" not in m.__dict__ and torch.equal(m(x), base)


def test_another_librarys_forward_is_kept():
    m, x = _lin(), torch.randn(1, 4)
    base = m(x)

    def theirs(module, inp):                      # e.g. accelerate: module.forward = partial(new_forward, module)
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
    assert torch.equal(c(x), torch.ones(2, 4))   # the copy's own weights, still wrapped
    assert not torch.equal(m(x), c(x))
    w.remove()
