"""steer as a vLLM plugin: per-request activation steering on unmodified vLLM, with ``steer serve``'s JSON.

Installed next to vLLM (``pip install "steer-runtime[vllm]"``), two entry points make ``vllm serve MODEL`` and
``LLM(...)`` steer without flags beyond eager mode:

* ``vllm.general_plugins`` → :func:`register` (runs in every vLLM process): re-registers the supported
  architectures (Llama, Mistral, Qwen2, Qwen3 and GPT-2) as subclasses that wrap their decoder layers
  (:mod:`.models`), with the public ``ModelRegistry.register_model``. A request with no ``steer`` runs vanilla:
  its rows get coefficient 0.
* ``vllm.logits_processors`` → :class:`steer.vllm.batch.SteerBatch`: vLLM's documented per-request hook. Its
  ``validate_params`` checks a request's ``steer`` field when the request arrives (a bad one is refused with a
  400 before it is scheduled); its ``update_state`` mirrors the persistent batch (requests added, removed,
  moved) into the per-slot buffers the layers read. It never changes logits.

Vectors are preloaded from ``STEER_VECTORS="NAME=FILE,NAME=FILE"`` (an environment variable every vLLM process
sees) and validated against the model at engine start (:mod:`.state`). Per request: ``SamplingParams(
extra_args={"steer": json.dumps(spec)})`` offline, ``vllm_xargs: {"steer": "<json>"}`` over HTTP, where spec is
exactly ``steer serve``'s ``steer`` field (:func:`steer.serve.protocol.parse_steer`).

Prefix caching: a prompt block computed under one steering must never serve a request with other steering or
none. vLLM keys cached blocks by the prompt and the request's ``cache_salt``; :func:`register` wraps the
frontend's ``InputProcessor.process_inputs`` so that a request with a ``steer`` field gets the salt
``steer-<sha256(steer, client salt)>`` (a request without one keeps its own salt: vanilla). If that wrapper
cannot be installed (vLLM moved the method), a model with prefix caching on is refused at start with the fix
(``--no-enable-prefix-caching``) instead of serving cached blocks across steerings.

What this first slice supports and refuses is in docs/serving.md ("steer on vLLM").
"""

from __future__ import annotations

import functools
import hashlib
import inspect

ARCHITECTURES = {
    "LlamaForCausalLM": "steer.vllm.models:SteeredLlamaForCausalLM",
    "MistralForCausalLM": "steer.vllm.models:SteeredMistralForCausalLM",
    "Qwen2ForCausalLM": "steer.vllm.models:SteeredQwen2ForCausalLM",
    "Qwen3ForCausalLM": "steer.vllm.models:SteeredQwen3ForCausalLM",
    "GPT2LMHeadModel": "steer.vllm.models:SteeredGPT2LMHeadModel",
}

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent: vLLM calls it once per process, possibly more)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    salt_prefix_cache()
    _registered = True


def steer_salt(extra_args, client_salt: str | None) -> str | None:
    """The cache salt of a request with a ``steer`` field (None: no steer field, the salt stays the client's)."""
    raw = (extra_args or {}).get("steer")
    if raw is None:
        return None
    text = raw if isinstance(raw, str) else repr(raw)
    return "steer-" + hashlib.sha256(f"{text}\0{client_salt or ''}".encode()).hexdigest()[:48]


def salt_prefix_cache() -> bool:
    """Wrap vLLM's ``InputProcessor.process_inputs`` to salt steered requests (idempotent); False if the method
    is not where (or not what) this plugin expects."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        return False
    original = getattr(InputProcessor, "process_inputs", None)
    if original is None:
        return False
    if getattr(original, "_steer_salted", False):
        return True
    if list(inspect.signature(original).parameters)[:4] != ["self", "request_id", "prompt", "params"]:
        return False

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        salt = steer_salt(getattr(params, "extra_args", None), getattr(request, "cache_salt", None))
        if salt is not None:
            if getattr(request, "prompt_token_ids", None) is None:
                # the plugin tells prompt from generated tokens by the prompt's length, which embeddings hide
                raise ValueError("steer: requests given as prompt embeddings cannot be steered; send token ids or text")
            request.cache_salt = salt
        return request

    process_inputs._steer_salted = True
    InputProcessor.process_inputs = process_inputs
    return True


def prefix_cache_is_salted() -> bool:
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        return False
    return bool(getattr(getattr(InputProcessor, "process_inputs", None), "_steer_salted", False))
