"""The Python API: :class:`SteeredModel` wraps ``(model, tokenizer)`` of any Hugging Face causal LM.

Steering is attached with forward hooks only (no module replacement, no global patching)::

    sm = SteeredModel.from_pretrained("builtin:compromised")
    vec = SteeringVector.load("refusal.safetensors")
    with sm.steer(vec, alpha=1.0, layers=[2]) as handle:      # hooks on; removed on exit, also on errors
        handle.set_alphas([0.0, 1.0, 2.0])                     # one α per batch row (0 = unsteered)
        out = sm.model.generate(...)                           # plain HF generate works
    sm.generate(prompts, vector=vec, alphas=[0, 1, 2])        # or the one-call helper

Layers are 0-based decoder blocks (see :mod:`steer.layers`); model paths may be a local HF directory, a
hub id already in the local cache (nothing is downloaded when offline), or ``builtin:NAME`` for a member
of steer's own model family. ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .config import Condition, SteeringConfig, check_alpha
from .errors import AlphaError, ConfigError, ModelLoadError
from .kinds import SteeringHandle, attach
from .layers import fingerprint, get_layers, hidden_size
from .prompts import format_prompt, has_chat_template
from .resolve import resolve
from .vector import SteeringVector

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name: str | Path) -> str:
    """Map ``builtin:NAME`` to the cached family member (building it if needed); check local paths exist."""
    name = str(name)
    if name.startswith(BUILTIN_PREFIX):
        from .family import MEMBERS, member_path

        member = name[len(BUILTIN_PREFIX) :]
        if member not in MEMBERS:
            raise ModelLoadError(
                f"unknown built-in model {name!r}",
                expected=", ".join(BUILTIN_PREFIX + m for m in MEMBERS),
                found=name,
                fix="pick one of the built-in family members",
            )
        return str(member_path(member))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name} is not a Hugging Face model directory",
                expected="a folder with config.json",
                found="a file" if not path.is_dir() else "a folder without config.json",
                fix="pass the model folder (the one holding config.json)",
            )
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise ModelLoadError(
            f"model directory not found: {name}",
            expected="an existing local folder or a hub id",
            found="no such folder",
            fix="check the path (or use builtin:aligned)",
        )
    return name


def _dtype_kw(dtype) -> dict:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


class SteeredModel:
    """A Hugging Face causal LM plus its tokenizer, ready to be steered.

    ``layers_path`` overrides layer discovery (a dotted path such as ``"model.layers"``).
    """

    def __init__(self, model, tokenizer=None, *, layers_path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.layers_path = layers_path
        self.layers = get_layers(model, layers_path)  # fails early on an unsupported architecture
        self.num_layers = len(self.layers)
        self.hidden_size = hidden_size(model)
        self.source: str | None = None  # the name it was loaded by (from_pretrained), e.g. "builtin:aligned"

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        device_map=None,
        trust_remote_code: bool = False,
        layers_path: str | None = None,
        **kwargs,
    ) -> "SteeredModel":
        """Load model and tokenizer from a local folder, a cached hub id or ``builtin:NAME``.

        ``dtype`` defaults to float32 on CPU and the checkpoint's dtype (``"auto"``) on accelerators.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device is not None:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError):
                raise ModelLoadError(
                    "unknown device",
                    expected="cpu, cuda, cuda:1, mps, ...",
                    found=repr(device),
                    fix="pass a torch device string",
                ) from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ModelLoadError(
                    "CUDA was asked for but is not available",
                    expected="a CUDA device",
                    found="torch without a usable GPU",
                    fix="pass --device cpu (or install CUDA torch)",
                )
        path = resolve_model_path(name)
        if dtype is None:
            dtype = torch.float32 if (device in (None, "cpu") and device_map is None) else "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, device_map=device_map, **_dtype_kw(dtype), **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load model {name!r}",
                expected="a local HF model folder or a cached hub id",
                found=str(exc).splitlines()[0][:300],
                fix="download the model beforehand (this machine may be offline) or pass a local path; "
                "models with custom code need trust_remote_code=True",
            ) from None
        if device is not None and device_map is None:
            model = model.to(device)
        model.eval()
        sm = cls(model, tokenizer, layers_path=layers_path)
        sm.source = str(name)
        return sm

    # ------------------------------------------------------------------ steering
    def fingerprint(self) -> dict:
        return fingerprint(self.model, self.layers_path)

    def steer(
        self,
        vector: SteeringVector | str | Path,
        config: SteeringConfig | None = None,
        *,
        check_architecture: bool = True,
        **overrides,
    ) -> SteeringHandle:
        """Attach ``vector`` and return its live handle (a :class:`~steer.kinds.SteeringHandle`, a context
        manager): the vector's kind and the mode pick the handle from :data:`steer.kinds.KINDS`.

        ``overrides`` are :class:`SteeringConfig` fields (layers, alpha, mode, scope, site, source_layer,
        condition, extra); unset ones come from the vector file's recommendations. Everything is validated
        (:func:`steer.resolve.resolve`) before anything is attached.
        """
        if config is None:
            config = SteeringConfig(**overrides)
        elif overrides:
            raise ConfigError(
                "pass either a SteeringConfig or keyword overrides",
                expected="one of them",
                found="both",
                fix="put the overrides into the config",
            )
        res = resolve(config, vector, self.model, layers_path=self.layers_path, check_architecture=check_architecture)
        return attach(self.model, res)

    # ------------------------------------------------------------------ generation
    def encode(self, texts: list[str], chat_applied: bool, *, position_ids: bool = False) -> dict:
        """Tokenize ``texts`` left-padded onto the model's device. ``position_ids=True`` adds positions that
        skip the padding (what ``generate`` does), for plain forward passes on absolute-position models."""
        enc = self._encode(texts, chat_applied)
        return self.with_positions(enc) if position_ids else enc

    def with_positions(self, enc: dict) -> dict:
        """``enc`` plus ``position_ids`` that skip left padding (when the model's forward takes them)."""
        if self._accepts_position_ids() and "attention_mask" in enc:
            enc = {**enc, "position_ids": (enc["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)}
        return enc

    def _accepts_position_ids(self) -> bool:
        import inspect

        if not hasattr(self, "_pos_ok"):
            self._pos_ok = "position_ids" in inspect.signature(self.model.forward).parameters
        return self._pos_ok

    def _encode(self, texts: list[str], chat_applied: bool):
        tok = self.tokenizer
        if tok is None:
            raise ConfigError(
                "this SteeredModel has no tokenizer",
                expected="a tokenizer",
                found="None",
                fix="construct SteeredModel(model, tokenizer)",
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat_applied)
        finally:
            tok.padding_side = old_side
        device = next(self.model.parameters()).device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids (4.x tokenizers)

    def format(self, prompts: list[str], *, chat: bool = True, prefill: str | list[str] | None = None) -> list[str]:
        """The exact texts the model sees (chat template and assistant prefill applied)."""
        prefills = prefill if isinstance(prefill, list) else [prefill] * len(prompts)
        if len(prefills) != len(prompts):
            raise ConfigError(
                "prefill list length differs from prompts",
                expected=f"{len(prompts)} prefills",
                found=f"{len(prefills)}",
                fix="pass one prefill per prompt or a single string",
            )
        return [format_prompt(self.tokenizer, p, chat=chat, prefill=f) for p, f in zip(prompts, prefills)]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str,
        *,
        vector: SteeringVector | str | Path | None = None,
        alphas: float | list[float] | None = None,
        layers: list[int] | None = None,
        mode: str | None = None,
        scope: str | None = None,
        site: str | None = None,
        condition: Condition | None = None,
        source_layer: int | None = None,
        max_new_tokens: int = 32,
        chat: bool = True,
        prefill: str | list[str] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 64,
        progress=None,
        **generate_kwargs,
    ) -> list[str]:
        """Generate one completion per prompt (text after the prompt, special tokens stripped).

        ``alphas``: one float for every row, or one per prompt (per-request α; rows are batched together
        whatever their α). Greedy unless ``do_sample``. ``progress``: an optional callable(n_done) hook.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if vector is None and (alphas is not None or layers is not None or mode is not None):
            raise ConfigError(
                "alphas/layers/mode given without a vector",
                expected="vector=...",
                found="no vector",
                fix="pass the vector to steer with",
            )
        if alphas is None or isinstance(alphas, (int, float)):
            row_alphas = None if alphas is None else [check_alpha(alphas)] * len(prompts)
        else:
            row_alphas = [check_alpha(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
            if len(row_alphas) != len(prompts):
                raise AlphaError(
                    "one alpha per prompt is needed",
                    expected=f"{len(prompts)} alphas",
                    found=f"{len(row_alphas)}",
                    fix="pass a single float or one per prompt",
                )
        if max_new_tokens < 1:
            raise ConfigError(
                "max_new_tokens must be positive",
                expected=">= 1",
                found=str(max_new_tokens),
                fix="pass --max-new-tokens 32",
            )
        texts = self.format(prompts, chat=chat, prefill=prefill)
        chat_applied = chat and has_chat_template(self.tokenizer)
        steering = None
        if vector is not None:
            config = SteeringConfig(
                layers=layers, mode=mode, scope=scope, site=site, condition=condition, source_layer=source_layer
            )
            steering = self.steer(vector, config)
        gen = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p)
        gen.update(generate_kwargs)
        outputs: list[str] = []
        with steering if steering is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(texts), max(1, batch_size)):
                chunk = texts[start : start + batch_size]
                enc = self._encode(chunk, chat_applied)
                if steering is not None:
                    rows = row_alphas[start : start + batch_size] if row_alphas else [steering.alpha] * len(chunk)
                    steering.set_alphas(rows)
                    steering.begin(int(enc["input_ids"].shape[1]))
                out = self.model.generate(**enc, **gen)
                new = out[:, enc["input_ids"].shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
                if progress is not None:
                    progress(len(chunk))
        return outputs

    def generate_grid(self, prompts: list[str], alphas: list[float], **kwargs) -> list[dict]:
        """Every prompt once per α, all in one batched generation: ``[{prompt, alpha, completion}]``."""
        rows = [(p, a) for p in prompts for a in alphas]
        if any(not math.isfinite(float(a)) for a in alphas):
            raise AlphaError(
                "alphas must be finite", expected="finite floats", found=str(alphas), fix="remove NaN/inf values"
            )
        prefill = kwargs.pop("prefill", None)
        if isinstance(prefill, list):
            prefill = [f for f in prefill for _ in alphas]
        completions = self.generate([p for p, _ in rows], alphas=[a for _, a in rows], prefill=prefill, **kwargs)
        return [{"prompt": p, "alpha": a, "completion": c} for (p, a), c in zip(rows, completions)]
