"""Hooks that steer a model, with per-request α, token scope and a per-row conditional gate.

One :class:`Steering` = one vector applied with one config. Attaching validates everything first
(vector vs model, layers, condition), moves the vectors to each layer's device once, and only then
registers hooks: torch pre/post hooks on the model (the pre-hook reads the KV-cache length, so it knows which
positions are prompt and which are generated) and one :class:`~steer.handle.ForwardWrap` per steered layer
(plus one on the condition layer), which runs like a forward hook without torch's hook dispatch. Hooks
read persistent per-row buffers (coefficients ``coef`` [B, J+K] and the gated copy ``coef_eff``) that
:meth:`Steering.set_alphas` and the gate update in place; nothing is allocated per layer per token beyond
the op itself. The handle is a context manager and ``remove()`` is idempotent: hooks always come off.

Under the KV cache a decode step has length 1; the root hook reads the past length from the forward's
arguments (:func:`steer.positions.past_length`: cache, attention mask and position ids, whatever names the
installed transformers uses) and computes absolute positions as ``past_length + arange(T)``; it compares
them with the prompt length recorded at prefill (past length 0), so ``scope="generated"`` steers every
generated token and ``scope="prompt"`` none of them. With left padding (what generation uses) every row
shares the padded prompt length, so the rule holds per row.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SteeringConfig, check_gates, row_alphas, spread_rows
from .errors import ConfigError
from .handle import ForwardWrap, HookSet
from .layers import get_layers
from .positions import past_length
from .resolve import Resolved, resolve
from .vector import SteeringVector


def _layer_device(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


def _compile_sites(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The root, every module on the way down to ``blocks``, and the blocks: where torch.compile can be applied
    so that the steering hooks run traced (``model.compile()``, ``model.model.compile()``, ``block.compile()``,
    ``module.forward = torch.compile(module.forward)``)."""
    by_name = dict(model.named_modules())
    name_of = {id(m): name for name, m in by_name.items()}
    sites = {id(model): model}
    for block in blocks:
        parts = name_of[id(block)].split(".") if id(block) in name_of else []
        for m in [by_name[".".join(parts[:k])] for k in range(1, len(parts) + 1)] + [block]:
            sites[id(m)] = m
    return list(sites.values())


def _compiled(sites: list[nn.Module]) -> bool:
    for m in sites:
        if getattr(m, "_compiled_call_impl", None) is not None or hasattr(
            m.__dict__.get("forward"), "_torchdynamo_orig_callable"
        ):
            return True
    return False


def _replace_hidden(output, h):
    if isinstance(output, torch.Tensor):
        return h
    return (h, *output[1:])


class Steering(HookSet):
    """A live steering intervention on ``model``; use as a context manager or call :meth:`remove`.

    Prefer :meth:`steer.SteeredModel.steer`; this class is the mechanism underneath. ``Steering(model, vector,
    config)`` resolves (:func:`steer.resolve.resolve`, which validates everything) and then attaches;
    :meth:`from_resolved` attaches a result resolved before.
    """

    def __init__(
        self,
        model: nn.Module,
        vector: SteeringVector,
        config: SteeringConfig | None = None,
        *,
        layers_path: str | None = None,
        check_architecture: bool = True,
    ):
        res = resolve(config, vector, model, layers_path=layers_path, check_architecture=check_architecture)
        if res.op is None:  # only activation steering resolves to an op
            raise ConfigError(
                "Steering applies activation steering",
                expected="a vector of directions (refusal, sae, custom) in an op's mode",
                found=f"{res.kind} (vector kind {vector.kind!r})",
                fix="use SteeredModel.steer, which picks the handle for every kind",
            )
        self._attach(model, res)

    @classmethod
    def from_resolved(cls, model: nn.Module, res: Resolved) -> "Steering":
        self = cls.__new__(cls)
        self._attach(model, res)
        return self

    def _attach(self, model: nn.Module, res: Resolved) -> None:
        self.model, self.resolved = model, res
        self.op, self.scope, self.site = res.mode, res.scope, res.site
        self.layers, self.alpha, self.condition = list(res.layers), res.alpha, res.condition
        self.blocks = blocks = get_layers(model, res.layers_path)
        self.n_ablate = res.n_ablate
        # per-layer operands [M, d] fp32 on the layer's device, moved once here, and the op's kernel plan (the
        # implementation chosen once, here: steer.kernels.plan_for for the built-in ops)
        self._vecs = {l: v.to(_layer_device(blocks[l])).contiguous() for l, v in res.operands.items()}
        self._plans = {l: res.op.plan(v, res.n_ablate) for l, v in self._vecs.items()}
        self._devices = sorted({v.device for v in self._vecs.values()}, key=str)
        if self.condition is not None:
            c = self.condition.direction.float()
            self._cond_dir = (c / c.norm()).to(_layer_device(blocks[self.condition.layer]))
        # ---- per-row state
        self._alphas = torch.tensor([self.alpha], dtype=torch.float32)
        self._coef: dict[torch.device, torch.Tensor] = {}
        self._coef_eff: dict[torch.device, torch.Tensor] = {}
        self._build_coef(self._alphas)
        self.prompt_length: int | None = None  # the padded prompt length of this batch (begin); else inferred
        self.last_scores: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None
        self._prefill = True
        self._skip = False
        self._decode = False  # this forward feeds one token per row (set by the root hook)
        self._eager = True  # ... and is not traced by torch.compile (of the whole model or any part of it)
        self._mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._attn: torch.Tensor | None = None
        self._prompt_len = 0
        self._handles: list = []
        self._register()

    def begin(self, prompt_length: int | None = None) -> None:
        """A new batch of requests whose (left-padded) prompts are ``prompt_length`` tokens long; None lets the
        first forward at cache length 0 say it (a longer uncached forward is then a new prompt too).

        ``begin(0)``: the rows are past their prompts, so every token fed from now on is a generated token
        whatever the cache length (a scheduler that trims or merges caches between decode steps says so)."""
        self.prompt_length = None if prompt_length is None else int(prompt_length)
        if self.prompt_length is not None:
            self._prompt_len = self.prompt_length

    # ------------------------------------------------------------------ per-row α
    @torch.inference_mode(False)  # persistent buffers must stay writable outside inference mode
    def _build_coef(self, alphas: torch.Tensor) -> None:
        m = next(iter(self._vecs.values())).shape[0]
        coef = self.resolved.op.coefficients(alphas.float(), self.n_ablate, m)
        for dev in self._devices:
            c = coef.to(dev).clone(memory_format=torch.contiguous_format)  # a normal tensor, ours alone
            if dev in self._coef and self._coef[dev].shape == c.shape:
                self._coef[dev].copy_(c)
            else:
                self._coef[dev] = c
            if self.condition is None:
                self._coef_eff[dev] = self._coef[dev]
            elif dev in self._coef_eff and self._coef_eff[dev].shape == c.shape:
                self._coef_eff[dev].zero_()  # gate closed until the next prefill decides
            else:
                self._coef_eff[dev] = torch.zeros_like(c)
        self._update_plans()

    def _update_plans(self) -> None:
        for layer, plan in self._plans.items():
            plan.update(self._coef_eff[self._vecs[layer].device])

    def set_alphas(self, alphas) -> None:
        """Give every batch row its own strength (a float sets one α for all rows). 0 = unsteered row."""
        self._alphas = row_alphas(alphas)
        self._build_coef(self._alphas)

    def set_gates(self, gates) -> None:
        """Set every row's gate (bools, one per row of the last :meth:`set_alphas`) instead of deciding it at the
        next prefill: a scheduler that moves rows between batches carries each row's decision
        (``last_gate``) with it."""
        g = check_gates(self.condition, gates, next(iter(self._coef.values())).shape[0])
        for dev in self._devices:
            torch.mul(self._coef[dev], g.to(dev, torch.float32)[:, None], out=self._coef_eff[dev])
        self._update_plans()

    def _fit_rows(self, batch: int) -> None:
        if next(iter(self._coef.values())).shape[0] != batch:  # one coefficient row per batch row
            self._build_coef(spread_rows(self._alphas, batch))

    # ------------------------------------------------------------------ hooks
    def _register(self) -> None:
        hooked = set(self.layers) | ({self.condition.layer} if self.condition is not None else set())
        self._compile_sites = _compile_sites(self.model, [self.blocks[i] for i in sorted(hooked)])
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._end_forward, always_call=True))
            for i in sorted(hooked):
                block = self.blocks[i]
                if self.condition is not None and i == self.condition.layer:
                    # the gate reads the block's own output, before any steering at this block (whatever
                    # handle attached it, and when): a condition does not depend on attach order
                    self._handles.append(ForwardWrap(block, observe=self._make_output_hook(i, gate=True)))
                if i in self.layers:
                    if self.site == "output":
                        self._handles.append(ForwardWrap(block, post=self._make_output_hook(i, gate=False)))
                    else:
                        self._handles.append(ForwardWrap(block, pre=self._make_input_hook(i)))
            self._watch_wraps()
        except BaseException:
            self.remove()
            raise

    def _begin_forward(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if not isinstance(x, torch.Tensor):
            return None
        batch, seq = int(x.shape[0]), int(x.shape[1]) if x.dim() > 1 else 1
        self._decode = seq == 1  # one token per row (the plan's decode path)
        # once per forward, not per layer (a call costs microseconds in a decode): a traced hook must make no pybind
        # call (the native op) and no out= into a view. A part compiled on its own (a block, the inner model) is
        # traced inside an eager root forward. (torch.jit.trace and dispatch modes: the native op refuses them.)
        self._eager = not (torch.compiler.is_compiling() or _compiled(self._compile_sites))
        if self._eager:
            self._check_wraps()  # still ours on every steered block? (warns once if replaced)
        if self.scope == "all" and self.condition is None:
            # nothing depends on positions: skip the cache-length read (a device sync / graph break)
            self._fit_rows(batch)
            return None
        past = past_length(args, kwargs, seq)
        # a new request starts at cache length 0; with a known prompt length (SteeredModel.generate) a longer
        # uncached step (use_cache=False re-feeds prompt + generated tokens) is not a new prefill
        self._prefill = past == 0 and (self.prompt_length is None or seq <= self.prompt_length)
        if past == 0:
            self._prompt_len = self.prompt_length if self.prompt_length is not None else seq
        if self._prefill:
            attn = kwargs.get("attention_mask")
            self._attn = attn[:, :seq] if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None
            self._fit_rows(batch)
        n_prompt = max(0, min(self._prompt_len - past, seq))
        self._masks = {}
        self._mask = None
        if self.scope == "all":
            self._skip = False
        elif self.scope == "prompt":
            self._skip = n_prompt == 0
            if 0 < n_prompt < seq:
                self._mask = (torch.arange(seq) < n_prompt)[None].expand(batch, seq)
        else:
            self._skip = n_prompt == seq
            if 0 < n_prompt < seq:
                self._mask = (torch.arange(seq) >= n_prompt)[None].expand(batch, seq)
        return None

    def _end_forward(self, module, args, output):
        self._decode = False  # the decode flag belongs to one model forward (layers called alone never see it)
        return None

    def _mask_on(self, device: torch.device) -> torch.Tensor | None:
        if self._mask is None:
            return None
        if device not in self._masks:
            self._masks[device] = self._mask.to(device)
        return self._masks[device]

    def _steer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Steer a copy of ``h`` (a block's input belongs to the previous block's output too)."""
        return self._plans[layer].steer_(h.clone(), self._mask_on(h.device), self._decode, self._eager)

    def _decide_gate(self, h: torch.Tensor) -> None:
        score, gate = self.condition.decide(h, self._cond_dir, self._attn)
        self.last_scores, self.last_gate = score, gate
        for dev in self._devices:
            torch.mul(self._coef[dev], gate.to(dev, torch.float32)[:, None], out=self._coef_eff[dev])
        self._update_plans()

    def _make_output_hook(self, layer: int, gate: bool):
        if gate:

            def gate_hook(module, args, output):
                if self._prefill:
                    self._decide_gate(output if isinstance(output, torch.Tensor) else output[0])
                return None

            return gate_hook
        plan, dev = self._plans[layer], self._vecs[layer].device
        tensor, grad_enabled = torch.Tensor, torch.is_grad_enabled

        def hook(module, args, output):  # hot path: the plan picks the kernel path (steer.kernels.plan_for)
            if self._skip:
                return None
            h = output if type(output) is tensor else output[0]
            mask = self._mask if self._mask is None else self._mask_on(dev)
            if h.requires_grad and grad_enabled():
                return _replace_hidden(output, plan.steer_(h.clone(), mask, False, self._eager))
            plan.steer_(h, mask, self._decode, self._eager)
            return None

        return hook

    def _make_input_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._skip:
                return None
            if args:
                return (self._steer(args[0], layer), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._steer(kwargs["hidden_states"], layer)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------ lifetime
    def __repr__(self) -> str:
        return (
            f"Steering(op={self.op!r}, layers={self.layers}, alpha={self.alpha}, scope={self.scope!r}, "
            f"site={self.site!r}, conditional={self.condition is not None}, active={self.active})"
        )
