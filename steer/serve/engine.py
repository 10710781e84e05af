"""The step-level engine behind ``steer serve`` (continuous batching over any transformers causal LM): requests
join the running batch and leave it between decode steps, each row with its own vectors, α, gate, sampling
parameters and stops, so a short request never waits for a long one.

One step of :class:`Scheduler`'s loop: the requests that arrived are prefilled together (one forward over their
left-padded prompts, which also decides each conditional vector's gate on their rows) and joined to the running
rows (:class:`steer.serve.kv.Rows`); then every running row is fed its next token in one decode forward; rows
that finished leave. One steering handle per distinct (vector, layers, mode, scope) among the running rows is
attached while a row uses it, with per-row values (the kind's neutral value, which leaves a row bit-exactly
unsteered, for the rows that do not use it); each row carries its gate decision (``Steering.set_gates``) when
the batch around it changes. Prefill and decode never share a forward, so a handle's token scope is decided per
forward: prefill = prompt tokens, decode = generated tokens (``begin(0)``).

Sampling is per row: greedy rows take the argmax, sampled rows draw with temperature and top-p from their own
generator (a seeded request gives the same text whatever its batchmates). A failure while prefilling new rows
fails those requests only (the running rows' cache is untouched); a failure in a decode step fails the rows in
it. Either way the handles of the failed rows come off. See docs/serving.md for the measurements behind this
design (against batch-level ``generate`` and transformers' own continuous batching).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from steer.config import SteeringConfig, per_request_modes
from steer.errors import ConfigError
from steer.kinds import KINDS, attach
from steer.resolve import resolve

from .kv import ModelIO, Rows
from .protocol import Request

# generation_config settings that change which token greedy decoding picks; the server samples with the
# request's parameters only (as OpenAI's API does) and says so at start-up when the model sets one of them
_PROCESSORS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "min_new_tokens",
    "min_length",
    "forced_bos_token_id",
    "forced_eos_token_id",
)
_NEUTRAL_PROCESSOR = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0}


MIN_TEMPERATURE = 1e-4  # below this, float32 softmax(logits / T) is one-hot (or overflows): greedy


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
    tokens: list[int] = field(default_factory=list)
    _emitted: int = 0
    _gen: torch.Generator | None = None
    _gate_open: dict = field(default_factory=dict)  # config key -> bool

    def generator(self) -> torch.Generator:
        if self._gen is None:
            s = self.request.sampling
            self._gen = torch.Generator()
            self._gen.manual_seed(s.seed + self.index if s.seed is not None else int(torch.randint(0, 2**62, (1,))))
        return self._gen


def _sample(logits: torch.Tensor, jobs: list[Job]) -> list[int]:
    """One token per row: the argmax for greedy rows, a draw with temperature and top-p for sampled rows."""
    picks = logits.argmax(-1).tolist()
    for i, j in enumerate(jobs):
        s = j.request.sampling
        if s.temperature < MIN_TEMPERATURE or j.finish_reason is not None:  # greedy, or a parked row
            continue
        probs = torch.softmax(logits[i].float().cpu() / s.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # logits that overflow: the argmax is the draw
            continue
        if s.top_p < 1.0:
            sp, idx = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < s.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
        picks[i] = int(torch.multinomial(probs, 1, generator=j.generator()))
    return picks


class Engine:
    """The model, its steering handles and the running rows (see the module docstring). Not thread-safe: the
    :class:`Scheduler` thread alone calls :meth:`add` and :meth:`step`."""

    def __init__(self, sm, policy):
        self.sm, self.policy = sm, policy
        tok = sm.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        gc = sm.model.generation_config
        eos = gc.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else ([eos] if eos is not None else [tok.eos_token_id]))
        self.max_positions = getattr(sm.model.config, "max_position_embeddings", None)
        self.io = ModelIO.of(sm.model)
        self.device = next(sm.model.parameters()).device
        changed = [
            n for n in _PROCESSORS if getattr(gc, n, None) not in (None, _NEUTRAL_PROCESSOR.get(n), [], {})
        ]  # fmt: skip
        if changed:
            warnings.warn(
                f"the model's generation_config sets {', '.join(changed)}; steer serve samples with each request's "
                "own parameters only (as OpenAI's API does), so its greedy text can differ from model.generate's",
                stacklevel=2,
            )
        self.jobs: list[Job] = []  # the running rows, in batch order
        self.rows: Rows | None = None
        self.handles: dict = {}  # config key -> (handle, Resolved), in canonical order
        self._dirty = True  # the handles' per-row values do not describe self.jobs
        self._resolved: dict = {}  # config key -> Resolved
        self._lock = threading.Lock()

    def tokenize(self, req: Request) -> list[int]:
        return self.sm.tokenizer(req.prompt, add_special_tokens=req.kind != "chat")["input_ids"]

    @property
    def can_join(self) -> bool:
        """Whether new rows may join now (a cache that cannot be merged takes new rows into an empty batch)."""
        return self.rows is None or self.rows.mergeable

    # ------------------------------------------------------------------ handles
    def resolved(self, spec):
        """``spec`` resolved against its vector and the model (validated; a SteerError says what is wrong).
        Pure (nothing is attached), so the HTTP layer calls it before queueing; results are kept per config key."""
        key = spec.config_key()
        with self._lock:  # the HTTP thread and the engine thread both resolve
            res = self._resolved.get(key)
        if res is None:
            cfg = SteeringConfig(layers=list(spec.layers) if spec.layers else None, mode=spec.mode, scope=spec.scope)
            res = resolve(cfg, self.policy.vectors[spec.vector], self.sm.model, layers_path=self.sm.layers_path)
            if not KINDS[res.kind].per_row:
                raise ConfigError(
                    f"vector {spec.vector!r} in mode {res.mode!r} cannot be applied per request",
                    expected="a per-request mode: " + ", ".join(per_request_modes()),
                    found=f"{res.kind} (mode {res.mode!r})",
                    fix="ask for mode 'per_request' (task vectors) or an op; bake merged weights with `steer bake`",
                )
            with self._lock:
                if len(self._resolved) >= 256:
                    self._resolved.pop(next(iter(self._resolved)))
                self._resolved[key] = res
        return res

    def _order(self, key) -> tuple:
        return (list(self.policy.vectors).index(key[0]), repr(key))

    def _ensure_handles(self, specs: dict) -> None:
        """Attach a handle for every config key in ``specs`` (key -> spec) not attached yet. Handles run in one
        canonical order (the policy's vector order), whatever order requests arrived in, so a request composing
        vectors gets the same result whoever shares its batch: when a new key sorts before attached ones, every
        handle is re-attached in order (rows' values and gates are set again before the next forward)."""
        new = {k: s for k, s in specs.items() if k not in self.handles}
        if not new:
            return
        resolved = {k: res for k, (_, res) in self.handles.items()}
        resolved.update((k, self.resolved(s)) for k, s in new.items())
        keys = sorted(resolved, key=self._order)
        if list(self.handles) != keys[: len(self.handles)]:
            self.close()  # an attached handle sorts after a new one: re-attach all, in order
        for key in keys:
            if key not in self.handles:
                self.handles[key] = (attach(self.sm.model, resolved[key]), resolved[key])
        self._dirty = True

    def _set_rows(self, jobs: list[Job], prompt_length: int, carry_gates: bool) -> None:
        """Give every handle one value per row of ``jobs`` (and the rows' gates when ``carry_gates``)."""
        for key, (h, res) in self.handles.items():
            neutral = KINDS[res.kind].neutral
            h.set_alphas(
                [
                    next((s.alpha for s in j.request.steer if s.config_key() == key), neutral)
                    if j.finish_reason is None
                    else neutral  # a finished row parked in a cache that cannot drop rows
                    for j in jobs
                ]
            )
            if res.condition is not None and carry_gates:
                h.set_gates([j._gate_open.get(key, False) for j in jobs])
            h.begin(prompt_length)

    def _drop_unused(self) -> None:
        used = {s.config_key() for j in self.jobs if j.finish_reason is None for s in j.request.steer}
        for key in [k for k in self.handles if k not in used]:
            self.handles.pop(key)[0].remove()

    def close(self) -> None:
        """Remove every handle (the model is as it was loaded)."""
        for h, _ in self.handles.values():
            h.remove()
        self.handles.clear()
        self._dirty = True

    # ------------------------------------------------------------------ rows in and out
    @torch.no_grad()
    def add(self, jobs: list[Job]) -> list[Job]:
        """Prefill ``jobs`` and join them to the running rows; returns the jobs that already finished (a first
        token that ends them, or an error, which fails these jobs only)."""
        try:
            return self._add(jobs)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not take the server down
            for j in jobs:
                j.error = exc
            self._dirty = True
            self._drop_unused()
            return jobs

    def _add(self, jobs: list[Job]) -> list[Job]:
        tok = self.sm.tokenizer
        self._ensure_handles({s.config_key(): s for j in jobs for s in j.request.steer})
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        self._set_rows(jobs, width, carry_gates=False)  # the prefill decides the gates of these rows
        self._dirty = True
        logits, cache = self.io.forward(self.sm.model, ids, mask, pos, None)
        for key, (h, res) in self.handles.items():
            if res.condition is None or h.last_gate is None:
                continue
            for i, j in enumerate(jobs):
                if any(s.config_key() == key for s in j.request.steer):
                    j._gate_open[key] = bool(h.last_gate[i])
                    j.gates[key[0]] = {"open": bool(h.last_gate[i]), "score": round(float(h.last_scores[i]), 6)}
        picks = _sample(logits, jobs)
        rows = Rows.from_prefill(cache, mask, torch.tensor(picks, device=self.device))
        done = self._record(jobs, picks)
        jobs = _without_finished(rows, jobs)
        if not jobs:
            self._drop_unused()
            return done
        if self.rows is None:
            self.rows = rows
        else:
            self.rows.join(rows)
        self.jobs.extend(jobs)
        self._drop_unused()
        return done

    @torch.no_grad()
    def step(self) -> list[Job]:
        """One decode step for every running row; returns the jobs that finished (or failed: an error in the
        step fails the rows still running in it, and their steering comes off)."""
        if not self.jobs:
            return []
        done: list[Job] = []
        try:
            if self._dirty:
                self._set_rows(self.jobs, 0, carry_gates=True)  # 0: every token fed now is a generated one
                self._dirty = False
            r = self.rows
            mask = r.step_mask()
            logits, cache = self.io.forward(self.sm.model, r.next_ids[:, None], mask, r.pos[:, None], r.cache)
            picks = _sample(logits, self.jobs)
            r.advance(cache, mask, torch.tensor(picks, device=self.device))
            done = self._record(self.jobs, picks)
            if done:
                self.jobs = _without_finished(r, self.jobs)
                if not self.jobs:
                    self.rows = None
                self._dirty = True
                self._drop_unused()
        except Exception as exc:  # noqa: BLE001 - fail the rows of this step, keep serving
            return done + self.fail_all(exc)
        return done

    def fail_all(self, exc: Exception) -> list[Job]:
        """Fail every running row and take all steering off (a failed step, or the scheduler's last resort)."""
        failed = [j for j in self.jobs if j.finish_reason is None]
        for j in failed:
            j.error = exc
        self.jobs, self.rows = [], None
        self.close()
        return failed

    def _record(self, jobs: list[Job], picks: list[int]) -> list[Job]:
        """Append each row's new token; finish rows at EOS, ``max_tokens``, a stop string or cancellation;
        stream new text."""
        done = []
        for j, t in zip(jobs, picks):
            if j.finish_reason is not None:  # parked
                continue
            j.tokens.append(t)
            s = j.request.sampling
            eos = t in self.eos and not s.ignore_eos
            reason = "stop" if eos else ("length" if len(j.tokens) >= s.max_tokens else None)
            if j.cancelled:
                reason = reason or "cancelled"
            if reason is None and j.on_delta is None and not s.stop:
                continue  # nothing to look at in the text until the row ends: no decode on this step
            new = j.tokens[:-1] if eos else j.tokens
            text = self.sm.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((k for k in (text.find(x) for x in s.stop) if k >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            j.completion_tokens = len(j.tokens)
            _emit(j, text, final=reason is not None)
            if reason is not None:
                j.finish_reason, j.text = reason, text
                done.append(j)
        return done


def _without_finished(rows: Rows, jobs: list[Job]) -> list[Job]:
    """``jobs`` without the finished ones, their rows cut from ``rows`` ([] when none is left). A cache that
    cannot drop rows keeps finished rows parked (neutral values, output ignored) until its batch empties."""
    live = [i for i, j in enumerate(jobs) if j.finish_reason is None]
    if not live:
        return []
    if rows.mergeable and len(live) < len(jobs):
        rows.keep(live)
        return [jobs[i] for i in live]
    return jobs


def _emit(j: Job, text: str, final: bool) -> None:
    """Stream the part of ``text`` not sent yet, holding back what could still become a stop string or an
    unfinished multi-byte character."""
    hold = 0 if final else max((len(t) - 1 for t in j.request.sampling.stop), default=0)
    upto = len(text) - hold
    if not final and text[:upto].endswith("\ufffd"):
        upto -= 1
    if upto > j._emitted and j.on_delta is not None:
        try:
            j.on_delta(text[j._emitted : upto])
        except Exception as exc:  # noqa: BLE001 - this client's stream is gone; the others are not affected
            j.cancelled = True
            warnings.warn(f"steer serve: a stream callback failed: {exc!r}", RuntimeWarning, stacklevel=1)
    j._emitted = max(j._emitted, upto)


class Scheduler:
    """A thread that runs the engine's loop: admit waiting jobs (up to ``max_batch`` running rows), prefill
    them, decode one step, hand finished jobs back (``on_done``). ``max_batch=1`` serves one request at a
    time."""

    def __init__(self, engine: Engine, max_batch: int = 64, window_s: float = 0.002):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.q: queue.Queue = queue.Queue()
        self.waiting: deque = deque()
        self.stats = {"requests": 0, "steps": 0, "prefills": 0, "max_batch_seen": 0}
        self.on_batch = None  # callable(rows) per decode step, e.g. a metrics histogram
        self.on_finished = None  # callable(job) per finished job, before its on_done
        self._closing = False
        self.thread = threading.Thread(target=self._loop, name="steer-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for j in jobs:
            self.q.put(j)

    def _take(self, block: bool) -> None:
        """Move arrived jobs from the queue to ``waiting`` (blocking briefly when there is nothing to do)."""
        try:
            first = self.q.get(timeout=0.1) if block else self.q.get_nowait()
        except queue.Empty:
            return
        items, deadline = [first], time.monotonic() + (self.window_s if block else 0.0)
        while True:  # a burst that arrives together is prefilled together
            try:
                items.append(self.q.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for j in items:
            if j is None:
                self._closing = True
            else:
                self.waiting.append(j)

    def _finish(self, jobs: list[Job]) -> None:
        for j in jobs:
            self.stats["requests"] += 1
            for callback in (self.on_finished, j.on_done):
                if callback is None:
                    continue
                try:
                    callback(j)
                except Exception as exc:  # noqa: BLE001 - e.g. a closed event loop: the engine serves on
                    warnings.warn(f"steer serve: a completion callback failed: {exc!r}", RuntimeWarning, stacklevel=1)

    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                try:
                    if self._iteration():
                        break
                except Exception as exc:  # noqa: BLE001 - last resort: fail what is in flight, serve on
                    warnings.warn(f"steer serve: engine step failed: {exc!r}", RuntimeWarning, stacklevel=1)
                    self._finish(eng.fail_all(exc))
        finally:
            eng.close()

    def _iteration(self) -> bool:
        """One loop of the engine thread; True when it is time to stop."""
        eng = self.engine
        self._take(block=not eng.jobs and not self.waiting)
        gone = [j for j in self.waiting if j.cancelled]
        for j in gone:
            self.waiting.remove(j)
            j.finish_reason = "cancelled"
        self._finish(gone)
        room = self.max_batch - len(eng.jobs) if eng.can_join else 0
        if room > 0 and self.waiting:
            new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            self.stats["prefills"] += 1
            self._finish(eng.add(new))
        if eng.jobs:
            running = sum(j.finish_reason is None for j in eng.jobs)
            self._finish(eng.step())
            self.stats["steps"] += 1
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], running)
            if self.on_batch is not None:
                self.on_batch(running)
            return False
        return self._closing and not self.waiting and self.q.empty()

    def close(self) -> None:
        """Finish the jobs running and queued, then stop (every handle comes off)."""
        self.q.put(None)
        self.thread.join(timeout=120)
