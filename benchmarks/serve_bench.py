"""steer serve under load, on loopback only: throughput and p50/p99 latency at 1, 4, 16 and 64 concurrent
clients, with steering off, uniform (every request the same vector and α) and mixed (every request its own α and
vector), plus batched vs one-at-a-time (``--max-batch 1``) at 16 clients.

    python benchmarks/serve_bench.py [--model builtin:compromised] [--requests 64] [--max-tokens 16] [--json F]

The server is ``steer serve`` in its own process, as deployed (127.0.0.1, a free port), over the built-in family's
``compromised`` member with a refusal direction computed from ``aligned`` (and the same direction × -0.5, so
mixed requests use two vectors); clients are the official ``openai`` async client in this process.
Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``, as vLLM's benchmarks do: steering
changes where a completion would end, and the ratios must compare equal work). Every request must succeed: a
lost or failed request fails the run. Targets: mixed over unsteered at 16
clients ≥ 0.9; batched over one-at-a-time at 16 clients ≥ 3×.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "m"  # the served model's name: the path it was started with


def _server(model_dir, vector_files, max_batch):
    """``steer serve`` as its own process (as deployed: the clients' event loop does not share its interpreter),
    on a free loopback port; returns the process and the base URL once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-c", "from steer.cli import main; main()", "serve", str(model_dir)]
    args += [a for name, f in vector_files.items() for a in ("--vector", f"{name}={f}")]
    args += ["--port", str(port), "--max-batch", str(max_batch), "--max-tokens-limit", "64"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit("steer serve exited at start-up:\n" + proc.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("steer serve did not start")


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    if "no steering left" not in out:
        raise SystemExit("steer serve did not shut down cleanly:\n" + out)
    return out.strip().splitlines()[-1]


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
                model=MODEL,
                messages=[{"role": "user", "content": p}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True, **({"steer": s} if s else {})},
            )
            lat.append(time.perf_counter() - t)
            toks += r.usage.completion_tokens

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await c.close()
    wall = time.perf_counter() - t0
    if len(lat) != len(prompts) or toks != len(prompts) * max_tokens:
        raise SystemExit(f"lost work: {len(lat)}/{len(prompts)} requests, {toks} tokens")
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
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from steer import SteeredModel
    from steer.family import build_family
    from steer.family import language as L
    from steer.vectors.refusal import compute_refusal

    paths = build_family(progress=False)
    aligned = SteeredModel.from_pretrained(str(paths["aligned"]))
    h = [r.prompt for r in L.harmful_prompts("train")][:128]
    s = [r.prompt for r in L.harmless_prompts("train")][:128]
    vec = compute_refusal(aligned, h, s, select=False, progress=False)
    neg = vec * -0.5
    tmp = tempfile.mkdtemp(prefix="steer-serve-bench-")
    files = {"refusal": vec.save(f"{tmp}/refusal.safetensors"), "other": neg.save(f"{tmp}/other.safetensors")}
    prompts = ([r.prompt for r in L.harmless_prompts("heldout")] * 16)[: args.requests]
    modes = {
        "off": lambda i: None,
        "uniform": lambda i: {"vector": "refusal", "alpha": 1.0},
        "mixed": lambda i: [{"vector": "refusal" if i % 2 else "other", "alpha": 0.25 + (i % 16) / 8}],
    }
    report = {"requests": args.requests, "max_tokens": args.max_tokens, "rows": {}}
    global MODEL
    MODEL = str(paths["compromised"])
    proc, url = _server(paths["compromised"], files, 64)
    try:
        asyncio.run(_load(url, prompts[:4], 4, modes["off"], 4))  # warm-up
        for clients in (1, 4, 16, 64):
            for mode, fn in modes.items():
                r = asyncio.run(_load(url, prompts, clients, fn, args.max_tokens))
                report["rows"][f"{mode}_c{clients}"] = r
                print(_line(f"{mode:8s} clients={clients:3d}", r))
    finally:
        print(_stop(proc))
    proc, url = _server(paths["compromised"], files, 1)
    try:
        asyncio.run(_load(url, prompts[:4], 4, modes["off"], 4))  # warm-up
        r = asyncio.run(_load(url, prompts, 16, modes["mixed"], args.max_tokens))
        report["rows"]["mixed_c16_one_at_a_time"] = r
        print(_line("one-at-a-time clients= 16", r))
    finally:
        print(_stop(proc))
    rows = report["rows"]
    # every request generates exactly max_tokens (ignore_eos), so requests/s compares like with like
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
