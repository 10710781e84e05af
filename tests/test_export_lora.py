"""steer export lora: a task vector as a PEFT LoRA adapter. Loaded with peft on the base model, its logits equal
steer's own per-request low-rank path at the same α (fp32, ≤ 1e-4), for Llama (nn.Linear) and GPT-2 (Conv1D);
what LoRA cannot carry is refused by name; truncation errors are the SVD's."""

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from steer import SteeredModel
from steer.errors import ConfigError, VectorFileError
from steer.vector import SteeringVector
from steer.vectors.lora import export_lora, export_lora_ladder, split_targets
from steer.vectors.task import compute_task_vector

peft = pytest.importorskip("peft")

PROJ = r"(proj|c_attn|c_fc|c_proj|dense)"


def _pair(family):
    return tiny_model(family, seed=1), tiny_model(family, seed=0)  # aligned, base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha", [1.0, -0.5])
def test_peft_adapter_equals_steers_per_request_path(tmp_path, family, alpha):
    aligned, base = _pair(family)
    tau = compute_task_vector(aligned, base, include=PROJ, rank=8, progress=False)
    report = export_lora(tau, tmp_path / "a", rank=8, alpha=alpha)
    assert report["max_truncation_error"] < 1e-5  # τ was stored at rank 8: nothing is lost
    ids = torch.tensor([[3, 17, 22, 40, 9, 11]])
    sm = SteeredModel(base, tiny_tokenizer())
    with sm.steer(tau, mode="per_request", alpha=alpha):
        want = _logits(base, ids)
    plain = _logits(base, ids)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(family, seed=0), str(tmp_path / "a")).eval()
    got = _logits(peft_model, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the adapter really changes the model
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] == (family == "gpt2") and not cfg["use_dora"] and cfg["modules_to_save"] is None


def test_norm_embedding_and_bias_deltas_are_refused_by_name(tmp_path):
    aligned, base = _pair("gpt2")  # GPT-2 has biases, norms and embeddings
    with torch.no_grad():  # fresh models have equal norms and zero biases: make the fine-tune move them
        aligned.transformer.ln_f.weight.add_(0.1)
        aligned.transformer.h[0].attn.c_attn.bias.add_(0.1)
    tau = compute_task_vector(aligned, base, progress=False)
    ok, refused = split_targets(tau)
    assert ok and refused
    with pytest.raises(ConfigError) as err:
        export_lora(tau, tmp_path / "x", rank=8)
    msg = str(err.value)
    assert "wte.weight (an embedding)" in msg and "ln_f.weight" in msg and "c_attn.bias (a bias)" in msg
    assert not (tmp_path / "x").exists()  # nothing written
    report = export_lora(tau, tmp_path / "x", rank=8, skip_unsupported=True)
    assert set(report["skipped"]) == set(refused) and 0 < report["skipped_energy"] < 1


def test_truncation_error_is_the_svd_tail(tmp_path):
    aligned, base = _pair("llama")
    tau = compute_task_vector(aligned, base, include=r"q_proj", progress=False)  # dense
    report = export_lora(tau, tmp_path / "a", rank=1)
    for module, r in report["modules"].items():
        mat = (aligned.get_parameter(module + ".weight") - base.get_parameter(module + ".weight")).double()
        s = torch.linalg.svdvals(mat)
        want = float(s[1:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert abs(r["truncation_error"] - want) < 1e-5, module


def test_bad_rank_old_files_and_the_ladder(tmp_path):
    aligned, base = _pair("llama")
    tau = compute_task_vector(aligned, base, include=PROJ, rank=8, progress=False)
    with pytest.raises(ConfigError, match="vLLM's ranks"):
        export_lora(tau, tmp_path / "a", rank=7)
    meta = json.loads(json.dumps(tau.meta))
    for p in meta["task"]["params"].values():
        p.pop("module")
    old = SteeringVector({}, meta, None, tau.extra)
    with pytest.raises(VectorFileError, match="recompute"):
        export_lora(old, tmp_path / "b", rank=8)
    reports = export_lora_ladder(tau, tmp_path / "ladder", "safety", [0.5, 1, 2], rank=8)
    assert sorted(reports) == ["safety@0.5", "safety@1", "safety@2"]
    assert all((tmp_path / "ladder" / t / "adapter_model.safetensors").exists() for t in reports)


def test_cli_export_lora(tmp_path):
    from typer.testing import CliRunner

    from steer.cli import app

    aligned, base = _pair("llama")
    f = compute_task_vector(aligned, base, include=PROJ, rank=8, progress=False).save(tmp_path / "t.safetensors")
    r = CliRunner().invoke(app, ["export", "lora", str(f), "-o", str(tmp_path / "out"), "--rank", "8"])
    assert r.exit_code == 0, r.output
    assert "max truncation error" in r.stdout and "--lora-modules" in r.stdout
    r = CliRunner().invoke(app, ["export", "lora", str(f), "-o", str(tmp_path / "o2"), "--rank", "3"])
    assert r.exit_code == 2 and "vLLM's ranks" in r.output
