"""torch.compile with steering attached: same logits as eager, no recompile when α changes.

Slow (a cold compile takes ~20-70 s on 2 CPU cores): marked ``slow``; the default run (and CI) still
runs it; deselect locally with ``-m "not slow"``.
"""

import pytest
import torch
from tiny_models import tiny_model

from steer import SteeringVector
from steer.config import SteeringConfig
from steer.hooks import Steering
from steer.lowrank import TaskSteering
from steer.vectors.task import compute_task_vector


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@torch.no_grad()
def test_compiled_model_with_steering_matches_eager():
    torch._dynamo.reset()
    m = tiny_model("llama")
    v = SteeringVector({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, {"op": "ablate_add"})
    tv = compute_task_vector(tiny_model("llama", 5), m, rank=2, progress=False)
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(1))
    with Steering(m, v, SteeringConfig(layers=[1, 2], alpha=1.0)) as h, TaskSteering(m, tv) as t:
        h.set_alphas([0.0, 1.0, -2.0])
        t.set_alphas([1.0, 0.0, 0.5])
        cm = torch.compile(m)
        assert (cm(ids).logits - m(ids).logits).abs().max() <= 1e-5
        h.set_alphas([2.0, 1.0, 0.0])  # in-place buffer updates: the compiled graph sees them
        t.set_alphas([0.0, 1.0, 1.0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = cm(ids).logits
        assert (got - m(ids).logits).abs().max() <= 1e-5
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@torch.no_grad()
def test_compiled_decode_step_with_ablation_is_one_graph():
    """A one-token forward (a decode step) traced whole (``fullgraph=True``): the CPU plan's decode path must not
    break the graph (no ``out=`` into a strided view, no call into the native op while traced); same logits as
    eager, which takes the native op when it is built."""
    torch._dynamo.reset()
    m = tiny_model("llama")
    v = SteeringVector({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, {"op": "ablate_add"})
    ids = torch.randint(3, 90, (3, 1), generator=torch.Generator().manual_seed(1))
    with Steering(m, v, SteeringConfig(layers=[1, 2], alpha=1.0)) as h:
        h.set_alphas([0.0, 1.0, -2.0])  # a row with α = 0: per-row β, the traced mul_ path
        assert h._plans[1].per_row_beta
        cm = torch.compile(m, fullgraph=True)
        assert (cm(ids).logits - m(ids).logits).abs().max() <= 1e-5
        h.set_alphas([2.0, 0.0, 3.0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = cm(ids).logits
        assert (got - m(ids).logits).abs().max() <= 1e-5
    torch._dynamo.reset()


def _compile_part(m, part):
    if part == "blocks":
        for i in (1, 2):
            m.model.layers[i].compile(fullgraph=True)
    elif part == "inner model":
        m.model.compile(fullgraph=True)
    else:  # the HF static-cache recipe
        m.forward = torch.compile(m.forward, fullgraph=True)


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("part", ["blocks", "inner model", "forward attribute"])
@torch.no_grad()
def test_parts_compiled_on_their_own_stay_one_graph(part):
    """Compiling a part (``block.compile()``, ``model.model.compile()``, ``model.forward = torch.compile(...)``,
    all ``fullgraph=True``) traces the hooks inside an eager root pre-hook: the decode step must still take the
    traced form (no native call, no out=), else the graph breaks and fullgraph raises."""
    torch._dynamo.reset()
    m = tiny_model("llama")
    v = SteeringVector({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, {"op": "ablate_add"})
    ids = torch.randint(3, 90, (3, 1), generator=torch.Generator().manual_seed(1))
    with Steering(m, v, SteeringConfig(layers=[1, 2], alpha=1.0)) as h:
        h.set_alphas([0.0, 1.0, -2.0])
        eager = m(ids).logits
        _compile_part(m, part)
        assert (m(ids).logits - eager).abs().max() <= 1e-5
        assert h._eager is False
    torch._dynamo.reset()
