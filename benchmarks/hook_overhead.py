"""Where a steered layer's time goes on CPU: hook dispatch vs the fused op (one decode token, hidden 576).

    python benchmarks/hook_overhead.py

Prints medians (µs per call) of: the op alone (add+ablate, add-only), steer's hook body, and one Llama decoder
layer called plainly, with a no-op forward hook, and with steer's add+ablate hook.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from steer import SteeredModel, SteeringVector
from steer.kernels import steer_


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
def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layer = model.model.layers[0]
    h = torch.randn(1, 1, 576)
    vecs = torch.randn(2, 576)
    vecs[0] /= vecs[0].norm()
    coef = torch.tensor([[1.0, 1e-3]])  # small α: repeated in-place calls must not blow h up
    rows = {"op add+ablate": per_call_us(lambda: steer_(h, vecs, coef, 1), 5000),
            "op add only": per_call_us(lambda: steer_(h, vecs[1:], coef[:, 1:], 0), 5000)}
    sm = SteeredModel(model)
    vec = SteeringVector({0: torch.randn(576)})
    emb = model.model.rotary_emb(h, torch.arange(1)[None])
    call = lambda: layer(h, position_embeddings=emb, attention_mask=None)  # noqa: E731
    rows["layer, no hook"] = per_call_us(call, 1000)
    handle = layer.register_forward_hook(lambda *a: None)
    rows["layer + no-op hook"] = per_call_us(call, 1000)
    handle.remove()
    with sm.steer(vec, layers=[0], mode="ablate_add", alpha=1e-3):
        rows["layer + steer add+ablate hook"] = per_call_us(call, 1000)
    for name, us in rows.items():
        print(f"{name:32s} {us:8.1f} µs")
    print(f"{'hook dispatch (no-op − none)':32s} {rows['layer + no-op hook'] - rows['layer, no hook']:8.1f} µs")
    print(f"{'steer total (add+ablate − none)':32s} {rows['layer + steer add+ablate hook'] - rows['layer, no hook']:8.1f} µs")


if __name__ == "__main__":
    main()
