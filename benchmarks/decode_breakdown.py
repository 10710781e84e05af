"""Per layer per decode step, what steering costs end to end: a no-op hook vs steer's add vs add+ablate.

    python benchmarks/decode_breakdown.py

Same ~135M Llama shape as benchmarks/run.py (30 layers, hidden 576, random weights), B=1, 32 new tokens,
greedy HF generate; variants interleaved, REPS repetitions, medians (this VM is noisy: use many).
Steering runs as attached by default: add+ablate's decode step is one native call when the optional op is built
(``python -m steer.kernels.native``), else three ATen calls (``STEER_NATIVE=0`` to compare).
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers as tf

from steer import SteeringVector
from steer.config import SteeringConfig
from steer.hooks import Steering

LAYERS, NEW, REPS = 30, 32, 11


def main() -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=LAYERS,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    vec = SteeringVector({i: torch.randn(576) * 1e-3 for i in range(LAYERS)})

    def gen():
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
            )

    def attach(name):
        if name == "no-op hooks":
            return [layer.register_forward_hook(lambda *a: None) for layer in model.model.layers]
        if name in ("add", "ablate_add"):
            return [Steering(model, vec, SteeringConfig(mode=name, layers=list(range(LAYERS)), alpha=1.0))]
        return []

    names = ("plain", "no-op hooks", "add", "ablate_add")
    times = {n: [] for n in names}
    gen()
    for _ in range(REPS):
        for n in names:
            handles = attach(n)
            t0 = time.perf_counter()
            gen()
            times[n].append(time.perf_counter() - t0)
            for h in handles:
                h.remove()
    base = statistics.median(times["plain"])
    for n in names:
        med = statistics.median(times[n])
        print(
            f"{n:12s} {med * 1000:8.1f} ms   over plain {base / med:.3f}   "
            f"µs per layer per step {(med - base) / (NEW * LAYERS) * 1e6:6.1f}"
        )


if __name__ == "__main__":
    main()
