"""steer serve against the official openai client (sync, async, streaming) on 127.0.0.1: equivalence with
SteeredModel.generate alone and among 63 concurrent requests with other vectors and α, gates per request,
OpenAI-shaped 4xx errors after which the server keeps serving, the API key, enforced vectors, faults."""

import asyncio
import json
import socket
import threading
import time

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from steer import SteeredModel, SteeringVector  # noqa: E402
from steer.serve.app import create_app  # noqa: E402
from steer.serve.protocol import Policy  # noqa: E402

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14", "w20 w21 w22"]


def _vectors():
    g = torch.Generator().manual_seed(11)
    safety = SteeringVector(
        {1: torch.randn(D, generator=g) * 4}, {"kind": "refusal", "recommended": {"alpha": 1.5, "layers": [1]}}
    )
    other = SteeringVector({2: torch.randn(D, generator=g) * 4}, {"kind": "custom"})
    cdir = torch.randn(D, generator=g)
    gated = SteeringVector(
        {2: torch.randn(D, generator=g) * 4},
        {
            "kind": "refusal",
            "condition": {"layer": 1, "threshold": 0.0},
            "recommended": {"mode": "conditional", "alpha": 2.0},
        },
        condition_direction=cdir,
    )
    return {"safety": safety, "other": other, "gated": gated}


class Server:
    def __init__(self, sm, policy, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(sm, policy, model_name="tiny", **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    policy = Policy(vectors=_vectors(), alpha_range=(-5.0, 5.0), max_tokens_limit=32, max_n=4)
    srv = Server(sm, policy)
    yield sm, srv
    srv.close()
    assert_unhooked(sm.model, sm.layers)


def _client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def _solo(sm, prompt, steer, max_tokens=8):
    """What SteeredModel.generate gives for one prompt with these vectors (α per vector), greedy."""
    import contextlib

    from steer.config import SteeringConfig

    vecs = _vectors()
    with contextlib.ExitStack() as stack:
        for name, a in steer:
            h = stack.enter_context(sm.steer(vecs[name], SteeringConfig()))
            h.set_alphas([a])
        return sm.generate([prompt], max_new_tokens=max_tokens)[0]


def test_chat_equals_generate(env):
    sm, srv = env
    c = _client(srv)
    r = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=8,
        temperature=0,
        extra_body={"steer": {"vector": "safety", "alpha": 2.0}},
    )
    want = sm.generate([PROMPTS[0]], vector=_vectors()["safety"], alphas=[2.0], max_new_tokens=8)[0]
    assert r.choices[0].message.content == want == _solo(sm, PROMPTS[0], [("safety", 2.0)])
    assert r.model_extra["steer"]["applied"] == [{"vector": "safety", "alpha": 2.0, "enforced": False}]
    plain = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.content == sm.generate([PROMPTS[0]], max_new_tokens=8)[0]
    auto = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=8,
        temperature=0,
        extra_body={"steer": {"vector": "safety", "alpha": "auto"}},
    )
    assert auto.model_extra["steer"]["applied"][0]["alpha"] == 1.5


def test_server_equals_the_steer_generate_command(tmp_path):
    """The same saved model, vector file, prompt and α: `steer generate --json` and the server agree."""
    from typer.testing import CliRunner

    from steer.cli import app

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    f = _vectors()["safety"].save(tmp_path / "safety.safetensors")
    r = CliRunner().invoke(
        app,
        ["generate", str(model_dir), "-p", PROMPTS[2], "--vector", str(f), "--alpha", "2.5", "--max-new-tokens", "8"]
        + ["--json"],
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["alpha"] == 2.5, r.output
    want = rows[0]["completion"]
    sm = SteeredModel.from_pretrained(str(model_dir))
    from steer.serve import load_policy

    srv = Server(sm, load_policy(sm, [f"safety={f}"]))
    try:
        got = _client(srv).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": PROMPTS[2]}],
            max_tokens=8,
            temperature=0,
            extra_body={"steer": {"vector": "safety", "alpha": 2.5}},
        )
    finally:
        srv.close()
    assert got.choices[0].message.content == want


def test_63_concurrent_requests_equal_solo_runs(env):
    sm, srv = env
    rng = torch.Generator().manual_seed(3)
    cases = []
    for i in range(63):
        p = PROMPTS[i % len(PROMPTS)]
        pick = int(torch.randint(0, 4, (1,), generator=rng))
        a = round(float(torch.rand(1, generator=rng)) * 4 - 1, 3)
        steer = [[], [("safety", a)], [("other", a)], [("safety", a), ("other", -a)]][pick]
        cases.append((p, steer))

    async def main():
        c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        calls = [
            c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": p}],
                max_tokens=8,
                temperature=0,
                extra_body={"steer": [{"vector": n, "alpha": a} for n, a in steer]} if steer else None,
            )
            for p, steer in cases
        ]
        try:
            return await asyncio.gather(*calls)
        finally:
            await c.close()

    outs = asyncio.run(main())
    for (p, steer), r in zip(cases, outs):
        assert r.choices[0].message.content == _solo(sm, p, steer), (p, steer)
    assert srv.app.state.scheduler.stats["max_batch_seen"] > 1  # requests really shared decode steps


def test_streaming_equals_non_streaming(env):
    sm, srv = env
    c = _client(srv)
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=10,
        temperature=0,
        extra_body={"steer": {"vector": "other", "alpha": 1.0}},
    )
    whole = c.chat.completions.create(**kw).choices[0].message.content
    parts, finish = [], None
    for ev in c.chat.completions.create(stream=True, **kw):
        if ev.choices and ev.choices[0].delta.content:
            parts.append(ev.choices[0].delta.content)
        if ev.choices and ev.choices[0].finish_reason:
            finish = ev.choices[0].finish_reason
    assert "".join(parts) == whole and finish in ("stop", "length")
    comp = c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=6, temperature=0)
    streamed = "".join(
        ev.choices[0].text
        for ev in c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=6, temperature=0, stream=True)
        if ev.choices
    )
    assert streamed == comp.choices[0].text


def test_gate_reported_per_request(env):
    sm, srv = env
    c = _client(srv)
    seen = set()
    for p in PROMPTS:
        r = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": p}],
            max_tokens=6,
            temperature=0,
            extra_body={"steer": {"vector": "gated"}},
        )
        gate = r.model_extra["steer"]["applied"][0]["gate"]
        with sm.steer(_vectors()["gated"]) as h:
            h.set_alphas([2.0])
            want = sm.generate([p], max_new_tokens=6)[0]
            assert gate == {"open": bool(h.last_gate[0]), "score": round(float(h.last_scores[0]), 6)}
        assert r.choices[0].message.content == want
        seen.add(gate["open"])
    assert seen == {True, False}  # both sides of the gate were exercised


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_scope_per_request_as_in_generate(env, scope):
    sm, srv = env
    c = _client(srv)
    vec = _vectors()["safety"]
    for p in PROMPTS[:3]:
        r = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": p}],
            max_tokens=6,
            temperature=0,
            extra_body={"steer": {"vector": "safety", "alpha": 3.0, "scope": scope}},
        )
        want = sm.generate([p], vector=vec, alphas=[3.0], scope=scope, max_new_tokens=6)[0]
        assert r.choices[0].message.content == want


def test_seeded_sampling_is_reproducible(env):
    sm, srv = env
    c = _client(srv)
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=8,
        temperature=0.9,
        top_p=0.9,
        seed=7,
    )
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    two = c.chat.completions.create(n=2, **kw)
    assert two.choices[0].message.content == a and len(two.choices) == 2


def _raw(srv, body, headers=None):
    return httpx.post(
        srv.url + "/v1/chat/completions",
        content=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "w5"}], "max_tokens": "8"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "w5"}], "max_tokens": 999}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "w5"}], "n": 9}, "n"),
        ({"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "nope"}}, "steer.vector"),
        (
            {"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "safety", "mode": "per_request"}},
            "steer",
        ),
        (
            {"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "safety", "mode": "merged"}},
            "steer.mode",
        ),
        ({"messages": [{"role": "user", "content": "w5"}], "ignore_eos": "yes"}, "ignore_eos"),
        (
            {"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "safety", "path": "/etc/passwd"}},
            "steer.path",
        ),
        ({"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "safety", "alpha": 50}}, "steer.alpha"),
        (
            '{"messages": [{"role": "user", "content": "w5"}], "steer": {"vector": "safety", "alpha": NaN}}',
            "steer.alpha",
        ),
        ({"messages": [{"role": "user", "content": " ".join(["w5"] * 130)}]}, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(env, body, param):
    sm, srv = env
    r = _raw(srv, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    ok = _raw(srv, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_api_key_and_enforced_vectors():
    torch.set_num_threads(1)
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    srv = Server(sm, Policy(vectors=_vectors(), enforce={"safety": 2.0}), api_key="s3cret")
    try:
        assert _raw(srv, {"messages": [{"role": "user", "content": "w5"}]}).status_code == 401
        bad_key = _raw(srv, {"messages": [{"role": "user", "content": "w5"}]}, {"authorization": "Bearer nope"})
        assert bad_key.status_code == 401 and bad_key.json()["error"]["type"] == "authentication_error"
        c = _client(srv, "s3cret")
        msg = [{"role": "user", "content": PROMPTS[0]}]
        r = c.chat.completions.create(model="tiny", messages=msg, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == _solo(sm, PROMPTS[0], [("safety", 2.0)])
        assert r.model_extra["steer"]["applied"] == [{"vector": "safety", "alpha": 2.0, "enforced": True}]
        with pytest.raises(openai.BadRequestError):  # no client can weaken it
            c.chat.completions.create(
                model="tiny", messages=msg, max_tokens=8, extra_body={"steer": {"vector": "safety", "alpha": 0}}
            )
        both = c.chat.completions.create(
            model="tiny",
            messages=msg,
            max_tokens=8,
            temperature=0,
            extra_body={"steer": {"vector": "other", "alpha": 1.0}},
        )
        assert both.choices[0].message.content == _solo(sm, PROMPTS[0], [("other", 1.0), ("safety", 2.0)])
    finally:
        srv.close()
    assert_unhooked(sm.model, sm.layers)


def test_a_failing_request_fails_alone(env):
    """A prefill that raises fails its own request with a 500; a request running meanwhile completes exactly as
    alone, its steering intact; afterwards no steering is left on the model and the server serves on."""
    sm, srv = env
    bad_id = sm.tokenizer("w30", add_special_tokens=False)["input_ids"][-1]

    def boom(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == bad_id).any()):
            raise RuntimeError("injected fault")

    fault = sm.model.register_forward_pre_hook(boom, with_kwargs=True)
    slow = _slow_steps(sm, 0.02)
    body = {"max_tokens": 16, "temperature": 0, "steer": {"vector": "safety", "alpha": 1.0}}
    out = {}

    def long_request():
        out["ok"] = _raw(srv, {**body, "messages": [{"role": "user", "content": PROMPTS[2]}]})

    try:
        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.15)  # the long request is decoding
        r = _raw(srv, {**body, "max_tokens": 2, "messages": [{"role": "user", "content": "w30 w5"}]})
        t.join(timeout=60)
    finally:
        fault.remove()
        slow.remove()
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
    assert out["ok"].status_code == 200
    assert out["ok"].json()["choices"][0]["message"]["content"] == _solo(sm, PROMPTS[2], [("safety", 1.0)], 16)
    deadline = time.time() + 10
    while srv.app.state.scheduler.engine.jobs and time.time() < deadline:
        time.sleep(0.02)
    assert_unhooked(sm.model, sm.layers)  # the failed request's steering came off, and the finished one's
    ok = _raw(srv, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_a_failing_decode_step_fails_its_rows_only(env):
    sm, srv = env
    calls = []

    def boom(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected decode fault")

    fault = sm.model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        r = _raw(
            srv,
            {
                "messages": [{"role": "user", "content": "w5"}],
                "max_tokens": 4,
                "steer": {"vector": "gated", "alpha": 1.0},
            },
        )
    finally:
        fault.remove()
    assert r.status_code == 500 and "injected decode fault" in r.json()["error"]["message"]
    assert_unhooked(sm.model, sm.layers)
    ok = _raw(srv, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_task_vectors_are_served_per_request():
    """A task vector (θ_aligned − θ_base) is served per row through the per-request path; each row equals its
    solo run. (Merged weights cannot differ per row: a request asking for mode 'merged' gets a 400, tested with
    the other bad requests.)"""
    from steer.vectors.task import compute_task_vector

    sm = SteeredModel(tiny_model("llama", seed=0), tiny_tokenizer())
    tau = compute_task_vector(tiny_model("llama", seed=1), tiny_model("llama", seed=0), progress=False)
    srv = Server(sm, Policy(vectors={"tau": tau}, alpha_range=(-2.0, 2.0), max_tokens_limit=32))
    try:
        outs = {}
        for a in (0.0, 0.5, 1.0):
            outs[a] = _client(srv).chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[1]}],
                max_tokens=6,
                temperature=0,
                extra_body={"steer": {"vector": "tau", "alpha": a, "mode": "per_request"}},
            )
    finally:
        srv.close()
    for a, r in outs.items():
        with sm.steer(tau, mode="per_request", alpha=a):
            assert r.choices[0].message.content == sm.generate([PROMPTS[1]], max_new_tokens=6)[0]
    assert_unhooked(sm.model, sm.layers)


def test_models_health_metrics(env):
    sm, srv = env
    models = httpx.get(srv.url + "/v1/models").json()
    vecs = models["data"][0]["steer"]["vectors"]
    assert set(vecs) == {"safety", "other", "gated"} and vecs["gated"]["conditional"] is True
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    text = httpx.get(srv.url + "/metrics").text
    assert "steer_requests_total" in text and "steer_batch_size_bucket" in text and "steer_vector_use_total" in text


def test_cli_serve_validates_vectors_before_serving(tmp_path):
    """A vector that does not fit the model stops `steer serve` at start-up with exit code 2 (nothing binds)."""
    from typer.testing import CliRunner

    from steer.cli import app

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    wrong = SteeringVector({1: torch.randn(D + 8)}).save(tmp_path / "wrong.safetensors")
    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(model_dir), "--vector", f"safety={wrong}"])
    assert r.exit_code == 2 and "hidden size" in r.output
    r = runner.invoke(app, ["serve", str(model_dir), "--vector", "no-equals-sign"])
    assert r.exit_code == 2 and "NAME=FILE" in r.output
    ok = SteeringVector({1: torch.randn(D)}).save(tmp_path / "ok.safetensors")
    r = runner.invoke(app, ["serve", str(model_dir), "--vector", f"s={ok}", "--enforce", "t:1"])
    assert r.exit_code == 2 and "not loaded" in r.output
    assert runner.invoke(app, ["serve", "--help"]).exit_code == 0


def _slow_steps(sm, seconds):
    """Each forward of the model sleeps a little, so that a request is still running when the client acts."""
    return sm.model.register_forward_pre_hook(lambda m, a: time.sleep(seconds))


def test_a_short_request_does_not_wait_for_a_long_one(env):
    """Continuous batching: a short request that arrives while a long one decodes joins the running batch and
    returns first; both equal their solo runs."""
    sm, srv = env
    slow = _slow_steps(sm, 0.02)
    done = {}

    def ask(name, prompt, max_tokens):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
        r = _raw(srv, {**body, "ignore_eos": True})
        done[name] = (time.perf_counter(), r.json()["choices"][0]["message"]["content"])

    try:
        long = threading.Thread(target=ask, args=("long", PROMPTS[2], 32))
        long.start()
        time.sleep(0.2)  # the long request is decoding
        ask("short", PROMPTS[0], 2)
        long.join(timeout=60)
    finally:
        slow.remove()
    assert done["short"][0] < done["long"][0]
    assert done["short"][1] == sm.generate([PROMPTS[0]], max_new_tokens=2, min_new_tokens=2)[0]
    assert done["long"][1] == sm.generate([PROMPTS[2]], max_new_tokens=32, min_new_tokens=32)[0]


def test_client_disconnect_mid_stream_stops_its_row(env):
    sm, srv = env
    sched = srv.app.state.scheduler
    seen = []
    sched.on_finished = lambda j: seen.append((j.finish_reason, j.completion_tokens))
    slow = _slow_steps(sm, 0.05)
    try:
        body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 32, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line and '"content": ""' not in line:
                    break  # the first generated text: go away
        deadline = time.time() + 10
        while not seen and time.time() < deadline:
            time.sleep(0.05)
    finally:
        slow.remove()
        sched.on_finished = None
    assert seen and seen[0][0] == "cancelled" and seen[0][1] < 32  # the row stopped early: its slot is free
    assert not sched.engine.jobs
    ok = _raw(srv, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_sigterm_finishes_requests_in_flight(tmp_path):
    """`steer serve` under SIGTERM: the request in flight completes, the engine drains and stops, the process
    exits."""
    import os
    import signal
    import subprocess
    import sys

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    vec = SteeringVector({1: torch.randn(D)}).save(tmp_path / "v.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slow = tmp_path / "slow.py"  # the served model sleeps per forward, so the request is in flight at SIGTERM
    slow.write_text(
        "import sys, time, transformers\n"
        "orig = transformers.PreTrainedModel.__call__\n"
        "def call(self, *a, **k):\n    time.sleep(0.05)\n    return orig(self, *a, **k)\n"
        "transformers.PreTrainedModel.__call__ = call\n"
        "from steer.cli import main\nsys.argv = ['steer'] + sys.argv[1:]\nmain()\n"
    )
    args = [sys.executable, str(slow), "serve", str(model_dir), "--vector", f"s={vec}", "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        result = {}

        def ask():
            body = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 24, "temperature": 0}
            result["r"] = httpx.post(url + "/v1/chat/completions", json={**body, "steer": {"vector": "s"}}, timeout=60)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.5)  # the request is being generated
        os.kill(proc.pid, signal.SIGTERM)
        t.join(timeout=60)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the signal after its graceful shutdown (so the exit status says SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "stopped after 1 requests" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
