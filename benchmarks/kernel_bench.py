"""Per-call cost of the steering op: reference vs fused CPU path, without and with a Plan (and Triton on CUDA).

Hooks call the op once per steered layer per forward, so at decode (T=1) the per-call
Python/dispatch overhead dominates. Each implementation is timed per call with
``perf_counter_ns``, calls interleaved round-robin so load drift hits all alike, and the
median is reported. On CUDA the Triton kernel's achieved bandwidth (one read + one write of h)
is compared with ``copy_`` of the same bytes.

    python benchmarks/kernel_bench.py [--runs 3000] [--d 576] [--J 1] [--K 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from steer.kernels import native
from steer.kernels.cpu import Plan, cpu_steer_
from steer.kernels.reference import reference_steer_

SHAPES = [(1, 1), (8, 1), (64, 1), (4, 128)]
DTYPES = [torch.float32, torch.bfloat16]


def make(B, T, d, J, K, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=g).to(device, dtype)
    vecs = torch.randn(J + K, d, generator=g)
    vecs[:J] /= vecs[:J].norm(dim=1, keepdim=True)
    # small coefficients: thousands of in-place calls neither blow h up nor decay its
    # projections into denormals (which would slow every implementation down ~10x)
    coef = torch.full((B, J + K), 1e-3)
    mask = torch.ones(B, T, dtype=torch.bool)
    return h, vecs.to(device), coef.to(device), mask.to(device)


def per_call_us(impls: dict, args, runs: int) -> dict:
    """Median per-call microseconds, interleaved."""
    for fn in impls.values():
        for _ in range(50):
            fn(*args)
    times = {name: [] for name in impls}
    for _ in range(runs):
        for name, fn in impls.items():
            t0 = time.perf_counter_ns()
            fn(*args)
            times[name].append(time.perf_counter_ns() - t0)
    return {name: statistics.median(ts) / 1e3 for name, ts in times.items()}


def cpu_table(args) -> None:
    print(
        f"CPU per-call us (median of {args.runs}, interleaved), d={args.d} J={args.J} K={args.K}, "
        f"{torch.get_num_threads()} threads; 'cpu+plan' = what steering hooks call (operands precomputed), "
        "ATen calls; 'native' = the same with the native decode step (one C++ call; fp32 T=1 only, "
        "'-' where it does not apply or is not built: python -m steer.kernels.native)"
    )
    print(
        f"{'B':>4} {'T':>4} {'dtype':>9} {'mask':>5} {'reference':>10} {'cpu':>8} {'cpu+plan':>9} {'native':>7} "
        f"{'speedup':>8}"
    )
    for B, T in SHAPES:
        for dtype in DTYPES:
            for use_mask in (False, True):
                h, vecs, coef, mask = make(B, T, args.d, args.J, args.K, dtype)
                with native.using(False):
                    plan = Plan(vecs, args.J).update(coef)  # ATen calls only
                nplan = Plan(vecs, args.J).update(coef)  # the native op when built
                impls = {
                    "reference": reference_steer_,
                    "cpu": cpu_steer_,
                    "plan": lambda *a, plan=plan: cpu_steer_(*a, plan),
                }
                applies = nplan.native is not None and T == 1 and dtype == torch.float32 and not use_mask
                if applies:
                    impls["native"] = lambda *a, plan=nplan: cpu_steer_(*a, plan)
                call = (h, vecs, coef, args.J, mask if use_mask else None)
                us = per_call_us(impls, call, args.runs)
                best = min(us["plan"], us.get("native", us["plan"]))
                nat = f"{us['native']:>7.1f}" if applies else f"{'-':>7}"
                print(
                    f"{B:>4} {T:>4} {str(dtype)[6:]:>9} {'yes' if use_mask else 'no':>5} "
                    f"{us['reference']:>10.1f} {us['cpu']:>8.1f} {us['plan']:>9.1f} {nat} "
                    f"{us['reference'] / best:>7.2f}x"
                )


def cuda_table(args) -> None:
    import triton.testing

    from steer.kernels.triton_steer import triton_steer_

    print(f"\nCUDA ({torch.cuda.get_device_name()}): triton vs copy_ bandwidth, d={args.d} (device time, do_bench)")
    print(
        f"{'B':>5} {'T':>5} {'dtype':>9} {'triton us':>10} {'GB/s':>8} {'copy_ GB/s':>11} {'% copy':>7} "
        f"{'cpu-path us':>12} {'ref us':>8}"
    )
    for B, T in SHAPES + [(64, 2048), (8, 32768)]:
        for dtype in DTYPES:
            h, vecs, coef, mask = make(B, T, args.d, args.J, args.K, dtype, "cuda")
            src = h.clone()
            nbytes = 2 * h.numel() * h.element_size()
            ms = triton.testing.do_bench(lambda: triton_steer_(h, vecs, coef, args.J, mask))
            ms_copy = triton.testing.do_bench(lambda: h.copy_(src))
            ms_cpu = triton.testing.do_bench(lambda: cpu_steer_(h, vecs, coef, args.J, mask))
            ms_ref = triton.testing.do_bench(lambda: reference_steer_(h, vecs, coef, args.J, mask))
            print(
                f"{B:>5} {T:>5} {str(dtype)[6:]:>9} {ms * 1e3:>10.1f} {nbytes / ms / 1e6:>8.0f} "
                f"{nbytes / ms_copy / 1e6:>11.0f} {100 * ms_copy / ms:>6.0f}% "
                f"{ms_cpu * 1e3:>12.1f} {ms_ref * 1e3:>8.1f}"
            )
    # At decode (T=1) a steered layer's GPU work is tiny and the host's cost of issuing it is what a decode
    # step pays: the Triton launcher against the ATen calls of a Plan (what the hooks use under use("cpu"), on
    # CUDA as on CPU), the Plan-less ATen path and the reference, per call.
    print(f"\nCUDA host us per call at decode (median of {args.runs}, no sync; what a decode step pays per layer)")
    print(f"{'B':>5} {'dtype':>9} {'triton':>8} {'aten+plan':>10} {'cpu-path':>9} {'reference':>10}")
    for B in (1, 8, 64):
        for dtype in DTYPES:
            h, vecs, coef, _ = make(B, 1, args.d, args.J, args.K, dtype, "cuda")
            plan = Plan(vecs, args.J).update(coef)
            impls = {
                "triton": triton_steer_,
                "plan": lambda *a, plan=plan: cpu_steer_(*a, plan),
                "cpu": cpu_steer_,
                "reference": reference_steer_,
            }
            us = per_call_us(impls, (h, vecs, coef, args.J, None), args.runs)
            torch.cuda.synchronize()
            print(
                f"{B:>5} {str(dtype)[6:]:>9} {us['triton']:>8.1f} {us['plan']:>10.1f} {us['cpu']:>9.1f} "
                f"{us['reference']:>10.1f}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3000)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--J", type=int, default=1)
    p.add_argument("--K", type=int, default=1)
    args = p.parse_args()
    cpu_table(args)
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            print("\ntriton not installed: no CUDA kernel table")
        else:
            cuda_table(args)


if __name__ == "__main__":
    main()
