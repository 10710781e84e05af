"""Where a steered layer's time goes on CPU: the op in a tight loop vs the same hook inside a real decode.

    python benchmarks/hook_overhead.py

Part 1, tight loop (one decode token, hidden 576; µs per call, medians): the op's general path and the
plan's decode path (add+ablate), and add-only through the plan.
Part 2, in context, on the benchmark's 30-layer model (B=1, greedy ``generate``): what a no-op forward hook and
a no-op :class:`steer.handle.ForwardWrap` add per layer-step (why steer wraps forwards), and steer's per-layer
function timed inside the decode. Here every ATen call costs ~4 µs instead of ~1-2 µs, because the layer's
weight traffic has just evicted the code and data the call needs; that, not arithmetic, is what steering costs.
Part 3: the once-per-forward check that every wrapped module still runs steer's wrapper (µs per model forward):
Steering on 30 blocks, and per-request task steering on every attention/MLP linear.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from steer import SteeringVector
from steer.config import SteeringConfig
from steer.handle import ForwardWrap
from steer.hooks import Steering
from steer.kernels import Plan, native, steer_

sys.path.insert(0, str(Path(__file__).parent))
from run import build_model, generate, lowrank_vector, prompt_ids  # noqa: E402


def per_call_us(fn, n: int, reps: int = 7) -> float:
    for _ in range(max(50, n // 20)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


@torch.no_grad()
def tight_loop() -> None:
    torch.manual_seed(0)
    h = torch.randn(1, 1, 576)
    vecs = torch.randn(2, 576)
    vecs[0] /= vecs[0].norm()
    coef = torch.tensor([[1.0, 1e-3]])  # small α: repeated in-place calls must not blow h up
    with native.using(False):
        plan = Plan(vecs, 1).update(coef)  # ATen calls
    nplan = Plan(vecs, 1).update(coef)  # the native decode step when built
    add_vec, add_coef = vecs[1:].clone(), coef[:, 1:].clone()
    add_plan = Plan(add_vec, 0).update(add_coef)
    rows = {
        "op add+ablate, general path": per_call_us(lambda: steer_(h, vecs, coef, 1), 5000),
        "op add+ablate, plan (decode, ATen)": per_call_us(lambda: steer_(h, vecs, coef, 1, None, plan), 5000),
        "op add only, plan": per_call_us(lambda: steer_(h, add_vec, add_coef, 0, None, add_plan), 5000),
    }
    if nplan.native is not None:
        rows["op add+ablate, plan (decode, native)"] = per_call_us(lambda: steer_(h, vecs, coef, 1, None, nplan), 5000)
    print("tight loop (µs per call)")
    for name, us in rows.items():
        print(f"  {name:44s} {us:8.1f}")


@torch.no_grad()
def in_context(new: int = 16, reps: int = 5, rounds: int = 21) -> None:
    model = build_model()
    n = model.config.num_hidden_layers
    ids = prompt_ids(1)

    def run(kind: str) -> float:
        undo = []
        for layer in model.model.layers:
            if kind == "forward hook":
                undo.append(layer.register_forward_hook(lambda *a: None))
            elif kind == "ForwardWrap":
                undo.append(ForwardWrap(layer, post=lambda *a: None))
        t0 = time.perf_counter()
        generate(model, ids, new)
        dt = time.perf_counter() - t0
        for u in undo:
            u.remove()
        return dt

    print(
        f"in context ({n} layers, B=1, greedy generate, {new} tokens; µs per layer-step, median of {rounds} "
        "paired rounds)"
    )
    for kind in ("none", "forward hook", "ForwardWrap"):
        run(kind)
    diffs = {"forward hook": [], "ForwardWrap": []}
    for _ in range(rounds):
        t_none = run("none")
        for kind in diffs:
            diffs[kind].append((run(kind) - t_none) / (new * n) * 1e6)
    for kind, d in diffs.items():
        print(f"  {'dispatch of a no-op ' + kind:44s} {statistics.median(d):8.1f}")
    vec = SteeringVector({i: torch.randn(576, generator=torch.Generator().manual_seed(i)) * 1e-3 for i in range(n)})
    variants = [("add", "add", None), ("ablate_add", "ablate_add, ATen", False)]
    if native.decode_fn() is not None:
        variants.append(("ablate_add", "ablate_add, native", None))
    for mode, label, use_native in variants:
        acc = [0.0, 0]
        with native.using(use_native):
            st = Steering(model, vec, SteeringConfig(mode=mode, layers=list(range(n)), alpha=1.0))
        with st:
            for wrap in st._handles:  # time steer's per-layer function from the outside
                if isinstance(wrap, ForwardWrap) and wrap._post is not None:
                    posts = wrap._w.posts
                    body = wrap._post

                    def timed(m, a, out, body=body):
                        if out.shape[1] != 1:
                            return body(m, a, out)
                        t0 = time.perf_counter()
                        r = body(m, a, out)
                        acc[0] += time.perf_counter() - t0
                        acc[1] += 1
                        return r

                    posts[posts.index(body)] = wrap._post = timed
            per_run = []
            for _ in range(reps):
                acc[:] = [0.0, 0]
                generate(model, ids, new)
                per_run.append(acc[0] / acc[1] * 1e6)
        print(f"  {'steer per-layer function, ' + label:44s} {statistics.median(per_run):8.1f}")


def wrap_checks() -> None:
    from steer.lowrank import TaskSteering

    model = build_model()
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    vec = SteeringVector({i: torch.randn(d) for i in range(n)}, {"op": "ablate_add"})
    print("once-per-forward check of the wrapped modules (µs per model forward)")
    with Steering(model, vec, SteeringConfig(mode="ablate_add", layers=list(range(n)), alpha=1.0)) as st:
        print(f"  {f'Steering, {len(st._sites)} blocks':44s} {per_call_us(st._check_wraps, 2000):8.1f}")
    with TaskSteering(model, lowrank_vector(model, 4)) as ts:
        print(f"  {f'TaskSteering, {len(ts._sites)} linears':44s} {per_call_us(ts._check_wraps, 500):8.1f}")


if __name__ == "__main__":
    tight_loop()
    in_context()
    wrap_checks()
