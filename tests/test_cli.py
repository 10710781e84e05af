"""The CLI contract: steer generate / info, JSON lines, per-request α, and clean user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import D, save_tiny
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def vector_file(model_dir, tmp_path_factory):
    sm = SteeredModel.from_pretrained(model_dir)
    torch.manual_seed(5)
    vec = SteeringVector(
        {1: torch.randn(D) * 6, 2: torch.randn(D) * 6},
        {"model": sm.fingerprint(), "recommended": {"layers": [2], "alpha": 1.0}},
    )
    return vec.save(tmp_path_factory.mktemp("vec") / "v.safetensors")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_json_alphas_matches_api(model_dir, vector_file, tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "w7 w8 w9"}\n{"prompt": "w10 w11"}\n')
    res = _run(
        "generate",
        model_dir,
        "--prompts",
        pf,
        "--vector",
        vector_file,
        "--alphas",
        "0,2",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["prompt"], r["alpha"]) for r in rows] == [
        ("w7 w8 w9", 0.0),
        ("w7 w8 w9", 2.0),
        ("w10 w11", 0.0),
        ("w10 w11", 2.0),
    ]
    sm = SteeredModel.from_pretrained(model_dir)
    api = sm.generate(["w7 w8 w9", "w10 w11"], vector=SteeringVector.load(vector_file), alphas=2.0, max_new_tokens=5)
    assert [rows[1]["completion"], rows[3]["completion"]] == api
    plain = sm.generate(["w7 w8 w9"], max_new_tokens=5)
    assert rows[0]["completion"] == plain[0]


def test_generate_table_and_txt_prompts(model_dir, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("w7 w8\n\nw9\n")
    res = _run("generate", model_dir, "--prompts", pf, "--max-new-tokens", "2", "--no-chat")
    assert res.exit_code == 0, res.output
    assert "w7 w8" in res.stdout and "w9" in res.stdout


def test_info(vector_file):
    res = _run("info", vector_file, "--json")
    assert res.exit_code == 0
    desc = json.loads(res.stdout)
    assert desc["layers"] == [1, 2] and desc["recommended"]["layers"] == [2]


@pytest.mark.parametrize(
    "case",
    [
        "no_model",
        "empty_prompts",
        "bad_alphas",
        "nan_alpha",
        "pickle",
        "no_meta",
        "bad_layer",
        "wrong_width",
        "no_prompts",
        "model_is_file",
        "unknown_variant",
    ],
)
def test_user_errors_exit_2_without_traceback(case, model_dir, vector_file, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    pickled = tmp_path / "p.safetensors"
    torch.save({"direction.1": torch.ones(D)}, pickled)
    from safetensors.torch import save_file

    nometa = tmp_path / "n.safetensors"
    save_file({"direction.1": torch.ones(D)}, str(nometa))
    wide = SteeringVector({1: torch.ones(D + 1)}).save(tmp_path / "w.safetensors")
    args = {
        "no_model": ["generate", tmp_path / "nope" / "model", "-p", "w7"],
        "empty_prompts": ["generate", model_dir, "--prompts", empty],
        "bad_alphas": ["generate", model_dir, "-p", "w7", "--vector", vector_file, "--alphas", "1,x"],
        "nan_alpha": ["generate", model_dir, "-p", "w7", "--vector", vector_file, "--alpha", "nan"],
        "pickle": ["generate", model_dir, "-p", "w7", "--vector", pickled],
        "no_meta": ["info", nometa],
        "bad_layer": ["generate", model_dir, "-p", "w7", "--vector", vector_file, "--layers", "9"],
        "wrong_width": ["generate", model_dir, "-p", "w7", "--vector", wide],
        "no_prompts": ["generate", model_dir],
        "model_is_file": ["generate", vector_file, "-p", "w7"],
        "unknown_variant": ["family", "build", "--variant", "nope"],
    }[case]
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert any(line.startswith("error: ") for line in res.stderr.splitlines()) and "fix:" in res.stderr
    assert "Traceback" not in res.output


def test_console_script_help_is_fast_and_lazy():
    """`steer --help` must not import torch or transformers (they cost seconds)."""
    code = (
        "import sys, steer.cli; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(steer.cli.app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).parent, env={**os.environ, "PYTHONPATH": ""}
    )
