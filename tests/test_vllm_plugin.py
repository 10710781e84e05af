"""steer's vLLM plugin on vllm-cpu (offline `LLM`, engine in this process): per request α / vector / layers /
scope through `SamplingParams.extra_args["steer"]`, compared with steer's transformers path (greedy tokens
equal, logprobs within 1e-3 in fp32), for a Llama-style model (hidden, residual) and GPT-2 (one stream).
Runs where vLLM is installed (`make test-vllm`); skipped elsewhere.
"""

import json
import os

import pytest
import torch
from tiny_models import tiny_tokenizer, wide_model

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process (no spawn; errors surface)

from steer import SteeredModel, SteeringVector  # noqa: E402

LONG = [4] + [10 + (7 * i) % 80 for i in range(67)] + [5, 6]  # 70 tokens: two 32-token cache blocks, five chunks
PROMPTS = [[4, 10, 11, 12, 5, 6], [4, 20, 21, 5, 6], [4, 30, 31, 32, 33, 34, 35, 5, 6], LONG]
N = 8


def _engine(path):
    return vllm.LLM(
        str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        seed=0,
        block_size=32,  # the CPU attention backend takes multiples of 32
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
    )


@pytest.fixture(scope="module", params=["llama", "qwen3", "gpt2"])
def engine(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"vllm_{family}")
    model = wide_model(family)
    model.save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    g = torch.Generator().manual_seed(7)
    vecs = {
        "a": SteeringVector({1: torch.randn(64, generator=g) * 3}, {"kind": "custom"}),
        "b": SteeringVector({2: torch.randn(64, generator=g) * 3, 0: torch.randn(64, generator=g)}, {"kind": "custom"}),
        "abl": SteeringVector(
            {1: torch.randn(64, generator=g)}, {"kind": "refusal", "recommended": {"mode": "ablate"}}
        ),
        "aa": SteeringVector(
            {2: torch.randn(64, generator=g) * 3}, {"kind": "refusal", "recommended": {"mode": "ablate_add"}}
        ),
        "src": SteeringVector(  # steers layer 2 with layer 1's direction, as its file recommends
            {i: torch.randn(64, generator=g) * 3 for i in range(3)},
            {"kind": "refusal", "recommended": {"layers": [2], "source_layer": 1}},
        ),
    }
    # a gate read at block 0's last prompt token, with its threshold between the prompts' scores (both sides)
    cdir = torch.randn(64, generator=g)
    with torch.no_grad():
        scores = [
            float(model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[1][0, -1] @ cdir)
            / float(cdir.norm())
            for p in PROMPTS
        ]
    with torch.no_grad():
        means = [
            float(model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[1][0].mean(0) @ cdir)
            / float(cdir.norm())
            for p in PROMPTS
        ]
    vecs["gmean"] = SteeringVector(  # the same gate, reading the mean over the prompt's tokens
        {2: torch.randn(64, generator=g) * 4},
        {
            "kind": "refusal",
            "condition": {"layer": 0, "threshold": sorted(means)[1] + 1e-3, "reduce": "mean"},
            "recommended": {"mode": "conditional", "scope": "generated"},
        },
        condition_direction=cdir,
    )
    vecs["gated"] = SteeringVector(
        {2: torch.randn(64, generator=g) * 4},
        {
            "kind": "refusal",
            "condition": {"layer": 0, "threshold": sorted(scores)[1] + 1e-3},
            "recommended": {"mode": "conditional", "scope": "generated"},
        },
        condition_direction=cdir,
    )
    files = {n: v.save(root / f"{n}.safetensors") for n, v in vecs.items()}
    env = {"STEER_VECTORS": ",".join(f"{n}={f}" for n, f in files.items())}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # prefix caching on (the default) with 32-token blocks, and chunked prefill with a 16-token budget: every
        # test below runs under both
        llm = _engine(root / "m")
        yield family, llm, SteeredModel(model, tiny_tokenizer()), vecs, root / "m"
        del llm
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(llm, cases, cached=None):
    """cases: [(prompt ids, steer spec or None)] in one generate call (one scheduled batch)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0,
            max_tokens=N,
            ignore_eos=True,
            logprobs=0,
            extra_args={"steer": json.dumps(spec)} if spec is not None else None,
        )
        for _, spec in cases
    ]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in cases], params, use_tqdm=False)
    if cached is not None:
        cached.extend(o.num_cached_tokens for o in outs)
    return [
        (list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
        for o in outs
    ]


def _hf(sm, vecs, ids, spec):
    """Greedy tokens and their logprobs from steer's transformers path (hooks) for one request."""
    import contextlib

    from steer.config import SteeringConfig

    specs = [] if spec is None else (spec if isinstance(spec, list) else [spec])
    specs = sorted(specs, key=lambda s: list(vecs).index(s["vector"]))  # the plugin composes in load order
    toks, lps = [], []
    x = torch.tensor([ids])
    with contextlib.ExitStack() as stack, torch.no_grad():
        for s in specs:
            cfg = SteeringConfig(layers=s.get("layers"), scope=s.get("scope"))
            h = stack.enter_context(sm.steer(vecs[s["vector"]], cfg))
            h.set_alphas([s["alpha"]])
            h.begin(len(ids))
        for _ in range(N):  # no KV cache: every step re-runs the sequence, the prompt length fixed by begin()
            logits = sm.model(input_ids=x).logits[0, -1].float()
            t = int(logits.argmax())
            toks.append(t)
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            x = torch.cat([x, torch.tensor([[t]])], dim=1)
    return toks, lps


CASES = [
    None,
    {"vector": "a", "alpha": 0.0},
    {"vector": "a", "alpha": 2.0},
    {"vector": "b", "alpha": -1.5},
    [{"vector": "a", "alpha": 1.0}, {"vector": "b", "alpha": 1.0}],
    {"vector": "b", "alpha": 2.0, "layers": [2]},
    {"vector": "a", "alpha": 3.0, "scope": "prompt"},
    {"vector": "a", "alpha": 3.0, "scope": "generated"},
    {"vector": "abl", "alpha": 1.0},
    {"vector": "aa", "alpha": 1.5},
    [{"vector": "abl", "alpha": 1.0}, {"vector": "a", "alpha": 2.0}],
    {"vector": "src", "alpha": 1.5},
    {"vector": "gated", "alpha": 4.0},
    {"vector": "gated", "alpha": 4.0},
    {"vector": "gated", "alpha": 4.0},
    {"vector": "gated", "alpha": 4.0},
]


def test_each_request_equals_steers_transformers_path(engine):
    family, llm, sm, vecs, path = engine
    cases = [(PROMPTS[i % len(PROMPTS)], spec) for i, spec in enumerate(CASES)]
    mixed = _run(llm, cases)  # every spec in one batch
    for (ids, spec), (toks, lps) in zip(cases, mixed):
        want_toks, want_lps = _hf(sm, vecs, ids, spec)
        assert toks == want_toks, (family, spec)
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-3, (family, spec)
        gated = isinstance(spec, dict) and spec["vector"] in ("gated", "gmean")  # the gate test checks closed ones
        if spec is not None and spec != CASES[1] and not gated:  # steering really changed the model
            plain = _hf(sm, vecs, ids, None)
            assert max(abs(a - b) for a, b in zip(lps, plain[1])) > 1e-3 or toks != plain[0], (family, spec)


def test_mixed_batch_equals_requests_alone_and_unsteered_equals_vanilla(engine):
    family, llm, sm, vecs, path = engine
    cases = [(PROMPTS[i % len(PROMPTS)], spec) for i, spec in enumerate(CASES)]
    mixed = _run(llm, cases)
    for case, got in zip(cases, mixed):
        # same tokens; logprobs to a few ulps (vLLM's own CPU kernels are not bit-invariant to the batch shape:
        # GPT-2 shows it on unsteered requests too, and the plugin's op is row-wise, so it adds none of its own)
        (alone,) = _run(llm, [case])
        assert alone[0] == got[0], (family, case[1])
        assert max(abs(a - b) for a, b in zip(alone[1], got[1])) < 1e-5, (family, case[1])
    vanilla = [_hf(sm, vecs, ids, None) for ids, _ in cases[:2]]
    assert [m[0] for m in mixed[:2]] == [v[0] for v in vanilla]  # no steer field, and α = 0: vanilla tokens
    assert mixed[0] == mixed[1] or PROMPTS[0] != PROMPTS[1 % len(PROMPTS)]


def test_bad_steer_fields_are_refused_before_scheduling(engine):
    from vllm import SamplingParams

    try:
        from vllm.exceptions import VLLMValidationError as refused
    except ImportError:  # older vLLM: the ValueError itself
        refused = ValueError
    family, llm, sm, vecs, path = engine
    for bad in (
        {"vector": "nope"},
        {"vector": "a", "alpha": float("nan")},
        {"vector": "a", "mode": "ablate"},
        {"vector": "gated", "alpha": 1.0, "scope": "prompt"},  # a gated vector steers generated tokens here
        {"vector": "b", "alpha": 1.0, "layers": [1]},  # b has no direction at layer 1
    ):
        sp = SamplingParams(max_tokens=2, extra_args={"steer": json.dumps(bad)})
        with pytest.raises(refused, match="steer"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], sp, use_tqdm=False)
    assert _run(llm, [(PROMPTS[0], None)])  # and the engine serves on


def test_prefix_cache_never_serves_blocks_across_steerings(engine):
    """The long prompt's blocks cached under one steering are reused by the same steering (cache on), never by
    another steering or by an unsteered request (salted), and every output equals its transformers run."""
    family, llm, sm, vecs, path = engine
    steered = {"vector": "a", "alpha": 3.0}
    other = {"vector": "a", "alpha": -3.0}
    seen = []
    for spec in (steered, steered, None, None, other, steered):
        got = _run(llm, [(LONG, spec)], cached=seen)[0]
        want = _hf(sm, vecs, LONG, spec)
        assert got[0] == want[0] and max(abs(a - b) for a, b in zip(got[1], want[1])) < 1e-3, (family, spec)
    # [steered, steered again, plain, plain again, other α, steered]: hits only within one steering
    assert seen[1] > 0 and seen[3] > 0, seen  # the cache is on and used
    assert seen[2] == 0 and seen[4] == 0, seen  # a new steering (or none) computes its own blocks
    assert seen[5] > 0, seen


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    model = wide_model("opt")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    f = SteeringVector({1: torch.randn(64)}, {"kind": "custom"}).save(tmp_path / "v.safetensors")
    old = os.environ.get("STEER_VECTORS")
    os.environ["STEER_VECTORS"] = f"v={f}"
    try:
        with pytest.raises(Exception, match="cannot steer OPTForCausalLM"):
            _engine(tmp_path / "m")
    finally:
        if old is None:
            os.environ.pop("STEER_VECTORS", None)
        else:
            os.environ["STEER_VECTORS"] = old


def test_openai_server_takes_steer_serves_json_in_vllm_xargs(tmp_path):
    """`vllm serve` with the plugin installed: the official openai client sends steer serve's `steer` JSON in
    `vllm_xargs`; completions equal steer's transformers path; a bad steer field is a 400; no steer is vanilla."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    model = wide_model("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(3)) * 3}, {"kind": "custom"})
    f = vec.save(tmp_path / "a.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STEER_VECTORS": f"a={f}", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # `python -m` the OpenAI server (what `vllm serve` runs; vllm-cpu's `vllm` script looks up the distribution
    # "vllm" for its --version and fails under the name vllm-cpu)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tmp_path / "m"),
        "--enforce-eager",
    ]
    cmd += ["--dtype", "float32", "--max-model-len", "128", "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail("vllm serve exited:\n" + proc.stdout.read().decode()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        sm = SteeredModel(model, tiny_tokenizer())
        for spec in (None, {"vector": "a", "alpha": 2.5}, {"vector": "a", "alpha": -2.0, "scope": "generated"}):
            r = client.chat.completions.create(
                model=str(tmp_path / "m"),
                messages=[{"role": "user", "content": "w10 w11 w12"}],
                max_tokens=8,
                temperature=0,
                extra_body={"vllm_xargs": {"steer": json.dumps(spec)}} if spec else None,
            )
            kw = {} if spec is None else {"vector": vec, "alphas": [spec["alpha"]], "scope": spec.get("scope")}
            want = sm.generate(["w10 w11 w12"], max_new_tokens=8, **kw)[0]
            assert r.choices[0].message.content.split() == want.split(), spec  # (vLLM's detokenizer adds a space)
        with pytest.raises(openai.BadRequestError, match="unknown vector"):
            client.chat.completions.create(
                model=str(tmp_path / "m"),
                messages=[{"role": "user", "content": "w10"}],
                max_tokens=2,
                extra_body={"vllm_xargs": {"steer": json.dumps({"vector": "nope"})}},
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_gate_decides_per_request_on_both_sides_under_chunked_prefill(engine):
    """Each prompt's gate (LONG's decided in its last of 5 prefill chunks) equals transformers' decision; the
    open ones are steered, the closed ones equal the unsteered run."""
    family, llm, sm, vecs, path = engine
    cases = [(p, {"vector": v, "alpha": 4.0}) for v in ("gated", "gmean") for p in PROMPTS]
    got = _run(llm, cases)
    opened = []
    for (ids, spec), (toks, lps) in zip(cases, got):
        want = _hf(sm, vecs, ids, spec)
        plain = _hf(sm, vecs, ids, None)
        assert toks == want[0] and max(abs(a - b) for a, b in zip(lps, want[1])) < 1e-3, family
        opened.append(want != plain)
    for half in (opened[: len(PROMPTS)], opened[len(PROMPTS) :]):  # last-token and mean gates
        assert any(half) and not all(half), opened  # both sides of each gate


# last of the engine tests: building and dropping a second engine in this process resets vLLM's distributed
# state, which the module's engine needs
def test_unsteered_requests_are_bit_for_bit_vanilla_vllm(engine):
    """The same requests (no steer field, and α = 0) on an engine without the plugin's vectors: identical tokens and
    identical logprobs, bit for bit."""
    family, llm, sm, vecs, path = engine
    cases = [(p, None) for p in PROMPTS] + [(p, {"vector": "a", "alpha": 0.0}) for p in PROMPTS]
    with_plugin = _run(llm, cases)
    saved = os.environ.pop("STEER_VECTORS")
    try:
        vanilla = _engine(path)
        try:
            plain = _run(vanilla, [(p, None) for p, _ in cases])
        finally:
            del vanilla
    finally:
        os.environ["STEER_VECTORS"] = saved
    assert with_plugin == plain, family
