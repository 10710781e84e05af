"""Hook semantics on a tiny Llama: token scope under the KV cache and left padding, per-request α,
the conditional gate, the input site, and hooks that always come off."""

import contextlib

import pytest
import torch
from capture import around, assert_unhooked, greedy
from tiny_models import D, V

from steer import Condition, SteeredModel, SteeringVector
from steer.errors import AlphaError, ConfigError, LayerError
from steer.kernels import use


@pytest.fixture(autouse=True)
def reference_kernel():
    previous = use("reference")
    yield
    use(previous)


def _left_padded():
    ids = torch.tensor([[0, 0, 7, 8, 9], [10, 11, 12, 13, 14]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_scope_under_kv_cache_and_left_padding(sm, vec, scope):
    ids, attn = _left_padded()
    with around(sm.layers[2], lambda: sm.steer(vec, alpha=1.5, layers=[2], scope=scope)) as (pre, post, _):
        greedy(sm, ids, attn)
    assert [p.shape[1] for p in pre] == [5, 1, 1, 1]
    for step, (a, b) in enumerate(zip(pre, post)):
        steered = scope == "all" or (scope == "prompt") == (step == 0)
        assert torch.equal(b, a + 1.5 * vec.directions[2] if steered else a), (scope, step)


def test_prompt_length_splits_a_chunk(sm, vec):
    """An explicit prompt length shorter than the chunk steers only the positions past it (generated)."""
    ids, attn = _left_padded()
    with around(sm.layers[1], lambda: sm.steer(vec, alpha=2.0, layers=[1], scope="generated")) as (pre, post, h):
        h.begin(3)
        with torch.no_grad():
            sm.model(ids, attention_mask=attn)
    a, b = pre[0], post[0]
    assert torch.equal(b[:, :3], a[:, :3])
    assert torch.equal(b[:, 3:], a[:, 3:] + 2.0 * vec.directions[1])


def test_mixed_alpha_rows_match_uniform_batches_and_solo_runs(sm, vec):
    prompts = ["w7 w8 w9", "w10 w11 w12 w13 w14", "w20 w21", "w30 w31 w32 w33"]
    alphas = [0.0, 1.0, 2.5, -1.0]
    mixed = sm.generate(prompts, vector=vec, alphas=alphas, layers=[1, 2], max_new_tokens=6)
    for i, a in enumerate(alphas):
        uniform = sm.generate(prompts, vector=vec, alphas=a, layers=[1, 2], max_new_tokens=6)
        assert uniform[i] == mixed[i]
        solo = sm.generate([prompts[i]], vector=vec, alphas=a, layers=[1, 2], max_new_tokens=6)
        assert solo[0] == mixed[i]
    assert mixed[0] == sm.generate([prompts[0]], max_new_tokens=6)[0]  # α = 0 is exactly unsteered
    # logits: a mixed-α batch row equals the same row of a uniform-α batch (fp32, 1e-5)
    texts = sm.format(prompts)
    enc = sm.encode(texts, chat_applied=True)
    with sm.steer(vec, layers=[1, 2]) as h:
        h.set_alphas(alphas)
        with torch.no_grad():
            mixed_logits = sm.model(**enc).logits
        for i, a in enumerate(alphas):
            h.set_alphas([a] * len(prompts))
            with torch.no_grad():
                uni = sm.model(**enc).logits
            torch.testing.assert_close(mixed_logits[i], uni[i], atol=1e-5, rtol=0)


def test_zero_alpha_row_is_bit_exact(sm, vec):
    ids, attn = _left_padded()
    with torch.no_grad():
        base = sm.model(ids, attention_mask=attn).logits
    with sm.steer(vec, layers=[0, 1, 2, 3]) as h:
        h.set_alphas([0.0, 3.0])
        with torch.no_grad():
            out = sm.model(ids, attention_mask=attn).logits
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])


def test_conditional_gate_per_row_held_for_generated_tokens(sm, vec):
    ids, attn = _left_padded()
    cdir = torch.randn(D)
    with torch.no_grad():
        hs = sm.model(ids, attention_mask=attn, output_hidden_states=True).hidden_states[1 + 1]
    scores = hs[:, -1] @ (cdir / cdir.norm())
    threshold = float(scores.mean())  # one row above, one below
    cond = Condition(layer=1, direction=cdir, threshold=threshold)
    with around(sm.layers[2], lambda: sm.steer(vec, alpha=2.0, layers=[2], condition=cond)) as (pre, post, h):
        greedy(sm, ids, attn)
        gate = h.last_gate.clone()
    assert gate.tolist() == (scores > threshold).tolist() and gate.any() and not gate.all()
    assert len(pre) == 4
    for a, b in zip(pre, post):  # decided at prefill, held for every decode step
        for row in range(2):
            want = a[row] + 2.0 * vec.directions[2] if gate[row] else a[row]
            assert torch.equal(b[row], want)


def test_gate_reads_its_block_before_any_steering_there_whatever_the_attach_order(sm, vec):
    """A condition at layer 1 and another vector steering layer 1: the gate's score is the unsteered block output
    (what it was calibrated on) whether the other handle was attached before or after it."""
    ids, attn = _left_padded()
    cdir = torch.randn(D)
    with torch.no_grad():
        hs = sm.model(ids, attention_mask=attn, output_hidden_states=True).hidden_states[1 + 1]
    want = hs[:, -1].float() @ (cdir / cdir.norm())
    cond = Condition(layer=1, direction=cdir, threshold=0.0)
    other = SteeringVector({1: torch.randn(D) * 5})
    for order in ("gate first", "other first"):
        with contextlib.ExitStack() as stack:
            if order == "other first":
                stack.enter_context(sm.steer(other, alpha=3.0))
            g = stack.enter_context(sm.steer(vec, alpha=2.0, layers=[2], condition=cond))
            if order == "gate first":
                stack.enter_context(sm.steer(other, alpha=3.0))
            with torch.no_grad():
                sm.model(ids, attention_mask=attn)
            assert torch.equal(g.last_scores, want), order


def test_a_mean_gate_averages_the_prompt_with_or_without_an_attention_mask(sm, vec):
    """reduce='mean' is the mean over the prompt's tokens, also for a forward given no attention mask (it used
    to fall back to the last token there)."""
    ids = torch.tensor([[4, 10, 11, 12, 5, 6]])
    cdir = torch.randn(D)
    with torch.no_grad():
        hs = sm.model(ids, output_hidden_states=True).hidden_states[1 + 1]
    want = hs[0].float().mean(0) @ (cdir / cdir.norm())
    cond = Condition(layer=1, direction=cdir, threshold=0.0, reduce="mean")
    for mask in (None, torch.ones_like(ids)):
        with sm.steer(vec, alpha=2.0, layers=[2], condition=cond) as h, torch.no_grad():
            sm.model(ids, attention_mask=mask)
            torch.testing.assert_close(h.last_scores[0], want, atol=1e-5, rtol=0)


def test_conditional_from_vector_file_and_ordering_error(sm, vec, tmp_path):
    cond_vec = SteeringVector(
        dict(vec.directions),
        {"condition": {"layer": 3, "threshold": 0.0}, "recommended": {"layers": [1], "mode": "conditional"}},
        condition_direction=torch.randn(D),
    )
    with pytest.raises(ConfigError, match="condition is read after"):
        sm.steer(cond_vec)
    assert_unhooked(sm.model, sm.layers)
    ok = sm.steer(cond_vec, scope="generated")
    assert ok.condition.layer == 3
    ok.remove()
    with pytest.raises(ConfigError, match="needs a condition"):
        sm.steer(vec, mode="conditional")


def test_input_site_equals_previous_output_site(sm, vec):
    ids, attn = _left_padded()
    v1 = SteeringVector({2: vec.directions[2]})
    with sm.steer(v1, alpha=1.0, layers=[2], site="input"):
        with torch.no_grad():
            a = sm.model(ids, attention_mask=attn).logits
    with sm.steer(v1, alpha=1.0, layers=[1], source_layer=2):
        with torch.no_grad():
            b = sm.model(ids, attention_mask=attn).logits
    assert torch.equal(a, b)


def test_num_return_sequences_repeats_row_alphas(sm, vec):
    ids, attn = _left_padded()
    with sm.steer(vec, layers=[1]) as h:
        h.set_alphas([0.0, 2.0])
        with torch.no_grad():
            out = sm.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=3,
                do_sample=False,
                num_beams=2,
                num_return_sequences=2,
                pad_token_id=0,
            )
    with torch.no_grad():
        plain = sm.model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=3,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
            pad_token_id=0,
        )
    assert torch.equal(out[:2], plain[:2])  # row 0 (α = 0) and its beams: unsteered
    assert not torch.equal(out[2:], plain[2:])


def test_hooks_come_off_after_exceptions(sm, vec):
    with pytest.raises(RuntimeError, match="boom"):
        with sm.steer(vec, layers=[1, 2]):
            raise RuntimeError("boom")
    assert_unhooked(sm.model, sm.layers)
    with pytest.raises(AlphaError):
        with sm.steer(vec, layers=[1]) as h:
            h.set_alphas([1.0, 2.0, 3.0])
            with torch.no_grad():
                sm.model(torch.randint(3, V, (2, 4)))
    assert_unhooked(sm.model, sm.layers)
    with pytest.raises(AlphaError):
        sm.generate(["w5"], vector=vec, alphas=[float("nan")])
    assert_unhooked(sm.model, sm.layers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_bad_alpha_rejected_before_attaching(sm, vec, bad):
    with pytest.raises(AlphaError):
        sm.steer(vec, alpha=bad)
    assert_unhooked(sm.model, sm.layers)


def test_unknown_layer_rejected(sm, vec):
    with pytest.raises(LayerError, match="unknown layer 7"):
        sm.steer(vec, layers=[7])
    with pytest.raises(LayerError, match="no direction for layer 2"):
        sm.steer(SteeringVector({0: vec.directions[0], 1: vec.directions[1]}), layers=[2])
    assert_unhooked(sm.model, sm.layers)


def test_grad_mode_does_not_modify_in_place(sm, vec):
    ids = torch.randint(3, V, (1, 4))
    with sm.steer(vec, alpha=1.0, layers=[1]):
        logits = sm.model(ids).logits
    logits.sum().backward()  # autograd works through the (out-of-place) steered activations
    assert sm.model.model.embed_tokens.weight.grad is not None


def test_hidden_states_show_the_steered_output_with_and_without_autograd(sm, vec):
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = sm.model(ids, output_hidden_states=True).hidden_states[2]
    for grad in (False, True):
        with torch.set_grad_enabled(grad), sm.steer(vec, alpha=1.5, layers=[1]):
            got = sm.model(ids, output_hidden_states=True).hidden_states[2]
        assert torch.equal(got.detach(), base + 1.5 * vec.directions[1]), grad


def test_multiple_directions_ablate_removes_the_subspace(sm):
    dirs = torch.randn(3, D)
    vec = SteeringVector({1: dirs})
    ids = torch.randint(3, V, (2, 5))
    with around(sm.layers[1], lambda: sm.steer(vec, alpha=1.0, layers=[1], mode="ablate")) as (pre, post, _):
        with torch.no_grad():
            sm.model(ids)
    assert (post[0] @ dirs.T).abs().max() < 1e-4
    q = torch.linalg.qr(dirs.T).Q
    torch.testing.assert_close(post[0], pre[0] - (pre[0] @ q) @ q.T, atol=1e-5, rtol=0)


def test_accelerate_device_map(tmp_path):
    pytest.importorskip("accelerate")
    from tiny_models import save_tiny

    save_tiny(tmp_path / "m")
    dm = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    sm = SteeredModel.from_pretrained(tmp_path / "m", device_map=dm)
    vec = SteeringVector({1: torch.randn(D)})
    plain = SteeredModel.from_pretrained(tmp_path / "m")
    a = sm.generate(["w7 w8"], vector=vec, alphas=2.0, layers=[1], max_new_tokens=4)
    b = plain.generate(["w7 w8"], vector=vec, alphas=2.0, layers=[1], max_new_tokens=4)
    assert a == b


def test_collect_activations_match_hidden_states(sm):
    from steer.activations import collect, post_instruction_length

    prompts = ["w7 w8 w9", "w10 w11 w12 w13 w14"]
    acts = collect(sm, prompts, layers=[0, 2], positions="last")
    assert acts.shape == (2, 2, D)
    enc = sm.encode(sm.format(prompts), chat_applied=True, position_ids=True)  # positions skip left padding
    assert enc["position_ids"][0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]  # two pads, then 6 tokens
    with torch.no_grad():
        hs = sm.model(**enc, output_hidden_states=True).hidden_states
    assert torch.equal(acts[:, 0], hs[1][:, -1]) and torch.equal(acts[:, 1], hs[3][:, -1])
    mean = collect(sm, prompts, layers=[1], positions="mean")
    m = enc["attention_mask"][..., None].float()
    torch.testing.assert_close(mean[:, 0], (hs[2] * m).sum(1) / m.sum(1), atol=1e-6, rtol=0)
    k = post_instruction_length(sm.tokenizer)
    assert k == 2  # the tiny template puts 'w5 w6' after the user text
    assert collect(sm, prompts, layers=[1], positions=3).shape == (2, 1, 3, D)


def test_uncached_generation_holds_the_gate_and_scope(sm, vec):
    """With use_cache=False every step re-feeds prompt + generated tokens; the gate and the scope must still
    follow the prompt length SteeredModel.generate sets, giving the cached result."""
    prompts = ["w7 w8 w9", "w10 w11 w12 w13 w14"]
    cdir = torch.randn(D)
    cond = Condition(layer=1, direction=cdir, threshold=0.0)
    kw = dict(vector=vec, alphas=2.0, layers=[2], condition=cond, max_new_tokens=5)
    for scope in ("all", "generated"):
        cached = sm.generate(prompts, scope=scope, **kw)
        uncached = sm.generate(prompts, scope=scope, use_cache=False, **kw)
        assert cached == uncached, scope


def test_replaced_block_forward_warns_once(tmp_path):
    """accelerate's dispatch_model re-run on a dispatched model drops steer's wrapper: the steering would
    silently stop, so the next forward warns (once); steering stacked on steering, or nothing replaced, does not."""
    import warnings

    accelerate = pytest.importorskip("accelerate")
    from tiny_models import tiny_model

    from steer.config import SteeringConfig
    from steer.hooks import Steering

    model = tiny_model()
    n = model.config.num_hidden_layers
    dm = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(n)},
    }
    ids = torch.tensor([[3, 4, 5]])
    vec = SteeringVector({1: torch.randn(D)})
    with torch.no_grad():
        base = model(ids).logits
    with Steering(model, vec, SteeringConfig(mode="add", layers=[1], alpha=2.0)):
        with torch.no_grad():
            before = model(ids).logits
        # dispatching a model accelerate had not hooked yet wraps steer's forward and calls it: no warning
        model = accelerate.dispatch_model(model, device_map=dm, force_hooks=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                assert torch.equal(model(ids).logits, before) and not torch.equal(before, base)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing replaced, steering stacked: no warning
        with (
            Steering(model, vec, SteeringConfig(mode="add", layers=[1], alpha=2.0)) as s,
            Steering(model, vec, SteeringConfig(mode="add", layers=[1], alpha=1.0)),
        ):
            with torch.no_grad():
                steered = model(ids).logits
                model(ids)
    assert not torch.equal(steered, base)
    with Steering(model, vec, SteeringConfig(mode="add", layers=[1], alpha=3.0)) as s:
        accelerate.dispatch_model(model, device_map=dm, force_hooks=True)
        with pytest.warns(RuntimeWarning, match="replaced after steering was attached"):
            with torch.no_grad():
                dropped = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per steering
            with torch.no_grad():
                model(ids)
    assert torch.equal(dropped, base)  # what the warning is about: the steering is gone
    assert not s.active
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_replaced_linear_forward_warns_for_task_steering():
    import functools
    import warnings

    from tiny_models import tiny_model

    from steer.lowrank import TaskSteering
    from steer.vectors.task import compute_task_vector

    model = tiny_model()
    tv = compute_task_vector(tiny_model("llama", 5), model, rank=2, progress=False)
    ids = torch.tensor([[3, 4, 5]])
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        base = model(ids).logits
    with TaskSteering(model, tv, alpha=1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                steered = model(ids).logits
            ours = lin.forward  # a wrapper that calls ours and says so
            lin.forward = functools.update_wrapper(functools.partial(lambda x: ours(x)), ours)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, steered)
        lin.forward = functools.partial(type(lin).forward, lin)  # replaced by something that skips ours
        with pytest.warns(RuntimeWarning, match="Linear was replaced"):
            with torch.no_grad():
                model(ids)
    del lin.forward
    assert not torch.equal(steered, base)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
