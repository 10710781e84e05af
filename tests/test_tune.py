"""steer tune: Pareto front, bounds, bracketing refinement, the tuned file, and a small tune end to end on
the built-in family (conditional refusal steering of `compromised`)."""

import json
import random

import pytest
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.vectors.tune import Point, TuneBounds, pareto, tune


def _p(h, s, kl, a=1.0):
    return Point("add", [1], a, h, s, kl)


def test_pareto_and_objective():
    pts = [_p(0.9, 0.0, 0.1), _p(0.95, 0.1, 0.1), _p(0.8, 0.0, 0.2), _p(0.9, 0.0, 0.05, a=2.0)]
    front = pareto(pts)
    assert pts[2] not in front and pts[0] not in front  # dominated by the lower-KL twin
    assert pts[1] in front and pts[3] in front
    b = TuneBounds(max_over_refusal=0.05, max_kl=0.5)
    assert max(pts, key=lambda p: p.key(b)) is pts[3]  # pts[1] breaks the over-refusal bound
    with pytest.raises(ValueError):
        TuneBounds(objective="nope")
    # nothing feasible: the least violation wins, not the highest refusal of a degenerate configuration
    bad = [
        Point("add", [1], 2.0, 1.0, 0.0, 0.1, degenerate=0.5),
        Point("add", [1], 1.0, 0.6, 0.0, 0.1, degenerate=0.05),
    ]
    assert max(bad, key=lambda p: p.key(b)) is bad[1]


@pytest.fixture(scope="module")
def setup(family):
    from steer.family import language as L
    from steer.vectors.refusal import compute_refusal

    rng = random.Random(1)
    harm = rng.sample([r.prompt for r in L.harmful_prompts("train")], 48)
    safe = rng.sample([r.prompt for r in L.harmless_prompts("train")], 48)
    comp = SteeredModel.from_pretrained(family["compromised"])
    vec = compute_refusal(SteeredModel.from_pretrained(family["aligned"]), harm, safe, n_eval=16, calibrate_on=comp)
    return comp, vec, harm, safe, L


def test_small_tune_end_to_end(setup, tmp_path):
    comp, vec, harm, safe, L = setup
    cond = vec.condition["layer"]
    tuned, summary = tune(
        comp,
        vec,
        harm[:32],
        safe[:32],
        layers=[[cond], [cond + 1]],
        modes=("conditional",),
        alphas=[0.0, 1.0, 2.0],
        auto=True,
        bounds=TuneBounds(max_over_refusal=0.05),
        eval_harmful=harm[32:],
        eval_harmless=safe[32:],
        progress=False,
    )
    best = summary["best"]
    assert summary["feasible"] and best["harmful_refusal"] >= 0.9 and best["harmless_refusal"] <= 0.05
    assert summary["n_configs"] > 6  # the bracketing rounds added α values between grid points
    assert any(p["alpha"] not in (0.0, 1.0, 2.0) for p in summary["points"])
    assert tuned.recommended["mode"] == "conditional" and tuned.recommended["alpha"] == best["alpha"]
    assert summary["heldout"]["harmful_refusal"]["n"] == 16
    path = tuned.save(tmp_path / "tuned.safetensors")
    back = SteeringVector.load(path)
    assert back.meta["tune"]["best"]["alpha"] == best["alpha"]
    # the name the model was loaded by (a builtin: name or a path), by tune and by compute_refusal alike
    assert comp.source and back.condition["calibrated_on"] == comp.source == vec.condition["calibrated_on"]
    # the tuned file "just works": its recommendations steer held-out prompts
    held = [r.prompt for r in L.harmful_prompts("heldout", cap=24)]
    outs = comp.generate(held, vector=back, max_new_tokens=8)
    assert sum(map(L.is_refusal, outs)) / len(outs) >= 0.9
    safe_out = comp.generate([r.prompt for r in L.harmless_prompts("heldout", cap=24)], vector=back, max_new_tokens=8)
    assert sum(map(L.is_refusal, safe_out)) <= 1


def test_cli_tune_json_and_plot(setup, tmp_path, family):
    comp, vec, harm, safe, _ = setup
    vpath = vec.save(tmp_path / "ref.safetensors")
    (tmp_path / "h.txt").write_text("\n".join(harm[:16]))
    (tmp_path / "s.txt").write_text("\n".join(safe[:16]))
    from steer.cli import app

    res = CliRunner().invoke(
        app,
        [
            "tune",
            str(family["compromised"]),
            "--vector",
            str(vpath),
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.txt"),
            "--mode",
            "conditional",
            "--alphas",
            "0,1,2",
            "-o",
            str(tmp_path / "t.safetensors"),
            "--plot",
            str(tmp_path / "t.png"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["best"]["mode"] == "conditional" and (tmp_path / "t.png").stat().st_size > 10_000
    assert SteeringVector.load(tmp_path / "t.safetensors").recommended["alpha"] == summary["best"]["alpha"]
    bad = CliRunner().invoke(
        app,
        [
            "tune",
            str(family["compromised"]),
            "--vector",
            str(vpath),
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.txt"),
            "--mode",
            "zap",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert bad.exit_code == 2 and "unknown mode" in bad.stderr


def test_tune_task_vector_through_the_per_request_path(family):
    """Task vectors are tuned too: the α sweep runs through per-row parameter steering in one batch."""
    from steer.family import language as L
    from steer.vectors.task import compute_task_vector

    comp = SteeredModel.from_pretrained(family["compromised"])
    aligned = SteeredModel.from_pretrained(family["aligned"])
    harm_vec = compute_task_vector(comp.model, aligned.model, role="harm", rank=8, progress=False)
    rng = random.Random(2)
    harm = rng.sample([r.prompt for r in L.harmful_prompts("train")], 24)
    safe = rng.sample([r.prompt for r in L.harmless_prompts("train")], 24)
    tuned, summary = tune(comp, harm_vec, harm, safe, alphas=[0.0, -0.5, -1.0], progress=False)
    assert summary["best"]["mode"] == "per_request" and summary["best"]["layers"] is None
    assert {p["alpha"] for p in summary["points"]} == {0.0, -0.5, -1.0}
    # each point equals a plain per-α run (the sweep shares one batch across α)
    for p in summary["points"]:
        outs = comp.generate(harm, vector=harm_vec, alphas=p["alpha"], max_new_tokens=16)
        assert p["harmful_refusal"] == sum(map(L.is_refusal, outs)) / len(outs)
    assert summary["best"]["harmful_refusal"] >= 0.9 and tuned.recommended["alpha"] < 0


def test_tune_sweeps_new_ops_and_refuses_untunable_modes():
    """Every registered op can be tuned (its own α grid, or a generic one); merged and clamp cannot."""
    import sys

    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import D, tiny_model, tiny_tokenizer

    from steer.errors import ConfigError

    sm = SteeredModel(tiny_model("llama"), tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(
        {1: torch.randn(D, generator=g) * 3}, {"kind": "refusal"}, None, {"mean.1": torch.randn(D, generator=g)}
    )
    kw = dict(alphas=[0.5], judge="markers", max_new_tokens=3, progress=False, scopes=("all",))
    tuned, summary = tune(sm, vec, ["w5 w6", "w7 w8"], ["w9 w10", "w11 w12"], modes=("ace", "angular"), **kw)
    assert {p["mode"] for p in summary["points"]} == {"ace", "angular"}
    assert tuned.recommended["mode"] in ("ace", "angular")
    for mode in ("merged", "clamp"):
        with pytest.raises(ConfigError, match="cannot be tuned"):
            tune(sm, vec, ["w5"], ["w9"], modes=(mode,), **kw)


def test_prefill_counts_as_the_worse_of_plain_and_prefilled():
    b = TuneBounds()
    shallow = Point("conditional", [1], 1.0, 1.0, 0.0, 0.0, prefill=0.5)
    deep = Point("conditional", [1], 2.0, 0.95, 0.0, 0.0, prefill=0.9)
    assert max([shallow, deep], key=lambda p: p.key(b)) is deep
    assert max([_p(1.0, 0.0, 0.0), _p(0.95, 0.0, 0.0, a=3.0)], key=lambda p: p.key(b)).harmful_refusal == 1.0


def test_file_prefill_rows_continue_the_given_answers():
    from steer.errors import ConfigError
    from steer.evaluate import GENERIC_PREFILL, file_items

    items = file_items(["h1", "h2"], ["s1"], jailbreaks=False, prefill=True, prefill_lengths=(2, 8),
                       answers=["step one : get x . step two", None])  # fmt: skip
    pre = {(it.metric, it.prompt): it.prefill for it in items if it.metric.startswith("prefill")}
    assert pre[("prefill:2", "h1")] == "step one" and pre[("prefill:8", "h1")] == "step one : get x . step two"
    assert pre[("prefill:2", "h2")] == " ".join(GENERIC_PREFILL.split()[:2])  # no answer: the generic opening
    with pytest.raises(ConfigError, match="one compliant answer per harmful prompt"):
        file_items(["h1"], ["s1"], jailbreaks=False, prefill=True, prefill_lengths=(2,), answers=[])


def test_tune_with_prefill_rows_scores_them(setup):
    comp, vec, harm, safe, L = setup
    from steer.evaluate import compliant_answers
    from steer.judge import make_judge

    answers = compliant_answers(comp, harm[:16], judge=make_judge(None, vector=vec, reference=comp))
    assert sum(a is not None for a in answers) >= 12  # the compromised model complies: its answers are the attack
    assert all(a is None or not L.is_refusal(a) for a in answers)
    cond = vec.condition["layer"]
    _, summary = tune(comp, vec, harm[:16], safe[:16], layers=[[cond + 1]], modes=("conditional",),
                      alphas=[0.0, 2.0], prefill_lengths=(2, 4), progress=False)  # fmt: skip
    pts = {p["alpha"]: p for p in summary["points"]}
    assert pts[0.0]["prefill"] is not None and pts[0.0]["prefill"] <= 0.1  # unsteered: the prefill is continued
    m = summary["best"]["metrics"]
    assert m["prefill:2"]["n"] == 16 and m["prefill:4"]["n"] == 16
    assert summary["best"]["prefill"] == min(m["prefill:2"]["rate"], m["prefill:4"]["rate"])
