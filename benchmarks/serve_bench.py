"""steer serve under load, on loopback only: throughput and p50/p99 latency at 1, 4, 16 and 64 concurrent
clients, with steering off, uniform (every request the same vector and α) and mixed (every request its own α and
vector), plus batched vs one-at-a-time (``--max-batch 1``) at 16 clients.

    python benchmarks/serve_bench.py [--model builtin:compromised] [--requests 64] [--max-tokens 16] [--json F]

The server runs in this process (uvicorn on 127.0.0.1, a free port) over the built-in family's ``compromised``
member with a refusal direction computed from ``aligned``; clients are the official ``openai`` async client.
Every request must succeed: a lost or failed request fails the run. Targets: mixed over unsteered at 16
clients ≥ 0.9; batched over one-at-a-time at 16 clients ≥ 3×.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time


def _server(sm, policy, max_batch):
    import uvicorn

    from steer.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(sm, policy, model_name="m", max_batch=max_batch),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    return server, t, f"http://127.0.0.1:{port}/v1"


async def _load(url, prompts, clients, steer_for, max_tokens):
    import openai

    c = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(clients)
    lat, toks = [], 0

    async def one(i, p):
        nonlocal toks
        async with sem:
            t = time.perf_counter()
            s = steer_for(i)
            r = await c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": p}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"steer": s} if s else None,
            )
            lat.append(time.perf_counter() - t)
            toks += r.usage.completion_tokens

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await c.close()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "tokens_per_s": toks / wall,
        "requests_per_s": len(lat) / wall,
        "tokens_mean": toks / len(lat),
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests": len(lat),
    }


def _line(label, r):
    return (
        f"{label}  {r['requests_per_s']:6.1f} req/s  {r['tokens_per_s']:7.1f} tok/s  "
        f"({r['tokens_mean']:.1f} tok/req)  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from steer import SteeredModel
    from steer.family import build_family
    from steer.family import language as L
    from steer.serve.protocol import Policy
    from steer.vectors.refusal import compute_refusal

    paths = build_family(progress=False)
    aligned = SteeredModel.from_pretrained(str(paths["aligned"]))
    sm = SteeredModel.from_pretrained(str(paths["compromised"]))
    h = [r.prompt for r in L.harmful_prompts("train")][:128]
    s = [r.prompt for r in L.harmless_prompts("train")][:128]
    vec = compute_refusal(aligned, h, s, select=False, progress=False)
    neg = vec * -0.5
    policy = Policy(vectors={"refusal": vec, "other": neg}, max_tokens_limit=64)
    prompts = ([r.prompt for r in L.harmless_prompts("heldout")] * 4)[: args.requests]
    modes = {
        "off": lambda i: None,
        "uniform": lambda i: {"vector": "refusal", "alpha": 1.0},
        "mixed": lambda i: [{"vector": "refusal" if i % 2 else "other", "alpha": 0.25 + (i % 16) / 8}],
    }
    report = {"requests": args.requests, "max_tokens": args.max_tokens, "rows": {}}
    server, thread, url = _server(sm, policy, 64)
    try:
        asyncio.run(_load(url, prompts[:4], 4, modes["off"], 4))  # warm-up
        for clients in (1, 4, 16, 64):
            for mode, fn in modes.items():
                r = asyncio.run(_load(url, prompts, clients, fn, args.max_tokens))
                report["rows"][f"{mode}_c{clients}"] = r
                print(_line(f"{mode:8s} clients={clients:3d}", r))
    finally:
        server.should_exit = True
        thread.join()
    server, thread, url = _server(sm, policy, 1)
    try:
        r = asyncio.run(_load(url, prompts, 16, modes["mixed"], args.max_tokens))
        report["rows"]["mixed_c16_one_at_a_time"] = r
        print(_line("one-at-a-time clients= 16", r))
    finally:
        server.should_exit = True
        thread.join()
    rows = report["rows"]
    # requests/s: completions end at EOS, so tokens per request differ between modes (steering changes the text)
    report["mixed_over_off_c16"] = rows["mixed_c16"]["requests_per_s"] / rows["off_c16"]["requests_per_s"]
    report["batched_over_one_at_a_time_c16"] = (
        rows["mixed_c16"]["requests_per_s"] / rows["mixed_c16_one_at_a_time"]["requests_per_s"]
    )
    print(
        f"mixed/off at 16 clients: {report['mixed_over_off_c16']:.3f} (target >= 0.9); "
        f"batched/one-at-a-time at 16: {report['batched_over_one_at_a_time_c16']:.2f}x (target >= 3)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
