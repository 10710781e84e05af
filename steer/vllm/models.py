"""vLLM's own model classes, subclassed so that their decoder layers steer (registered by :func:`steer.vllm.register`
under the in-tree architecture names, so ``vllm serve MODEL`` picks them up).

Two layer contracts:

* **Llama, Mistral, Qwen2, Qwen3** return ``(hidden_states, residual)``. The residual stream, which is
  transformers' block output, is their sum; it is materialised only inside the next layer's fused add-norm (or
  the final norm). The wrapper steers that sum as steer's hooks steer transformers' block output and returns
  ``(steered, 0)``: the next layer's fused add then computes ``steered + 0``, and for a step in which no token is
  steered that is bit for bit the ``hidden + residual`` vanilla vLLM computes.
* **GPT-2** blocks return the stream itself; the steering is added to it. Block forwards get no positions, so
  the model's forward records them for the layers (for token scopes).

Per token, :meth:`steer.vllm.state.SteerState.steer` applies each vector's op (add, ablate, ablate_add, ace)
with the coefficients of the token's request: its slot (from ``query_start_loc`` in vLLM's forward context)
selects its α per vector at this layer, masked by its scope. A token whose request is unsteered is unchanged.

vLLM's CPU platform compiles the model by default (one Dynamo trace). A layer wrapper that reads per-step
state would be traced once and replayed with stale values, which would steer silently wrong, so a model that is
going to be compiled is refused at init with the fix (``enforce_eager=True`` / ``--enforce-eager``).
"""

from __future__ import annotations

import torch
from vllm.config.compilation import CompilationMode
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from steer.errors import ConfigError

from .state import SteerState, get_state, load_vectors, set_state


def _query_start_loc():
    """This step's per-request token offsets, or None outside a real forward (vLLM's dummy and profile runs)."""
    meta = get_forward_context().attn_metadata
    if not meta:
        return None
    if isinstance(meta, list):  # micro-batched forwards: refused at init (_setup)
        return None
    return next(iter(meta.values())).query_start_loc


def _setup(model, vllm_config, layers) -> SteerState | None:
    vectors = load_vectors()
    if not vectors:
        set_state(None)  # this engine steers nothing (an earlier engine's state must not linger)
        return None
    mode = vllm_config.compilation_config.mode
    if mode != CompilationMode.NONE:
        raise ConfigError(
            "steer's vLLM plugin needs an eager model",
            expected="compilation mode NONE (enforce_eager=True, `vllm serve --enforce-eager`)",
            found=f"compilation mode {CompilationMode(mode).name}",
            fix="start vLLM with --enforce-eager (LLM(..., enforce_eager=True))",
        )
    from . import prefix_cache_is_salted

    if vllm_config.cache_config.enable_prefix_caching and not prefix_cache_is_salted():
        raise ConfigError(
            "steer cannot keep vLLM's prefix cache apart per steering in this vLLM version",
            expected="InputProcessor.process_inputs(self, request_id, prompt, params, ...) to salt steered requests",
            found="no such method to wrap",
            fix="start vLLM with --no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))",
        )
    if getattr(vllm_config.parallel_config, "use_ubatching", False):
        raise ConfigError(
            "steer's vLLM plugin does not steer micro-batched forwards yet",
            expected="no dual-batch overlap / micro-batching",
            found=f"enable_dbo={vllm_config.parallel_config.enable_dbo}, "
            f"ubatch_size={vllm_config.parallel_config.ubatch_size}",
            fix="start vLLM without --enable-dbo and with ubatch_size 0 or 1",
        )
    hf = vllm_config.model_config.hf_config
    device = next(model.parameters()).device
    state = SteerState(
        vectors,
        hidden_size=int(hf.hidden_size),
        num_layers=len(layers),
        architecture=type(model).__name__,
        slots=int(vllm_config.scheduler_config.max_num_seqs),
        device=device,
    )
    set_state(state)
    return state


def _steered(state: SteerState, layer: int, positions: torch.Tensor, x: torch.Tensor):
    qsl = _query_start_loc()
    if qsl is None:
        return None
    return state.steer(layer, x, positions, qsl)


def _wrap_residual_layer(layer, index: int, state: SteerState) -> None:
    inner = layer.forward

    def forward(positions, hidden_states, residual, *args, **kwargs):
        h, r = inner(positions, hidden_states, residual, *args, **kwargs)
        x = _steered(state, index, positions, h + r)  # the residual stream = transformers' block output
        # (x, 0): the next layer's fused add (and the final norm) computes x + 0 = x, bit for bit what vanilla
        # computes from (h, r) when no token is steered
        return (h, r) if x is None else (x, torch.zeros_like(r))

    layer.forward = forward


def _residual_family(base):
    """A subclass of vLLM's ``base`` whose steered decoder layers are wrapped after vLLM builds the model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        layers = self.model.layers
        state = _setup(self, vllm_config, layers)
        if state is not None:
            for i in state.layers:
                if not isinstance(layers[i], PPMissingLayer):
                    _wrap_residual_layer(layers[i], i, state)

    return type(f"Steered{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


SteeredLlamaForCausalLM = _residual_family(LlamaForCausalLM)
SteeredMistralForCausalLM = _residual_family(MistralForCausalLM)
SteeredQwen2ForCausalLM = _residual_family(Qwen2ForCausalLM)
SteeredQwen3ForCausalLM = _residual_family(Qwen3ForCausalLM)


class SteeredGPT2LMHeadModel(GPT2LMHeadModel):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        blocks = self.transformer.h
        state = _setup(self, vllm_config, blocks)
        if state is None:
            return
        seen = {}
        outer = self.transformer.forward

        def transformer_forward(input_ids, position_ids, *args, **kwargs):
            seen["positions"] = position_ids  # block forwards get no positions: scopes read them here
            return outer(input_ids, position_ids, *args, **kwargs)

        self.transformer.forward = transformer_forward
        for i in state.layers:
            if isinstance(blocks[i], PPMissingLayer):
                continue
            inner = blocks[i].forward

            def forward(hidden_states, _inner=inner, _i=i):
                out = _inner(hidden_states)
                x = _steered(state, _i, seen["positions"], out)
                return out if x is None else x

            blocks[i].forward = forward


__all__ = [
    "SteeredGPT2LMHeadModel",
    "SteeredLlamaForCausalLM",
    "SteeredMistralForCausalLM",
    "SteeredQwen2ForCausalLM",
    "SteeredQwen3ForCausalLM",
    "get_state",
]
