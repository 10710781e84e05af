"""Test helper: record a block's output before and after steer's hooks run.

steer steers a block by wrapping its forward (steer.handle.ForwardWrap), so a forward hook sees the steered
output; the unsteered one is recorded by a wrapper of our own installed first (innermost)."""

from __future__ import annotations

import contextlib

import torch

from steer.handle import ForwardWrap


def _hidden(output):
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def around(block, attach):
    """Wrap the block with a 'pre' recorder, call attach() (which wraps it with steer), add a 'post' recorder.

    Yields (pre, post, handle): lists of cloned block outputs per forward call, and attach()'s result.
    """
    pre, post = [], []
    h1 = ForwardWrap(block, post=lambda m, a, o: pre.append(_hidden(o).detach().clone()))
    handle = attach()
    h2 = block.register_forward_hook(lambda m, a, o: post.append(_hidden(o).detach().clone()))
    try:
        yield pre, post, handle
    finally:
        h1.remove()
        h2.remove()
        handle.remove()


def assert_unhooked(model, blocks) -> None:
    """Nothing of steer's is left on the model: no hooks on it, no hooks or forward wrappers on its blocks."""
    assert not model._forward_pre_hooks and not model._forward_hooks
    for b in blocks:
        assert not b._forward_hooks and not b._forward_pre_hooks and "forward" not in b.__dict__


def greedy(sm, ids, attn, n=4):
    """Greedy ``generate`` of ``n`` new tokens on a SteeredModel's model (KV cache on, no grad)."""
    with torch.no_grad():
        return sm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=0)
