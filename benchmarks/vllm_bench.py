"""steer's vLLM plugin: steered over unsteered throughput at 1 and 16 concurrent requests, and 16 requests with K
distinct α against K = 1. Needs vLLM (``make test-vllm`` builds ``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/vllm_bench.py [--tokens 64] [--repeat 3] [--json F]

Model: a random Llama (hidden 256, 4 layers, 4 heads of 64, fp32) saved to a temporary folder; one vector on
every layer (the most work per token the plugin can be given). Offline ``LLM.generate`` (eager: the plugin
needs it), greedy, ``ignore_eos``, so every request generates exactly ``--tokens`` tokens; prefix caching off so
repeats measure computation. Median of ``--repeat`` round-robin runs. Targets (issue 15, CPU): steered/unsteered
≥ 0.9 at 16; K = 16 distinct α over K = 1 ≥ 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    import transformers as tf

    from steer import SteeringVector

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_tokenizer  # the word-level test tokenizer (with a chat template)

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    root = tempfile.mkdtemp(prefix="steer-vllm-bench-")
    tf.LlamaForCausalLM(cfg).float().eval().save_pretrained(f"{root}/m")
    tiny_tokenizer().save_pretrained(f"{root}/m")
    vec = SteeringVector({i: torch.randn(256) for i in range(4)}, {"kind": "custom"})
    os.environ["STEER_VECTORS"] = f"v={vec.save(f'{root}/v.safetensors')}"

    import vllm
    from vllm import SamplingParams

    llm = vllm.LLM(
        f"{root}/m", dtype="float32", enforce_eager=True, max_model_len=256, enable_prefix_caching=False, seed=0
    )
    prompts = [{"prompt_token_ids": [4] + [10 + (i * 7 + j) % 80 for j in range(24)] + [5, 6]} for i in range(16)]

    def params(alpha):
        extra = None if alpha is None else {"steer": json.dumps({"vector": "v", "alpha": alpha})}
        return SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra)

    cells = {
        "off_c1": (1, lambda i: None),
        "steered_c1": (1, lambda i: 1.0),
        "off_c16": (16, lambda i: None),
        "steered_c16_k1": (16, lambda i: 1.0),
        "steered_c16_k16": (16, lambda i: 0.25 + i / 8),
    }
    walls = {name: [] for name in cells}
    for r in range(args.repeat + 1):  # the first round warms up
        for name, (n, alpha) in cells.items():
            t = time.perf_counter()
            outs = llm.generate(prompts[:n], [params(alpha(i)) for i in range(n)], use_tqdm=False)
            wall = time.perf_counter() - t
            if sum(len(o.outputs[0].token_ids) for o in outs) != n * args.tokens:
                raise SystemExit(f"{name}: lost tokens")
            if r:
                walls[name].append(wall)
    tps = {name: cells[name][0] * args.tokens / statistics.median(w) for name, w in walls.items()}
    report = {
        "tokens_per_s": tps,
        "steered_over_off_c1": tps["steered_c1"] / tps["off_c1"],
        "steered_over_off_c16": tps["steered_c16_k1"] / tps["off_c16"],
        "k16_over_k1_c16": tps["steered_c16_k16"] / tps["steered_c16_k1"],
    }
    for name, v in tps.items():
        print(f"{name:18s} {v:8.1f} tok/s")
    print(
        f"steered/off: c1 {report['steered_over_off_c1']:.3f}, c16 {report['steered_over_off_c16']:.3f} "
        f"(target >= 0.9); K=16 distinct α / K=1 at c16: {report['k16_over_k1_c16']:.3f} (target >= 0.95)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
