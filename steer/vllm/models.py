"""vLLM's own model classes, subclassed so that their decoder layers steer (registered by :func:`steer.vllm.register`
under the in-tree architecture names, so ``vllm serve MODEL`` picks them up).

Two layer contracts:

* **Llama, Mistral, Qwen2, Qwen3** return ``(hidden_states, residual)``. The residual stream, which is
  transformers' block output, is their sum; it is materialised only inside the next layer's fused add-norm (or
  the final norm). Adding ``Σ_k c_k·v_k`` to ``residual`` therefore steers exactly what steer's hooks steer in
  transformers: ``h_out + α·v``.
* **GPT-2** blocks return the stream itself; the steering is added to it. Block forwards get no positions, so
  the model's forward records them for the layers (for token scopes).

Per token, the coefficients come from :meth:`steer.vllm.state.SteerState.token_coef`: the token's slot (from
``query_start_loc`` in vLLM's forward context) selects its request's α per vector at this layer, masked by
the request's scope. A row whose request is unsteered adds exactly 0.

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
    if isinstance(meta, list):  # micro-batched forwards: not supported yet (refused at init below)
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


def _delta(state: SteerState, layer: int, positions: torch.Tensor, like: torch.Tensor):
    qsl = _query_start_loc()
    if qsl is None:
        return None
    coef = state.token_coef(layer, positions, qsl)  # [T, K]
    return (coef @ state.bank[layer]).to(like.dtype)


def _wrap_residual_layer(layer, index: int, state: SteerState) -> None:
    inner = layer.forward

    def forward(positions, hidden_states, residual, *args, **kwargs):
        h, r = inner(positions, hidden_states, residual, *args, **kwargs)
        d = _delta(state, index, positions, r)
        return (h, r) if d is None else (h, r + d)

    layer.forward = forward


class _ResidualFamily:
    def _steer_init(self, vllm_config) -> None:
        layers = self.model.layers
        state = _setup(self, vllm_config, layers)
        if state is None:
            return
        for i in state.layers:
            if not isinstance(layers[i], PPMissingLayer):
                _wrap_residual_layer(layers[i], i, state)


class SteeredLlamaForCausalLM(_ResidualFamily, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._steer_init(vllm_config)


class SteeredMistralForCausalLM(_ResidualFamily, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._steer_init(vllm_config)


class SteeredQwen2ForCausalLM(_ResidualFamily, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._steer_init(vllm_config)


class SteeredQwen3ForCausalLM(_ResidualFamily, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._steer_init(vllm_config)


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
                d = _delta(state, _i, seen["positions"], out)
                return out if d is None else out + d

            blocks[i].forward = forward


__all__ = [
    "SteeredGPT2LMHeadModel",
    "SteeredLlamaForCausalLM",
    "SteeredMistralForCausalLM",
    "SteeredQwen2ForCausalLM",
    "SteeredQwen3ForCausalLM",
    "get_state",
]
