"""`steer bake`: the baked HF directory's logits equal the runtime-steered model's (fp32, 1e-4)."""

import pytest
import torch
from tiny_models import D, L, save_tiny, tiny_model
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.bake import runtime_ablation, writer_modules
from steer.cli import app
from steer.config import SteeringConfig
from steer.errors import ModelMismatchError
from steer.hooks import Steering
from steer.params import MergedTaskSteering
from steer.vectors.task import compute_task_vector

IDS = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("exact_and_one_thread")


def _bake(tmp_path, src, vec_path, *extra):
    out = tmp_path / "baked"
    res = CliRunner().invoke(app, ["bake", str(src), "--vector", str(vec_path), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return SteeredModel.from_pretrained(out)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bake_ablation_equals_runtime(tmp_path, arch):
    src = save_tiny(tmp_path / "m", arch)
    r = torch.randn(D, generator=torch.Generator().manual_seed(3))
    vec = SteeringVector({1: r, 2: r.clone()}, {"kind": "refusal", "op": "ablate"})
    vec.save(tmp_path / "r.safetensors")
    sm = SteeredModel.from_pretrained(src)
    with runtime_ablation(sm, vec):  # block-0 input + every attention output + every block output
        want = sm.model(IDS).logits
    one = SteeringVector({0: r}, {"op": "ablate"})
    with (
        Steering(sm.model, one, SteeringConfig(mode="ablate", site="input", layers=[0], alpha=1.0)),
        Steering(sm.model, one, SteeringConfig(mode="ablate", layers=list(range(L)), alpha=1.0)),
    ):
        block_sites_only = sm.model(IDS).logits
    base = sm.model(IDS).logits
    got = _bake(tmp_path, src, tmp_path / "r.safetensors").model(IDS).logits
    assert (got - want).abs().max() <= 1e-4
    # block sites alone miss the mid-block residual the MLP reads: not the equivalent
    assert (block_sites_only - want).abs().max() > 1e-4 and (base - want).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bake_task_vector_equals_runtime(tmp_path, arch):
    src = save_tiny(tmp_path / "m", arch)
    sm = SteeredModel.from_pretrained(src)
    vec = compute_task_vector(tiny_model(arch, seed=7), sm.model, rank=3, progress=False)
    vec.save(tmp_path / "t.safetensors")
    with sm.steer(vec, alpha=0.6) as h:  # per-request low-rank path
        want = sm.model(IDS).logits
    with MergedTaskSteering(sm.model, vec, 0.6):
        merged = sm.model(IDS).logits
    got = _bake(tmp_path, src, tmp_path / "t.safetensors", "--alpha", "0.6").model(IDS).logits
    assert not h.active and (got - want).abs().max() <= 1e-4 and (got - merged).abs().max() <= 1e-5


def test_bake_errors(tmp_path):
    src = save_tiny(tmp_path / "m", "llama")
    SteeringVector({1: torch.ones(D)}, {"op": "add"}).save(tmp_path / "a.safetensors")
    res = CliRunner().invoke(
        app, ["bake", str(src), "--vector", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "ablate" in res.output
    with pytest.raises(ModelMismatchError, match="post-norm"):
        writer_modules(tiny_model("gemma2"))
    with pytest.raises(ModelMismatchError, match="WRITERS"):
        writer_modules(tiny_model("qwen3_moe"))
