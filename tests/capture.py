"""Test helper: record a block's output before and after steer's hooks run."""

from __future__ import annotations

import contextlib

import torch


def _hidden(output):
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def around(block, attach):
    """Register a 'pre' recorder, call attach() (which registers steer's hooks), then a 'post' recorder.

    Yields (pre, post, handle): lists of cloned block outputs per forward call, and attach()'s result.
    """
    pre, post = [], []
    h1 = block.register_forward_hook(lambda m, a, o: pre.append(_hidden(o).detach().clone()))
    handle = attach()
    h2 = block.register_forward_hook(lambda m, a, o: post.append(_hidden(o).detach().clone()))
    try:
        yield pre, post, handle
    finally:
        h1.remove()
        h2.remove()
        handle.remove()
