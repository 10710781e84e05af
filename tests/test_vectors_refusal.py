"""Refusal directions: diff-in-means exactness for every position set, AUC / threshold helpers, the CAST
condition, batched candidate measurement, file metadata and the CLI — on tiny models; then the built-in
family (direction from ``aligned`` separates held-out prompts, induces refusal in ``base`` / ``compromised``
and its ablation removes refusal from ``aligned``)."""

import json
import random

import pytest
import torch
from tiny_models import L, save_tiny, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.cli import app
from steer.kernels import use
from steer.vectors.condition import fit_condition, score_layer
from steer.vectors.refusal import compute_refusal, diff_in_means, prompt_sha256
from steer.vectors.selection import candidate_layers, evaluate_candidates
from steer.vectors.stats import accuracy, auc, best_threshold

HARM = [f"w{10 + i} w{20 + i}" + " w30" * (i % 3) for i in range(8)]
SAFE = [f"w{40 + i} w{50 + i} w60" + " w61" * (i % 2) for i in range(8)]


def judge(text):  # a deterministic stand-in refusal judge for the random tiny model
    return "w7" in text.split()


@pytest.fixture(autouse=True)
def reference_kernel():
    previous = use("reference")
    yield
    use(previous)


@pytest.fixture(scope="module")
def sm():
    return SteeredModel(tiny_model("llama"), tiny_tokenizer())


# ------------------------------------------------------------------------------------------ statistics
def test_auc_on_hand_made_scores():
    assert auc([3, 4, 5], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 2], [1, 2]) == 0.5
    assert auc([0.9, 0.4], [0.5, 0.1]) == 0.75
    assert auc([1.0, 1.0, 2.0], [1.0]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    g = torch.Generator().manual_seed(0)
    p, n = torch.randn(40, generator=g).round(decimals=1) + 0.5, torch.randn(30, generator=g).round(decimals=1)
    brute = ((p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()).mean()
    assert auc(p, n) == pytest.approx(float(brute), abs=1e-12)


def test_best_threshold_midpoints_and_comparators():
    assert best_threshold([2, 3], [0, 1]) == (1.5, 1.0)
    assert best_threshold([1, 5, 6], [0, 2, 3]) == (4.0, pytest.approx(5 / 6))
    t, acc = best_threshold([0, 1], [2, 3], "<")
    assert (t, acc) == (1.5, 1.0) and accuracy([0, 1], [2, 3], t, "<") == 1.0
    t, acc = best_threshold([1.0], [1.0])
    assert acc == 0.5


def test_fit_condition_picks_separating_layer_at_or_below_max():
    g = torch.Generator().manual_seed(1)
    d = 8
    h, s = torch.randn(20, 3, d, generator=g), torch.randn(20, 3, d, generator=g)
    h[:, 1, 0] += 10.0  # layer 1 separates perfectly along e0
    h[:, 2, 1] += 10.0  # so does layer 2, but it is past max_layer
    meta, direction, table = fit_condition(h, s, [0, 1, 2], max_layer=1)
    assert meta["layer"] == 1 and meta["accuracy"] == 1.0 and meta["auc"] == 1.0
    assert [r["layer"] for r in table] == [0, 1]
    assert direction.norm().item() == pytest.approx(1.0, abs=1e-6) and direction[0] > 0.9
    proj_h, proj_s = h[:, 1] @ direction, s[:, 1] @ direction
    assert (proj_h > meta["threshold"]).all() and (proj_s <= meta["threshold"]).all()
    with pytest.raises(ValueError):
        fit_condition(h, s, [2], max_layer=1)


def test_score_layer_comparators():
    e0 = torch.tensor([2.0, 0.0])  # not unit: score_layer normalises it
    harm = torch.tensor([[3.0, 1.0], [4.0, -1.0]])  # scores along e0: 3, 4
    safe = torch.tensor([[0.0, 5.0], [1.0, 0.0]])  # 0, 1
    above = score_layer(harm, safe, e0)
    assert (above["threshold"], above["comparator"], above["accuracy"], above["auc"]) == (2.0, ">", 1.0, 1.0)
    assert above["dprime"] == pytest.approx(3.0 / 0.5)  # mean gap 3, pooled sd 0.5
    assert score_layer(harm, safe, e0, "auto") == above
    below = score_layer(harm, safe, -e0, "auto")  # harmful below: the comparator flips, AUC/d' too
    assert (below["threshold"], below["comparator"], below["accuracy"], below["auc"]) == (-2.0, "<", 1.0, 1.0)
    assert below["dprime"] == pytest.approx(6.0)
    wrong_side = score_layer(harm, safe, -e0)  # '>' forced on the wrong side
    assert wrong_side["auc"] == 0.0 and wrong_side["dprime"] == pytest.approx(-6.0)


def test_candidate_layers_skip_last_fifth():
    assert candidate_layers(list(range(6)), 6) == [0, 1, 2, 3, 4]
    assert candidate_layers(list(range(32)), 32) == list(range(26))
    assert candidate_layers(list(range(4)), 4) == [0, 1, 2]


# ------------------------------------------------------------------------------------------ directions
def _plain_acts(model, tok, prompts, layer, positions):
    """One prompt at a time, no padding, HF's hidden_states: the textbook computation."""
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
        if positions == "last":
            out.append(hs[-1])
        elif positions == "mean":
            out.append(hs.mean(0))
        else:  # the tiny template puts "w5 w6" after the user's text: two post-instruction tokens
            out.append(hs[-2:].mean(0))
    return torch.stack(out).double()


@pytest.mark.parametrize("positions", ["last", "post_instruction", "mean"])
def test_diff_in_means_matches_plain_computation(sm, positions):
    from steer.activations import collect

    layers = list(range(L - 1))  # HF's last hidden state has the final norm applied; compare the rest
    got = diff_in_means(
        collect(sm, HARM, layers=layers, positions=positions, batch_size=3),
        collect(sm, SAFE, layers=layers, positions=positions, batch_size=5),
    )
    for i, layer in enumerate(layers):
        ref = (
            _plain_acts(sm.model, sm.tokenizer, HARM, layer, positions).mean(0)
            - _plain_acts(sm.model, sm.tokenizer, SAFE, layer, positions).mean(0)
        ).float()
        torch.testing.assert_close(got[i], ref, atol=2e-5, rtol=1e-4)


def test_diff_in_means_exact_formula():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, 4, generator=g), torch.randn(7, 3, 4, generator=g)
    assert torch.equal(diff_in_means(a, b), (a.double().mean(0) - b.double().mean(0)).float())
    a4, b4 = torch.randn(5, 3, 2, 4, generator=g), torch.randn(7, 3, 2, 4, generator=g)
    assert torch.equal(diff_in_means(a4, b4), (a4.double().mean(2).mean(0) - b4.double().mean(2).mean(0)).float())


@pytest.fixture(scope="module")
def vec(sm):
    return compute_refusal(sm, HARM, SAFE, judge=judge, n_eval=4, max_new_tokens=4)


def test_file_metadata_and_round_trip(vec, sm, tmp_path):
    v = SteeringVector.load(vec.save(tmp_path / "r.safetensors"))
    assert v.kind == "refusal" and v.layers == list(range(L))
    rec = v.recommended
    assert rec["mode"] == "add" and rec["layers"] == [rec["source_layer"]] and isinstance(rec["alpha"], float)
    assert rec["source_layer"] in candidate_layers(list(range(L)), L)
    prov = v.meta["provenance"]
    assert prov["method"] == "diff_in_means" and prov["positions"] == "last"
    assert prov["prompt_sets"] == {"harmful": prompt_sha256(HARM), "harmless": prompt_sha256(SAFE)}
    assert (prov["n_harmful"], prov["n_harmless"]) == (8, 8)
    assert v.meta["model"]["num_layers"] == L and v.meta["model"]["hidden_size"] == sm.hidden_size
    sel = v.meta["selection"]
    assert sel["chosen"] == rec["source_layer"] and {r["layer"] for r in sel["table"]} == set(sel["candidates"])
    assert all({"induce", "bypass", "kl", "score", "eligible"} <= set(r) for r in sel["table"])
    assert [r["alpha"] for r in sel["alpha_sweep"]] == sorted(r["alpha"] for r in sel["alpha_sweep"])
    cond = v.condition
    assert cond["layer"] <= rec["layers"][0] and cond["reduce"] == "last" and cond["comparator"] == ">"
    assert 0.0 <= cond["auc"] <= 1.0 and 0.5 <= cond["accuracy"] <= 1.0
    assert v.condition_direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    # the stored condition is usable as is: conditional steering attaches without complaint
    with sm.steer(v, mode="conditional"):
        pass


def test_condition_scores_reproduce_reported_accuracy(vec, sm):
    from steer.activations import collect

    c = vec.condition
    u = vec.condition_direction
    sh = collect(sm, HARM, layers=[c["layer"]])[:, 0] @ u
    ss = collect(sm, SAFE, layers=[c["layer"]])[:, 0] @ u
    assert accuracy(sh, ss, c["threshold"]) == pytest.approx(c["accuracy"])
    assert auc(sh, ss) == pytest.approx(c["auc"], abs=1e-6)


def test_batched_candidates_match_one_at_a_time(sm):
    """Per-request α batching gives the same completions as steering each candidate on its own."""
    directions = {l: torch.randn(sm.hidden_size, generator=torch.Generator().manual_seed(l)) * 3 for l in range(L)}
    flagged = []

    def spy(text):
        flagged.append(text)
        return judge(text)

    evaluate_candidates(
        sm, directions, HARM[:3], SAFE[:3], candidates=[0, 2], judge=spy, max_new_tokens=4, batch_size=5
    )
    plain = sm.generate(HARM[:3] + SAFE[:3], max_new_tokens=4)
    assert flagged[:6] == plain
    for i, l in enumerate([0, 2]):
        v = SteeringVector({l: directions[l]})
        added = sm.generate(SAFE[:3], vector=v, layers=[l], mode="add", alphas=1.0, max_new_tokens=4)
        ablated = sm.generate(HARM[:3], vector=v, layers=list(range(L)), mode="ablate", alphas=1.0, max_new_tokens=4)
        assert flagged[6 + 6 * i : 12 + 6 * i] == added + ablated


def test_no_select_and_calibration_on_another_model(sm):
    other = SteeredModel(tiny_model("llama", seed=1), tiny_tokenizer())
    v = compute_refusal(sm, HARM, SAFE, select=False, calibrate_on=other, positions="post_instruction")
    assert v.meta["selection"]["measured"] is False and v.recommended["alpha"] == 1.0
    cond = v.condition
    assert cond["calibrated_on"] and cond["source_fit"]["layer"] <= v.recommended["layers"][0]
    assert cond["layer"] <= v.recommended["layers"][0]
    # the calibrated direction is the source model's unit diff-in-means at that layer (last token)
    from steer.activations import collect

    h = collect(sm, HARM, layers=[cond["layer"]])[:, 0].double().mean(0)
    s = collect(sm, SAFE, layers=[cond["layer"]])[:, 0].double().mean(0)
    torch.testing.assert_close(v.condition_direction, ((h - s) / (h - s).norm()).float(), atol=1e-6, rtol=0)


def test_bad_inputs_are_user_errors(sm):
    from steer.errors import ConfigError

    with pytest.raises(ConfigError):
        compute_refusal(sm, HARM, SAFE, positions="first")
    with pytest.raises(ConfigError):
        compute_refusal(sm, HARM[:1], SAFE)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_vectors_refusal_and_info(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    (tmp_path / "h.txt").write_text("\n".join(HARM) + "\n")
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SAFE))
    out = tmp_path / "r.safetensors"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "vectors",
            "refusal",
            str(model_dir),
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.jsonl"),
            "-o",
            str(out),
            "--n-eval",
            "3",
            "--max-new-tokens",
            "3",
            "--positions",
            "mean",
            "--marker",
            "w7",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "condition: layer" in res.stdout and "bypass" in res.stdout
    v = SteeringVector.load(out)
    assert v.meta["provenance"]["positions"] == "mean" and v.meta["provenance"]["model"] == str(model_dir)
    assert "w7" in v.meta["selection"]["judge"]["markers"]
    res = runner.invoke(
        app,
        [
            "vectors",
            "refusal",
            str(model_dir),
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "missing.txt"),
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "not found" in res.output


# ------------------------------------------------------------------------------------------ the family
@pytest.fixture(scope="module")
def fam(request):
    from steer.family import language as lang

    paths = request.getfixturevalue("family")
    models = {m: SteeredModel.from_pretrained(paths[m]) for m in ("base", "aligned", "compromised")}
    rng = random.Random(0)
    harm_train = rng.sample([r.prompt for r in lang.harmful_prompts("train")], 96)
    safe_train = rng.sample([r.prompt for r in lang.harmless_prompts("train")], 96)
    vec = compute_refusal(models["aligned"], harm_train, safe_train, n_eval=24, batch_size=64)  # add scope: auto
    vec.meta["tune_prompts"] = harm_train[:32]
    harm_test = [r.prompt for r in lang.harmful_prompts("heldout", cap=64)]
    safe_test = [r.prompt for r in lang.harmless_prompts("heldout", cap=64)]
    return models, vec, harm_test, safe_test, lang


def _refusal(lang, completions):
    return sum(map(lang.is_refusal, completions)) / len(completions)


def test_family_direction_separates_heldout(fam):
    from steer.activations import collect

    models, vec, harm, safe, _ = fam
    layer = vec.recommended["layers"][0]
    d = vec.directions[layer]
    sh = collect(models["aligned"], harm, layers=[layer])[:, 0] @ d
    ss = collect(models["aligned"], safe, layers=[layer])[:, 0] @ d
    assert auc(sh, ss) >= 0.95
    c = vec.condition
    u = vec.condition_direction
    ch = collect(models["aligned"], harm, layers=[c["layer"]])[:, 0] @ u
    cs = collect(models["aligned"], safe, layers=[c["layer"]])[:, 0] @ u
    assert accuracy(ch, cs, c["threshold"]) >= 0.9


@pytest.mark.parametrize("member", ["base", "compromised"])
def test_family_adding_induces_refusal(fam, member):
    models, vec, harm, _, lang = fam
    sm = models[member]
    # α per member, picked on train prompts (the aligned model's α is not the compromised one's)
    layer = vec.recommended["layers"][0]
    grid = [vec.recommended["alpha"] * k for k in (1, 2, 4, 8)]
    rows = sm.generate_grid(vec.meta["tune_prompts"], grid, vector=vec, layers=[layer], max_new_tokens=8)
    alpha = max(grid, key=lambda a: sum(lang.is_refusal(r["completion"]) for r in rows if r["alpha"] == a))
    before = _refusal(lang, sm.generate(harm, max_new_tokens=8))
    after = _refusal(lang, sm.generate(harm, vector=vec, alphas=alpha, max_new_tokens=8))
    assert after - before >= 0.5, (member, before, after)


def test_family_ablating_removes_refusal(fam):
    models, vec, harm, _, lang = fam
    sm = models["aligned"]
    before = _refusal(lang, sm.generate(harm, max_new_tokens=8))
    after = _refusal(
        lang,
        sm.generate(
            harm,
            vector=vec,
            mode="ablate",
            layers=list(range(sm.num_layers)),
            scope="all",
            alphas=1.0,
            max_new_tokens=8,
        ),
    )
    assert before - after >= 0.5, (before, after)


def test_degenerate_ablation_is_no_bypass(sm):
    """Garbage under ablation must not score as a bypass: degenerate ablation rows count as still refused, and
    the layer's degenerate rate (max of add and ablation rows) makes it ineligible."""
    from steer.judge import Verdict

    nh = ns = 3
    directions = {l: torch.randn(sm.hidden_size, generator=torch.Generator().manual_seed(l)) for l in range(L)}

    class Fake:  # baseline rows refuse; candidate 0's ablation rows are degenerate, candidate 2's coherent
        def verdicts(self, prompts, completions):
            out = [Verdict(True, False)] * (nh + ns)
            out += [Verdict(False, False)] * ns + [Verdict(False, True)] * nh  # layer 0: add, ablate
            out += [Verdict(False, False)] * ns + [Verdict(False, False)] * nh  # layer 2: add, ablate
            assert len(out) == len(completions)
            return out

    sel = evaluate_candidates(sm, directions, HARM[:nh], SAFE[:ns], candidates=[0, 2], judge=Fake(), max_new_tokens=2)
    rows = {r["layer"]: r for r in sel["table"]}
    assert rows[0]["bypass"] == 1.0 and rows[0]["degenerate"] == 1.0 and not rows[0]["eligible"]
    assert rows[2]["bypass"] == 0.0 and rows[2]["degenerate"] == 0.0
    assert sel["chosen"] == 2


def test_pair_judge_option_and_a_model_that_never_refuses(sm):
    """judge="pair" uses the judge learned on the spot; a model with no consistent refusal cannot give one
    (the random tiny model), which is a clear error, not a silent fallback."""
    from steer.errors import ConfigError

    with pytest.raises(ConfigError, match="no consistent refusal"):
        compute_refusal(sm, HARM, SAFE, judge="pair", n_eval=4, max_new_tokens=4)
    with pytest.raises(ConfigError, match="unknown judge"):  # refused before any generation
        compute_refusal(sm, HARM, SAFE, judge="bogus", n_eval=4, max_new_tokens=4)
