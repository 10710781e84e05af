"""``steer serve``: an OpenAI-compatible HTTP server whose every request carries its own steering.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's request and response shapes,
``stream: true`` as server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). The request format is in :mod:`.protocol`; batching in :mod:`.engine`.
Vector files are read at start-up only; a request can name a loaded vector and nothing else, so no request
makes the server read or write a file. Errors are OpenAI-shaped JSON with a 4xx status and the server keeps
serving.
"""

import asyncio
import contextlib
import hmac
import json
import sys
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from steer.errors import SteerError
from steer.prompts import has_chat_template

from .engine import Engine, Job, Scheduler
from .protocol import APIError, Policy, Request, bad, parse_sampling, parse_steer


def create_app(sm, policy: Policy, *, model_name: str, api_key: str | None = None, max_batch: int = 64):
    """The ASGI app (FastAPI) serving ``sm`` under ``model_name``; ``app.state.scheduler`` runs the batches."""
    engine = Engine(sm, policy)
    scheduler = Scheduler(engine, max_batch=max_batch)
    registry = CollectorRegistry()
    m_requests = Counter(
        "steer_requests_total", "requests by endpoint and status", ["endpoint", "status"], registry=registry
    )
    m_tokens = Counter("steer_tokens_total", "prompt and completion tokens", ["kind"], registry=registry)
    m_vector = Counter("steer_vector_use_total", "requests steered by each vector", ["vector"], registry=registry)
    m_latency = Histogram("steer_request_seconds", "request latency", registry=registry)
    m_batch = Histogram(
        "steer_batch_size", "rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # shutdown: the batches already queued finish, then the engine thread stops (its handles are off)
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
        st = scheduler.stats
        print(
            f"steer serve: stopped after {st['requests']} requests ({st['steps']} decode steps); no steering left",
            file=sys.stderr,
        )

    app = FastAPI(title="steer serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_json(request: HTTPRequest) -> dict:
        raw = await request.body()
        if len(raw) > policy.max_body_bytes:
            raise APIError(413, f"request body over {policy.max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object", code="invalid_type")
        return body

    def parse(body: dict, kind: str) -> Request:
        model = body.get("model", model_name)
        if model != model_name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        if kind == "chat":
            msgs = body.get("messages")
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs
                )
            ):
                raise bad("messages must be a non-empty list of {role, content} strings", "messages", "invalid_type")
            tok = sm.tokenizer
            if has_chat_template(tok):
                prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            else:
                prompt = "\n".join(m["content"] for m in msgs)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("prompt must be a string", "prompt", "invalid_type")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("stream must be a boolean", "stream", "invalid_type")
        req = Request(
            kind, model_name, prompt, parse_sampling(body, policy), parse_steer(body.get("steer"), policy), stream
        )
        return req

    def jobs_for(req: Request) -> list[Job]:
        for i, spec in enumerate(req.steer):
            try:
                engine.resolved(spec)  # layers / mode / scope against the vector and the model, before queueing
            except SteerError as exc:
                raise bad(f"steer: {exc}", "steer" if len(req.steer) == 1 else f"steer[{i}]") from None
        ids = engine.tokenize(req)
        limit = engine.max_positions
        if limit is not None and len(ids) + req.sampling.max_tokens > limit:
            raise bad(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.sampling.max_tokens}) exceeds the model's "
                f"{limit} positions",
                "messages" if req.kind == "chat" else "prompt",
                "context_length_exceeded",
            )
        return [Job(req, index=i, prompt_ids=list(ids)) for i in range(req.sampling.n)]

    def steer_report(req: Request, jobs: list[Job]) -> dict:
        gates = jobs[0].gates if jobs else {}
        return {
            "applied": [
                {
                    "vector": s.vector,
                    "alpha": s.alpha,
                    "enforced": s.enforced,
                    **({"gate": gates[s.vector]} if s.vector in gates else {}),
                }
                for s in req.steer
            ]
        }

    async def complete(request: HTTPRequest, kind: str):
        t0 = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            check_key(request)
            req = parse(await read_json(request), kind)
            jobs = jobs_for(req)
        except APIError as exc:
            m_requests.labels(endpoint, str(exc.status)).inc()
            raise
        for s in req.steer:
            m_vector.labels(s.vector).inc()
        loop = asyncio.get_running_loop()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not req.stream:
            done = [loop.create_future() for _ in jobs]
            for j, f in zip(jobs, done):
                j.on_done = lambda job, f=f: loop.call_soon_threadsafe(f.set_result, job)
            scheduler.submit(jobs)
            try:
                await asyncio.gather(*done)
            except asyncio.CancelledError:
                for j in jobs:
                    j.cancelled = True
                raise
            failed = [j for j in jobs if j.error is not None]
            if failed:
                m_requests.labels(endpoint, "500").inc()
                raise APIError(500, f"generation failed: {type(failed[0].error).__name__}: {failed[0].error}")
            choices = []
            for j in jobs:
                c = {"index": j.index, "finish_reason": j.finish_reason if j.finish_reason != "cancelled" else "stop"}
                if kind == "chat":
                    c["message"] = {"role": "assistant", "content": j.text}
                else:
                    c["text"], c["logprobs"] = j.text, None
                choices.append(c)
            usage_c = sum(j.completion_tokens for j in jobs)
            m_tokens.labels("prompt").inc(len(jobs[0].prompt_ids))
            m_tokens.labels("completion").inc(usage_c)
            m_requests.labels(endpoint, "200").inc()
            m_latency.observe(time.perf_counter() - t0)
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": len(jobs[0].prompt_ids),
                    "completion_tokens": usage_c,
                    "total_tokens": len(jobs[0].prompt_ids) + usage_c,
                },
                "steer": steer_report(req, jobs),
            }

        events: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            j.on_delta = lambda text, j=j: loop.call_soon_threadsafe(events.put_nowait, ("delta", j, text))
            j.on_done = lambda job: loop.call_soon_threadsafe(events.put_nowait, ("done", job, None))
        scheduler.submit(jobs)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(j, text, finish=None, extra=None):
            if kind == "chat":
                delta = {"content": text} if text is not None else {}
                choice = {"index": j.index, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": j.index, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": [choice]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        async def gen():
            pending = len(jobs)
            try:
                if kind == "chat":
                    for j in jobs:
                        first = {"index": j.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        head = {"id": rid, "object": chunk_obj, "created": created, "model": model_name}
                        yield f"data: {json.dumps({**head, 'choices': [first]})}\n\n"
                while pending:
                    what, j, text = await events.get()
                    if what == "delta":
                        yield chunk(j, text)
                        continue
                    pending -= 1
                    if j.error is not None:
                        err = APIError(500, f"generation failed: {type(j.error).__name__}: {j.error}")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        continue
                    fin = j.finish_reason if j.finish_reason != "cancelled" else "stop"
                    yield chunk(j, None if kind == "chat" else "", fin, {"steer": steer_report(req, [j])})
                yield "data: [DONE]\n\n"
                m_requests.labels(endpoint, "200").inc()
                m_latency.observe(time.perf_counter() - t0)
            finally:
                for j in jobs:  # a client that went away stops its rows at the next step
                    j.cancelled = True

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, "completion")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        vectors = {
            name: {
                "kind": v.kind,
                "layers": v.layers,
                "recommended": v.recommended,
                "enforced": name in policy.enforce,
                "conditional": bool(v.condition),
            }
            for name, v in policy.vectors.items()
        }
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "steer",
                    "steer": {"vectors": vectors, "alpha_range": list(policy.alpha_range)},
                }
            ],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    scheduler.on_batch = m_batch.observe

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app
