"""The batch engine behind ``steer serve``: requests that arrive together share one ``generate`` call, each row
with its own vectors, α, gate, sampling parameters and stop conditions.

One handle per distinct (vector, layers, mode, scope) in the batch is attached for the batch (its rows that do
not use it get α = 0, which leaves them bit-exactly unsteered) and removed afterwards, errors included. Per-row
sampling is a logits processor that draws each sampled row's token with that request's own generator (so a
seeded request gives the same text whatever its batchmates) and leaves greedy rows to argmax; per-row stops
(``max_tokens``, stop strings, EOS, a client that went away) are a stopping criterion, which also streams each
row's new text. Batching is per batch (a request that arrives while a batch runs waits for the next one); see
docs/serving.md for what was measured and what continuous batching would add.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from steer.config import SteeringConfig

from .protocol import Request


@dataclass
class Job:
    """One completion (a request with ``n`` choices is ``n`` jobs)."""

    request: Request
    index: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    on_delta: object = None  # callable(text) for streaming, called from the engine thread
    on_done: object = None  # callable(job), called from the engine thread
    cancelled: bool = False
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    gates: dict = field(default_factory=dict)  # vector -> {"open": bool, "score": float}
    error: Exception | None = None
    _emitted: int = 0


class _RowSampler(LogitsProcessor):
    """Sampled rows: temperature and top-p, drawn with the row's generator; the logits become one-hot so that
    ``generate``'s own draw picks that token. Greedy rows (temperature 0): one-hot at the argmax."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.gens = []
        for j in jobs:
            s = j.request.sampling
            g = torch.Generator()
            g.manual_seed(s.seed + j.index if s.seed is not None else int(torch.randint(0, 2**62, (1,))))
            self.gens.append(g)

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        for i, j in enumerate(self.jobs):
            s = j.request.sampling
            row = scores[i].float()
            if s.temperature == 0.0:
                tok = int(row.argmax())
            else:
                probs = torch.softmax(row / s.temperature, dim=-1)
                if s.top_p < 1.0:
                    sp, idx = probs.sort(descending=True)
                    keep = sp.cumsum(0) - sp < s.top_p  # the smallest set whose mass reaches top_p
                    probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
                tok = int(torch.multinomial(probs.cpu(), 1, generator=self.gens[i]))
            out[i, tok] = 0.0
        return out


class _RowStops(StoppingCriteria):
    """Per-row stop: max_tokens, stop strings, EOS, cancellation; streams each row's new text."""

    def __init__(self, jobs: list[Job], tokenizer, prompt_len: int, eos: set[int]):
        self.jobs, self.tok, self.prompt_len, self.eos = jobs, tokenizer, prompt_len, eos
        self.done = [False] * len(jobs)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def __call__(self, input_ids, scores, **kwargs):
        for i, j in enumerate(self.jobs):
            if self.done[i]:
                continue
            s = j.request.sampling
            n_new = input_ids.shape[1] - self.prompt_len
            last = int(input_ids[i, -1]) if n_new else None
            reason = "stop" if last in self.eos else ("length" if n_new >= s.max_tokens else None)
            if j.cancelled:
                reason = reason or "cancelled"
            if reason is None and j.on_delta is None and not s.stop:
                continue  # nothing to look at in the text until the row ends: no decode on this step
            new = input_ids[i, self.prompt_len :].tolist()
            if last in self.eos:
                new = new[:-1]
            text = self._text(new)
            cut = min((k for k in (text.find(t) for t in s.stop) if k >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            j.completion_tokens = n_new
            self._emit(j, text, final=reason is not None)
            if reason is not None:
                self.done[i] = True
                j.finish_reason, j.text = reason, text
        return torch.tensor(self.done, device=input_ids.device)

    @staticmethod
    def _emit(j: Job, text: str, final: bool) -> None:
        hold = 0 if final else max((len(t) - 1 for t in j.request.sampling.stop), default=0)
        upto = len(text) - hold
        if not final and text[:upto].endswith("\ufffd"):  # an unfinished multi-byte character
            upto -= 1
        if upto > j._emitted and j.on_delta is not None:
            j.on_delta(text[j._emitted : upto])
        j._emitted = max(j._emitted, upto)


class Engine:
    """Runs batches of jobs on ``sm`` with the policy's vectors (see module docstring)."""

    def __init__(self, sm, policy):
        self.sm, self.policy = sm, policy
        tok = sm.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        eos = sm.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else ([eos] if eos is not None else [tok.eos_token_id]))
        self.max_positions = getattr(sm.model.config, "max_position_embeddings", None)

    def tokenize(self, req: Request) -> list[int]:
        return self.sm.tokenizer(req.prompt, add_special_tokens=req.kind != "chat")["input_ids"]

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Generate every job's completion in one batch; fills ``text``, ``finish_reason``, ``gates``."""
        sm, tok = self.sm, self.sm.tokenizer
        width = max(len(j.prompt_ids) for j in jobs)
        device = next(sm.model.parameters()).device
        ids = torch.full((len(jobs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        configs: dict = {}
        for j in jobs:
            for spec in j.request.steer:
                configs.setdefault(spec.config_key(), spec)
        sampling = any(j.request.sampling.temperature > 0 for j in jobs)
        stops = _RowStops(jobs, tok, width, self.eos)
        with contextlib.ExitStack() as stack:
            handles = {}
            for key, spec in configs.items():
                cfg = SteeringConfig(
                    layers=list(spec.layers) if spec.layers else None, mode=spec.mode, scope=spec.scope
                )
                h = stack.enter_context(sm.steer(self.policy.vectors[spec.vector], cfg))
                alphas = [next((s.alpha for s in j.request.steer if s.config_key() == key), 0.0) for j in jobs]
                h.set_alphas(alphas)
                h.begin(width)
                handles[key] = h
            out = sm.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(j.request.sampling.max_tokens for j in jobs),
                do_sample=sampling,
                top_k=0 if sampling else None,
                logits_processor=LogitsProcessorList([_RowSampler(jobs)]) if sampling else None,
                stopping_criteria=StoppingCriteriaList([stops]),
                pad_token_id=tok.pad_token_id,
            )
            for key, h in handles.items():
                scores, gate = getattr(h, "last_scores", None), getattr(h, "last_gate", None)
                if scores is None:
                    continue
                for i, j in enumerate(jobs):
                    if any(s.config_key() == key for s in j.request.steer):
                        j.gates[key[0]] = {"open": bool(gate[i]), "score": round(float(scores[i]), 6)}
        for i, j in enumerate(jobs):
            if j.finish_reason is None:  # not seen ending by the criterion (it runs after every step): keep it all
                new = out[i, width:].tolist()
                j.text, j.finish_reason, j.completion_tokens = (
                    tok.decode(new, skip_special_tokens=True),
                    "length",
                    len(new),
                )


class Scheduler:
    """A thread that takes waiting jobs in batches of at most ``max_batch`` and runs them on the engine. A job
    whose batch fails gets the error; the others in later batches are unaffected (handles come off in the
    engine's ``finally``)."""

    def __init__(self, engine: Engine, max_batch: int = 64, window_s: float = 0.005):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.q: queue.Queue = queue.Queue()
        self.stats = {"batches": 0, "max_batch_seen": 0}
        self.on_batch = None  # callable(size), e.g. a metrics histogram
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="steer-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for j in jobs:
            self.q.put(j)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    j = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if j is None:
                    self._stop.set()
                    break
                batch.append(j)
            batch = [j for j in batch if not j.cancelled]
            if batch:
                try:
                    self.engine.run(batch)
                except Exception as exc:  # one failed batch fails its jobs, and the server keeps serving
                    for j in batch:
                        j.error = exc
                self.stats["batches"] += 1
                self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                for j in batch:
                    if j.on_done is not None:
                        j.on_done(j)

    def close(self) -> None:
        """Finish the jobs already queued, then stop."""
        self.q.put(None)
        self.thread.join(timeout=60)
