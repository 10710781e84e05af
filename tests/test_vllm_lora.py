"""A task vector exported by `steer export lora`, served by vLLM (offline `LLM` with a `LoRARequest`): greedy
tokens equal transformers + PEFT with the same adapter, per α of the ladder; without the adapter vLLM equals
plain transformers. Runs where vLLM is installed (`make test-vllm`); skipped elsewhere.

vLLM's CPU attention refuses head_dim 16 and below, so the models here are wider than tests/tiny_models.py's.
"""

import os

import pytest
import torch
from tiny_models import tiny_tokenizer, wide_model

vllm = pytest.importorskip("vllm")
peft = pytest.importorskip("peft")

from steer.vectors.lora import export_lora_ladder  # noqa: E402
from steer.vectors.task import compute_task_vector  # noqa: E402

PROMPTS = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33"]
ALPHAS = [0.5, 1.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn
    root = tmp_path_factory.mktemp("vllm_lora")
    base, aligned = wide_model("llama", 0), wide_model("llama", 1)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    tau = compute_task_vector(aligned, base, include=r"proj", rank=8, progress=False)
    reports = export_lora_ladder(tau, root / "adapters", "safety", ALPHAS, rank=8, base_model_name_or_path="base")
    llm = vllm.LLM(
        str(root / "base"), dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=8, max_model_len=128
    )
    yield llm, root, reports
    del llm


def _hf_greedy(model, prompt, n=8):
    ids = tiny_tokenizer()(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_vllm_serves_the_exported_adapter_like_peft(served):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm, root, reports = served
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = llm.generate(PROMPTS, sp)
    for p, o in zip(PROMPTS, plain):
        assert list(o.outputs[0].token_ids) == _hf_greedy(wide_model("llama", 0), p)
    for i, (tag, rep) in enumerate(reports.items(), start=1):
        assert rep["max_truncation_error"] < 1e-5
        outs = llm.generate(PROMPTS, sp, lora_request=LoRARequest(tag, i, rep["dir"]))
        pm = peft.PeftModel.from_pretrained(wide_model("llama", 0), rep["dir"]).eval()
        changed = False
        for p, o, o0 in zip(PROMPTS, outs, plain):
            got = list(o.outputs[0].token_ids)
            assert got == _hf_greedy(pm, p), (tag, p)
            changed |= got != list(o0.outputs[0].token_ids)
        assert changed, tag  # the adapter changes what the model says
