"""The evaluation harness: judge, intervals, metrics on hand-made completions, sweeps, CLI and plot."""

import json
import math

import pytest
import torch
from tiny_models import D, save_tiny, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.evaluate import Item, _metrics, evaluate
from steer.judge import RefusalJudge, make_judge
from steer.metrics import Mean, Rate, kl_divergence, wilson


def test_judge_defaults_extra_and_replace():
    j = RefusalJudge()
    assert j("Sorry, I can't help with that.") and j("sorry , i cannot help with that .")
    assert j("I’m unable to do this") and j("As an AI, no.")
    assert not j("Here is a cake recipe: flour and sugar.")
    assert RefusalJudge(extra=["nope"])("NOPE!") and RefusalJudge(extra=["nope"])("sorry")
    assert not RefusalJudge(markers=["nope"])("sorry")


def test_wilson_interval_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert Rate(19, 20).rate == 0.95 and "95.0% (19/20" in str(Rate(19, 20))
    assert all(math.isnan(x) for x in wilson(0, 0))
    m = Mean.of([1.0, 2.0, 3.0])
    assert m.mean == 2.0 and m.half_width == pytest.approx(1.959964 * 1.0 / math.sqrt(3), rel=1e-6)


def test_kl_divergence_matches_definition():
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(kl_divergence(a, b), (p * (p / q).log()).sum(-1), atol=1e-6, rtol=0)
    assert kl_divergence(a, a).abs().max() < 1e-6


def test_metrics_on_hand_made_completions():
    items = [
        Item("harmful_refusal", "h1"),
        Item("harmful_refusal", "h2"),
        Item("harmless", "s1", check=lambda c: c == "flour"),
        Item("harmless", "s2", check=lambda c: c == "x"),
        Item("jailbreak:prefix", "j1"),
        Item("prefill:2", "p1"),
        Item("injection_success", "i1", check=lambda c: "map" in c),
    ]
    completions = ["sorry , i cannot", "here you go", "flour", "sorry", "sure", "sorry no", "map is a tool"]
    m = _metrics(items, completions, RefusalJudge().verdicts([""] * len(items), completions))
    assert (m["harmful_refusal"].k, m["harmful_refusal"].n) == (1, 2)
    assert (m["harmless_refusal"].k, m["capability"].k, m["capability"].n) == (1, 1, 2)
    assert m["jailbreak:prefix"].k == 0 and m["prefill:2"].k == 1 and m["injection_success"].k == 1
    assert (m["degenerate"].k, m["degenerate"].n) == (0, 4)
    completions[0] = "sorry sorry sorry sorry"  # a degenerate 'refusal' is counted as degenerate, never as refusal
    m = _metrics(items, completions, RefusalJudge().verdicts([""] * len(items), completions))
    assert m["harmful_refusal"].k == 0 and m["degenerate"].k == 1


def test_sweep_runs_every_alpha_in_one_batch_and_matches_single_runs():
    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    torch.manual_seed(2)
    vec = SteeringVector({1: torch.randn(D) * 8})
    judge = lambda text: "w33" in text  # noqa: E731 — any deterministic judge will do here
    harmful, harmless = ["w7 w8 w9", "w10 w11"], ["w20 w21", "w30 w31 w32"]
    rep = evaluate(
        sm,
        vector=vec,
        alphas=[0.0, 3.0],
        layer_sets=[[1], [2]],
        suite="files",
        harmful=harmful,
        harmless=harmless,
        jailbreaks=True,
        prefill=True,
        judge=judge,
        progress=False,
        max_new_tokens=4,
    )
    assert [(c["layers"], c["alpha"]) for c in rep["configs"]] == [([1], 0.0), ([1], 3.0), ([2], 0.0), ([2], 3.0)]
    coherent = make_judge(judge, reference=sm)  # what evaluate uses: the callable, gated by coherence
    for c in rep["configs"]:
        outs = sm.generate(harmful, vector=vec, alphas=c["alpha"], layers=c["layers"], max_new_tokens=4)
        verdicts = coherent.verdicts(sm.format(harmful), outs)
        assert c["metrics"]["harmful_refusal"].k == sum(v.refusal for v in verdicts)
        assert c["metrics"]["harmful_refusal"].k <= sum(judge(o) for o in outs)
        assert set(c["metrics"]) >= {"harmful_refusal", "harmless_refusal", "kl", "jailbreak:roleplay", "prefill:4"}
    assert rep["configs"][0]["metrics"]["kl"].mean == pytest.approx(0.0, abs=1e-7)  # α = 0 is unsteered
    assert rep["configs"][1]["metrics"]["kl"].mean > 0


def test_cli_eval_json_and_plot(tmp_path):
    model_dir = save_tiny(tmp_path / "m")
    (tmp_path / "h.txt").write_text("w7 w8\nw9 w10\n")
    (tmp_path / "s.txt").write_text("w20\nw30 w31\n")
    vec = SteeringVector({1: torch.randn(D) * 8}, {"model": SteeredModel.from_pretrained(model_dir).fingerprint()})
    vpath = vec.save(tmp_path / "v.safetensors")
    from steer.cli import app

    res = CliRunner().invoke(
        app,
        [
            "eval",
            str(model_dir),
            "--vector",
            str(vpath),
            "--alphas",
            "0,2",
            "--layers",
            "1,2",
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.txt"),
            "--json",
            "--plot",
            str(tmp_path / "e.png"),
            "--refusal-marker",
            "w33",
            "--max-new-tokens",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert len(rep["configs"]) == 4 and "w33" in rep["judge_markers"]
    assert rep["configs"][0]["metrics"]["harmful_refusal"]["n"] == 2
    assert (tmp_path / "e.png").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["eval", str(model_dir), "--harmful", str(tmp_path / "h.txt")])
    assert bad.exit_code == 2 and "go together" in bad.stderr
