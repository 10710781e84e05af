"""The two continuous-batching candidates for ``steer serve`` (issue 14), and batch-level ``generate`` as the
baseline, on one offline workload (no HTTP, so only scheduling and the model are measured):

* ``batch-level``: HF ``generate`` over batches of 16 in arrival order (the first ``steer serve`` slice): a
  batch runs until its longest request is done;
* ``transformers CB``: transformers' own continuous batching (``init_continuous_batching``: paged attention,
  requests packed into one token stream), unsteered: its forward sees packed tokens with no row per request;
* ``steer step-level``: ``steer.serve.engine.Engine``, which the server runs: 16 rows in flight, a request joins
  as soon as one leaves; unsteered, and mixed (every request its own vector and α).

    python benchmarks/serve_candidates.py [--requests 64] [--slots 16] [--json F]

Workload: held-out harmless prompts of the built-in family's ``compromised`` member, greedy, each request
``max_tokens`` from (4, 8, 16, 32) in turn, EOS ignored so each candidate does exactly the same useful work.
Useful tokens per second, median of ``--repeat`` round-robin runs; ratios against batch-level.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def _batch_level(sm, ids, lengths, slots):
    tok = sm.tokenizer
    t = time.perf_counter()
    for s in range(0, len(ids), slots):
        chunk, m = ids[s : s + slots], max(lengths[s : s + slots])
        width = max(len(x) for x in chunk)
        x = torch.full((len(chunk), width), tok.pad_token_id)
        a = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            x[i, width - len(row) :], a[i, width - len(row) :] = torch.tensor(row), 1
        sm.model.generate(
            input_ids=x, attention_mask=a, max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0
        )
    return time.perf_counter() - t


class _TransformersCB:
    """One manager for the whole run, started once (its first batches are slow warm-up), as a server keeps it."""

    def __init__(self, sm, ids, lengths):
        from transformers import GenerationConfig

        self.ids, self.lengths = ids, lengths
        gc = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
        self.manager = sm.model.init_continuous_batching(generation_config=gc)
        self.manager.start()

    def __call__(self):
        ids, lengths = self.ids, self.lengths
        t = time.perf_counter()
        rids = [self.manager.add_request(x, max_new_tokens=m, eos_token_id=-1) for x, m in zip(ids, lengths)]
        got = sum(len(self.manager.get_result(timeout=600).generated_tokens) for _ in rids)
        wall = time.perf_counter() - t
        if got != sum(lengths):
            raise SystemExit(f"transformers CB generated {got} tokens, expected {sum(lengths)}")
        return wall

    def close(self):
        self.manager.stop(block=True)


def _steer_engine(sm, ids, lengths, slots, policy, steer_for):
    from steer.serve.engine import Engine, Job
    from steer.serve.protocol import Request, Sampling

    eng = Engine(sm, policy)
    jobs = [
        Job(Request("chat", "m", "", Sampling(m, 0.0, 1.0, None, (), 1, True), steer_for(i), False), prompt_ids=x)
        for i, (x, m) in enumerate(zip(ids, lengths))
    ]
    t = time.perf_counter()
    waiting, done = list(jobs), 0
    while done < len(jobs):
        room = slots - len(eng.jobs)
        if room > 0 and waiting:
            new, waiting = waiting[:room], waiting[room:]
            done += len(eng.add(new))
        done += len(eng.step())
    wall = time.perf_counter() - t
    eng.close()
    bad = [j for j in jobs if j.error is not None or j.completion_tokens != j.request.sampling.max_tokens]
    if bad:
        raise SystemExit(f"steer engine: {len(bad)} requests failed or came short: {bad[0].error}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)

    from steer import SteeredModel, SteeringVector
    from steer.family import build_family
    from steer.family import language as L
    from steer.serve.protocol import Policy, SteerSpec

    paths = build_family(progress=False)
    sm = SteeredModel.from_pretrained(str(paths["compromised"]))
    # directions on every layer (the cost of steering does not depend on which direction): nothing heavy runs
    # in this thread before the candidates (torch work in one thread slows another thread's torch work here)
    d, n = sm.model.config.hidden_size, len(sm.layers)
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({i: torch.randn(d, generator=g) for i in range(n)}, {"kind": "custom"})
    policy = Policy(vectors={"refusal": vec, "other": vec * -0.5})
    prompts = ([r.prompt for r in L.harmless_prompts("heldout")] * 8)[: args.requests]
    ids = [sm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in sm.format(prompts, chat=True)]
    lengths = [(4, 8, 16, 32)[i % 4] for i in range(len(ids))]
    useful = sum(lengths)

    def none(i):
        return ()

    def mixed(i):
        return (SteerSpec("refusal" if i % 2 else "other", 0.25 + (i % 16) / 8),)

    cands = {
        "batch-level generate": lambda: lambda: _batch_level(sm, ids, lengths, args.slots),
        "transformers CB (unsteered)": lambda: _TransformersCB(sm, ids, lengths),
        "steer step-level, unsteered": lambda: lambda: _steer_engine(sm, ids, lengths, args.slots, policy, none),
        "steer step-level, mixed": lambda: lambda: _steer_engine(sm, ids, lengths, args.slots, policy, mixed),
    }
    if args.only is not None:  # one candidate in this process: print its median wall time
        fn = cands[args.only]()
        try:
            with torch.no_grad():
                fn()  # warm-up
                walls = [fn() for _ in range(args.repeat)]
        finally:
            if hasattr(fn, "close"):
                fn.close()
        print(json.dumps({"wall": statistics.median(walls)}))
        return
    # each candidate in its own process: a thread doing torch work (transformers CB's scheduler) slows the torch
    # work of every other thread of its process on this 2-core machine, and no candidate should pay for another
    report = {"requests": len(ids), "slots": args.slots, "useful_tokens": useful, "tokens_per_s": {}}
    for name in cands:
        cmd = [sys.executable, __file__, "--only", name, "--requests", str(args.requests), "--slots", str(args.slots)]
        out = subprocess.run(cmd + ["--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
        report["tokens_per_s"][name] = useful / json.loads(out.stdout.strip().splitlines()[-1])["wall"]
    base = report["tokens_per_s"]["batch-level generate"]
    for name, tps in report["tokens_per_s"].items():
        print(f"{name:30s} {tps:8.1f} useful tok/s   {tps / base:5.2f}x batch-level")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
