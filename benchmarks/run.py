"""steer's runtime benchmarks: steering overhead, per-row α, low-rank task vectors, α switches, peers.

    python benchmarks/run.py --json OUT.json [--quick] [--peer-python PATH]

Model: a ~135M-parameter Llama built from a config (SmolLM-135M shape: 30 layers, hidden 576, 9 heads,
3 KV heads, intermediate 1536, vocab 49152; random weights), float32, CPU, greedy HF ``generate``.
Every row times its variants interleaved (A B A B …) and reports medians and the ratio from one run.

Rows (targets in brackets):
  steered_over_unsteered_b1/_b8   decode tokens/s, ablate+add on all 30 layers vs none      [>= 0.97]
  us_per_layer_step               added µs per steered layer per decode step (B=1; the prompt's
                                  steering counted in too)                                  [<= 20]
                                  (``_aten``: the same with the native decode step off, same run;
                                  ``cpu_decode`` says which one the main rows used)
  attach_remove_ms_30_layers      attaching + removing the 30-layer steering once (left out of the above)
  mixed_alpha_over_uniform_b64    64 rows with 64 distinct α vs one α (same hooks)           [>= 0.95]
  lowrank_param_over_base_b64     per-row rank-16 task vector on every attention/MLP linear  [>= 0.85]
  alpha_switch_over_copy_bandwidth  merged-mode α switch bytes/s (read θ₀ + τ, write θ) over
                                  copy_ bytes/s of the same tensors; bit-exact restore checked [>= 0.75]
  vs_repeng, vs_steering_vectors  steer's tokens/s over the peer's (add, same vector, layers,
                                  batch; greedy outputs checked equal)                       [>= 1.0]
  gpu_op_bandwidth_over_copy      CUDA only: the Triton op's bytes/s (read + write h, bf16 [64, 2048, 576]) over
                                  copy_ of the same tensor                                   [>= 0.8]
  gpu_steered_over_unsteered_b1/_b64  CUDA only: the activation row's ratio on the GPU            [>= 0.97]
                                  (``_aten``: the same steering through the ATen path — a Plan, as on
                                  CPU — in the same run, so the faster decode path can be chosen by
                                  measurement; ``gpu_max_logit_diff_triton_vs_aten_b*``: the two agree)
The peers need transformers<5 and numpy<2: `make bench-peers` builds .venv-peers and runs this script
there (or pass --peer-python .venv-peers/bin/python). Rows whose peer is missing say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "steered_over_unsteered_b1": (">=", 0.97),
    "steered_over_unsteered_b8": (">=", 0.97),
    "us_per_layer_step": ("<=", 20.0),
    "mixed_alpha_over_uniform_b64": (">=", 0.95),
    "lowrank_param_over_base_b64": (">=", 0.85),
    "alpha_switch_over_copy_bandwidth": (">=", 0.75),
    "vs_repeng": (">=", 1.0),
    "vs_steering_vectors": (">=", 1.0),
    "gpu_op_bandwidth_over_copy": (">=", 0.8),
    "gpu_steered_over_unsteered_b1": (">=", 0.97),
    "gpu_steered_over_unsteered_b64": (">=", 0.97),
}


def build_model(layers: int = 30):
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = None  # fixed-length decoding
    return model


def prompt_ids(batch: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 49000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, ids, new_tokens):
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call of each callable, run round-robin (one warm-up call each)."""
    return {k: statistics.median(v) for k, v in rounds(fns, reps).items()}


def rounds(fns: dict, reps: int) -> dict:
    """Seconds of each callable in every round, run round-robin after one warm-up call each.

    A callable that returns a float reports its own time (to leave set-up out of it); otherwise the call is
    timed. Round-robin order makes the per-round pairs comparable on this noisy machine: ratios are taken
    per round, then the median over rounds.
    """
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            times[k].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return times


def paired_ratio(times: dict, num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def direction(d: int, seed: int = 1) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ------------------------------------------------------------------------------------------- rows
def row_activation(model, results, quick):
    from steer import SteeringVector
    from steer.config import SteeringConfig
    from steer.hooks import Steering
    from steer.kernels import native

    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    vec = SteeringVector({i: direction(d, i) for i in range(n_layers)}, {"op": "ablate_add"})
    config = SteeringConfig(mode="ablate_add", layers=list(range(n_layers)), alpha=1.0)
    new = 8 if quick else 32
    attach = []
    for _ in range(5 if quick else 21):
        t0 = time.perf_counter()
        Steering(model, vec, config).remove()
        attach.append(time.perf_counter() - t0)
    results["attach_remove_ms_30_layers"] = statistics.median(attach) * 1e3
    for b, reps in ((1, 3 if quick else 25), (8, 3 if quick else 9)):
        ids = prompt_ids(b)

        def base():
            t0 = time.perf_counter()
            generate(model, ids, new)
            return time.perf_counter() - t0

        def steered():  # attached outside the timed call: steady-state cost (attach+remove is its own row)
            with Steering(model, vec, config):
                return base()

        def steered_aten():  # the same with the native decode step off (the plans read the switch at attach)
            with native.using(False):
                st = Steering(model, vec, config)
            with st:
                return base()

        variants = {"base": base, "steered": steered}
        if b == 1 and native.decode_fn() is not None:
            variants["steered_aten"] = steered_aten
        t = rounds(variants, reps)
        results[f"steered_over_unsteered_b{b}"] = paired_ratio(t, "base", "steered")
        med = {k: statistics.median(v) for k, v in t.items()}
        results[f"tokens_per_s_b{b}"] = {"unsteered": b * new / med["base"], "steered": b * new / med["steered"]}
        if b == 1:  # prefill's steering included (conservative): 16 prompt tokens, `new` decode steps
            per_round = sorted((s_ - b_) / (new * n_layers) * 1e6 for s_, b_ in zip(t["steered"], t["base"]))
            results["us_per_layer_step"] = statistics.median(per_round)
            q = statistics.quantiles(per_round, n=4)
            results["us_per_layer_step_spread"] = {"q25": q[0], "q75": q[2], "rounds": len(per_round)}
            if "steered_aten" in t:  # the ATen decode path, same run (what a machine without the build gets)
                results["us_per_layer_step_aten"] = statistics.median(
                    (s_ - b_) / (new * n_layers) * 1e6 for s_, b_ in zip(t["steered_aten"], t["base"])
                )
    # mixed α vs uniform α, B = 64 (16 with --quick)
    b = 16 if quick else 64
    ids = prompt_ids(b)
    with Steering(model, vec, config) as h:

        def run(alphas):
            def f():
                h.set_alphas(alphas)
                return generate(model, ids, 4 if quick else 8)

            return f

        mixed = [0.5 + i / b for i in range(b)]
        t = rounds({"uniform": run([1.0] * b), "mixed": run(mixed)}, 3 if quick else 7)
    results[f"mixed_alpha_over_uniform_b{b}" if b != 64 else "mixed_alpha_over_uniform_b64"] = paired_ratio(
        t, "uniform", "mixed"
    )


def lowrank_vector(model, rank: int):
    """A synthetic rank-R task vector on every attention and MLP linear (random factors, small norm)."""
    from steer import SteeringVector
    from steer.layers import fingerprint

    g = torch.Generator().manual_seed(3)
    extra, params = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            out_f, in_f = mod.weight.shape
            extra[f"task.{name}.weight.up"] = torch.randn(out_f, rank, generator=g) * 0.01
            extra[f"task.{name}.weight.down"] = torch.randn(rank, in_f, generator=g) * 0.01
            params[f"{name}.weight"] = {"shape": [out_f, in_f], "conv1d": False, "rank": rank}
    return SteeringVector({}, {"kind": "task", "model": fingerprint(model), "task": {"params": params}}, None, extra)


def row_lowrank(model, results, quick):
    from steer.lowrank import TaskSteering

    vec = lowrank_vector(model, 16)
    b = 16 if quick else 64
    ids = prompt_ids(b)
    alphas = [0.5 + i / b for i in range(b)]

    def steered():
        with TaskSteering(model, vec) as h:
            h.set_alphas(alphas)
            return generate(model, ids, 4 if quick else 8)

    t = rounds({"base": lambda: generate(model, ids, 4 if quick else 8), "lowrank": steered}, 3 if quick else 5)
    results["lowrank_param_over_base_b64" if b == 64 else f"lowrank_param_over_base_b{b}"] = paired_ratio(
        t, "base", "lowrank"
    )
    results["lowrank_modules"] = len(vec.meta["task"]["params"])


@torch.no_grad()
def row_alpha_switch(model, results, quick):
    """Dense τ on every linear of the blocks; α switch vs copy_ bandwidth; bit-exact restore."""
    from steer import SteeringVector
    from steer.layers import fingerprint
    from steer.params import MergedTaskSteering

    g = torch.Generator().manual_seed(4)
    extra, params = {}, {}
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            extra[f"task.{name}"] = torch.randn(p.shape, generator=g) * 1e-3
            params[name] = {"shape": list(p.shape), "conv1d": False, "rank": None}
    vec = SteeringVector({}, {"kind": "task", "model": fingerprint(model), "task": {"params": params}}, None, extra)
    snap = {n: model.get_parameter(n).detach().clone() for n in params}
    h = MergedTaskSteering(model, vec, 1.0)
    entries = list(h._entries)
    nbytes = h.nbytes()
    alphas = iter([0.5, 1.5] * 1000)

    def switch():
        h.set_alpha(next(alphas))

    def copy():
        for _, p, theta0, _ in entries:
            p.data.copy_(theta0)

    t = interleaved({"copy": copy, "switch": switch}, 3 if quick else 9)
    h.restore()
    exact = all(torch.equal(model.get_parameter(n), snap[n]) for n in params)
    copy_bw, switch_bw = 2 * nbytes / t["copy"], 3 * nbytes / t["switch"]
    results["alpha_switch_over_copy_bandwidth"] = switch_bw / copy_bw
    results["alpha_switch"] = {
        "GB_per_s": switch_bw / 1e9,
        "copy_GB_per_s": copy_bw / 1e9,
        "MB_switched": nbytes / 1e6,
        "ms_per_switch": t["switch"] * 1e3,
        "bit_exact_restore": exact,
    }
    del extra, snap


def row_peers(model, results, quick):
    """steer vs repeng / steering-vectors: add α·v at the same layers, same batch; outputs checked equal."""
    from steer import SteeringVector
    from steer.config import SteeringConfig
    from steer.hooks import Steering

    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    layers = list(range(n_layers))
    dirs = {i: direction(d, 10 + i) * 0.5 for i in layers}
    vec = SteeringVector(dirs, {"op": "add"})
    b, new = 8, 8 if quick else 24
    ids = prompt_ids(b)
    fns = {}

    def steer_fn():
        with Steering(model, vec, SteeringConfig(mode="add", layers=layers, alpha=1.0)):
            return generate(model, ids, new)

    fns["steer"] = steer_fn
    try:
        import numpy as np
        import repeng

        cv = repeng.ControlVector(model.config.model_type, {i: dirs[i].numpy().astype(np.float32) for i in layers})

        def repeng_fn():  # ControlModel replaces the blocks by wrappers; unwrap() puts them back (~0.1 ms)
            cm = repeng.ControlModel(model, layers)
            cm.set_control(cv, 1.0)
            try:
                return generate(cm, ids, new)
            finally:
                cm.unwrap()

        fns["repeng"] = repeng_fn
    except ImportError as exc:
        results["vs_repeng"] = f"not run: {exc} (needs transformers<5, numpy<2: make bench-peers)"
    try:
        import steering_vectors as sv

        svec = sv.SteeringVector({i: dirs[i] for i in layers}, layer_type="decoder_block")

        def sv_fn():
            with svec.apply(model, multiplier=1.0, min_token_index=0):
                return generate(model, ids, new)

        fns["steering_vectors"] = sv_fn
    except ImportError as exc:
        results["vs_steering_vectors"] = f"not run: {exc} (needs transformers<5, numpy<2: make bench-peers)"
    if len(fns) == 1:
        return
    ref = steer_fn()
    for name in list(fns):
        if name != "steer":
            same = torch.equal(fns[name](), ref)
            results[f"vs_{name}_outputs_equal"] = same
    t = rounds(fns, 3 if quick else 9)
    for name in fns:
        if name != "steer":
            results[f"vs_{name}"] = paired_ratio(t, name, "steer")
    results["peer_tokens_per_s_b8"] = {k: b * new / statistics.median(v) for k, v in t.items()}


def row_gpu(results, quick):
    """CUDA only: the Triton op's bandwidth over copy_ bandwidth; steered/unsteered decode at B=1 and B=64."""
    if not torch.cuda.is_available():
        for key in (
            "gpu_op_bandwidth_over_copy",
            "gpu_steered_over_unsteered_b1",
            "gpu_steered_over_unsteered_b64",
            "gpu_steered_over_unsteered_b1_aten",
            "gpu_steered_over_unsteered_b64_aten",
        ):
            results[key] = "not run: no CUDA device"
        return
    import steer.kernels as K
    from steer import SteeringVector
    from steer.config import SteeringConfig
    from steer.hooks import Steering

    results["gpu"] = torch.cuda.get_device_name()
    results["gpu_kernel"] = K.IMPL
    try:
        import triton.testing

        from steer.kernels.triton_steer import triton_steer_
    except ImportError as exc:
        results["gpu_op_bandwidth_over_copy"] = f"not run: {exc}"
    else:
        h = torch.randn(64, 2048, 576, device="cuda", dtype=torch.bfloat16)
        src = h.clone()
        vecs = torch.randn(2, 576, device="cuda")
        vecs[0] /= vecs[0].norm()
        coef = torch.full((64, 2), 1e-3, device="cuda")
        ms_op = triton.testing.do_bench(lambda: triton_steer_(h, vecs, coef, 1))
        ms_copy = triton.testing.do_bench(lambda: h.copy_(src))
        nbytes = 2 * h.numel() * h.element_size()
        results["gpu_op_bandwidth_over_copy"] = ms_copy / ms_op
        results["gpu_op"] = {"GB_per_s": nbytes / ms_op / 1e6, "copy_GB_per_s": nbytes / ms_copy / 1e6}
        del h, src
    model = build_model().cuda()
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    vec = SteeringVector({i: direction(d, i) for i in range(n_layers)}, {"op": "ablate_add"})
    config = SteeringConfig(mode="ablate_add", layers=list(range(n_layers)), alpha=1.0)
    new = 8 if quick else 32
    for b in (1, 64):
        ids = prompt_ids(b).cuda()

        def base():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate(model, ids, new)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        def steered():
            with Steering(model, vec, config):
                return base()

        def steered_aten():  # the same steering through the ATen path on CUDA (no Triton)
            with K.using("cpu"), Steering(model, vec, config):
                return base()

        t = rounds({"base": base, "steered": steered, "steered_aten": steered_aten}, 3 if quick else 11)
        results[f"gpu_steered_over_unsteered_b{b}"] = paired_ratio(t, "base", "steered")
        results[f"gpu_steered_over_unsteered_b{b}_aten"] = paired_ratio(t, "base", "steered_aten")
        results[f"gpu_tokens_per_s_b{b}"] = {k: b * new / statistics.median(v) for k, v in t.items()}
        with Steering(model, vec, config), torch.no_grad():  # both paths: the same logits up to fp32 rounding
            ours = model(ids).logits
        with K.using("cpu"), Steering(model, vec, config), torch.no_grad():
            aten = model(ids).logits
        results[f"gpu_max_logit_diff_triton_vs_aten_b{b}"] = float((ours - aten).abs().max())


# ------------------------------------------------------------------------------------------- main
def table(results: dict) -> str:
    lines = [f"{'row':36s} {'value':>12s}  target   met"]
    for key, (op, target) in TARGETS.items():
        stem = key.rsplit("_b", 1)[0]  # --quick runs the _b64 rows at B=16: show those under the same row
        matches = [
            k
            for k in results
            if key.endswith("_b64") and k.rsplit("_b", 1)[0] == stem and k.rsplit("_b", 1)[1] not in ("1", "8")
        ]
        k = key if key in results else (matches[0] if matches else key)
        v = results.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            met = v >= target if op == ">=" else v <= target
            lines.append(f"{k:36s} {v:12.3f}  {op}{target:<6g} {'yes' if met else 'NO'}")
        else:
            lines.append(f"{k:36s} {str(v)[:60]}")
    for k, v in results.items():
        if isinstance(v, dict):
            lines.append(
                f"  {k}: " + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (fewer tokens, reps, B=16)")
    ap.add_argument("--only", default="all", help="comma list: activation,lowrank,switch,peers,gpu")
    ap.add_argument(
        "--peer-python",
        default=None,
        help="interpreter with repeng + steering-vectors (default: .venv-peers/bin/python when it exists)",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only != "all" else {"activation", "lowrank", "switch", "peers", "gpu"}
    import transformers

    import steer.kernels as K
    from steer.kernels import native

    results: dict = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernel": K.IMPL,
        "cpu_decode": "native" if native.decode_fn() is not None else "aten (native op not built)",
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    t0 = time.time()
    model = build_model()
    if "activation" in only:
        row_activation(model, results, args.quick)
    if "lowrank" in only:
        row_lowrank(model, results, args.quick)
    if "switch" in only:
        row_alpha_switch(model, results, args.quick)
    if "gpu" in only:
        row_gpu(results, args.quick)
    if "peers" in only:
        peer_py = args.peer_python or (
            str(ROOT / ".venv-peers/bin/python") if (ROOT / ".venv-peers/bin/python").exists() else None
        )
        try:
            import repeng  # noqa: F401

            local = True
        except ImportError:
            local = False
        if local or not peer_py:
            row_peers(model, results, args.quick)
        else:
            out = Path(os.environ.get("TMPDIR", "/tmp")) / "steer_bench_peers.json"
            cmd = [peer_py, __file__, "--only", "peers", "--json", str(out)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0 and out.exists():
                peer = json.loads(out.read_text())
                results.update({k: v for k, v in peer.items() if k.startswith(("vs_", "peer_"))})
                results["peer_transformers"] = peer.get("transformers")
            else:
                results["vs_repeng"] = results["vs_steering_vectors"] = (
                    f"not run: peer interpreter failed: {proc.stderr.strip().splitlines()[-1:]}"
                )
    results["seconds"] = round(time.time() - t0, 1)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
