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

from steer.kernels import Plan, plan_for, steer_

from .config import Condition, SteeringConfig, check_alpha, row_alphas
from .errors import AlphaError, ConfigError, LayerError
from .handle import ForwardWrap, HookSet
from .layers import check_layers, fingerprint, get_layers
from .positions import past_length
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

    Prefer :meth:`steer.SteeredModel.steer`; this class is the mechanism underneath.
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
        config = config or SteeringConfig()
        self.model = model
        blocks = get_layers(model, layers_path)
        fp = fingerprint(model, layers_path)
        vector.check_model(fp, check_architecture=check_architecture)
        rec = vector.recommended
        mode = config.mode or rec.get("mode") or vector.meta.get("op") or "add"
        base_op = vector.meta.get("op", "add")
        self.op = (base_op if base_op != "conditional" else "add") if mode == "conditional" else mode
        self.scope = config.scope or rec.get("scope") or vector.meta.get("scope") or "all"
        self.site = config.site or vector.meta.get("site") or "output"
        self.layers = check_layers(config.layers or rec.get("layers") or vector.layers, len(blocks))
        alpha = config.alpha if config.alpha is not None else rec.get("alpha", 1.0)
        self.alpha = check_alpha(alpha)
        source = config.source_layer if config.source_layer is not None else rec.get("source_layer")
        self.condition = config.condition or (self._vector_condition(vector) if mode == "conditional" else None)
        if self.condition is not None:
            self.condition.layer = check_layers([self.condition.layer], len(blocks))[0]
            if self.condition.direction.shape[-1] != fp["hidden_size"]:
                raise ConfigError(
                    "condition direction has the wrong width",
                    expected=f"[{fp['hidden_size']}]",
                    found=str(tuple(self.condition.direction.shape)),
                    fix="use a condition computed on this model",
                )
            first = min(self.layers) - (1 if self.site == "input" else 0)
            if self.scope != "generated" and self.condition.layer > first:
                raise ConfigError(
                    "the condition is read after the first steered activation of the prompt",
                    expected=f"condition layer <= {first} (first steered {self.site} of layer {min(self.layers)})",
                    found=f"condition layer {self.condition.layer}",
                    fix="steer later layers, read the condition earlier, or use scope='generated'",
                )
        # ---- per-layer vectors: [J+K, d] fp32 on the layer's device, moved once here
        self.blocks = blocks
        self._vecs: dict[int, torch.Tensor] = {}
        self._plans: dict[int, Plan | None] = {}
        self.n_ablate = 0
        shapes = set()
        for layer in self.layers:
            d = self._pick_direction(vector, layer, source).reshape(-1, fp["hidden_size"]).float()
            if self.op != "add" and bool((d.norm(dim=-1) == 0).any()):
                raise ConfigError(
                    f"layer {layer}: cannot ablate a zero direction",
                    expected="non-zero directions",
                    found="a direction of norm 0",
                    fix="use mode='add' or a non-zero vector",
                )
            if self.op == "add":
                vecs, j = d, 0
            else:
                q = torch.linalg.qr(d.T).Q.T if d.shape[0] > 1 else d / d.norm(dim=-1, keepdim=True)
                vecs, j = (q, q.shape[0]) if self.op == "ablate" else (torch.cat([q, d]), q.shape[0])
            shapes.add((vecs.shape[0], j))
            self._vecs[layer] = vecs.to(_layer_device(blocks[layer])).contiguous()
            # CPU: operands derived once from the vectors and on every α/gate change from coef (kernels.Plan)
            self._plans[layer] = plan_for(self._vecs[layer], j)
            self.n_ablate = j
        if len(shapes) > 1:
            raise ConfigError(
                "layers carry different numbers of directions",
                expected="the same [k, d] shape at every steered layer",
                found=str(sorted(shapes)),
                fix="steer layers whose directions have the same shape",
            )
        self._devices = sorted({v.device for v in self._vecs.values()}, key=str)
        if self.condition is not None:
            cdev = _layer_device(blocks[self.condition.layer])
            c = self.condition.direction.float()
            self._cond_dir = (c / c.norm()).to(cdev)
        # ---- per-row state
        self._alphas = torch.tensor([self.alpha], dtype=torch.float32)
        self._coef: dict[torch.device, torch.Tensor] = {}
        self._coef_eff: dict[torch.device, torch.Tensor] = {}
        self._build_coef(self._alphas)
        self.prompt_length: int | None = None  # set by SteeredModel.generate; else inferred at prefill
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

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _vector_condition(vector: SteeringVector) -> Condition:
        cond = vector.condition
        if not cond or vector.condition_direction is None:
            raise ConfigError(
                "conditional mode needs a condition",
                expected="a vector file with a condition (layer, threshold, condition.direction)",
                found="none in this vector",
                fix="compute one with `steer vectors refusal` or `steer tune`, or pass condition=",
            )
        return Condition(
            layer=int(cond["layer"]),
            direction=vector.condition_direction,
            threshold=cond["threshold"],
            reduce=cond.get("reduce", "last"),
            comparator=cond.get("comparator", ">"),
        )

    @staticmethod
    def _pick_direction(vector: SteeringVector, layer: int, source: int | None) -> torch.Tensor:
        key = source if source is not None else layer
        if key in vector.directions:
            return vector.directions[key]
        if len(vector.directions) == 1:
            return next(iter(vector.directions.values()))
        raise LayerError(
            f"the vector has no direction for layer {key}",
            expected=f"one of {vector.layers}",
            found=str(key),
            fix="steer layers the vector has, or pass source_layer=N to use layer N's direction at every steered layer",
        )

    # ------------------------------------------------------------------ per-row α
    @torch.inference_mode(False)  # persistent buffers must stay writable outside inference mode
    def _build_coef(self, alphas: torch.Tensor) -> None:
        n_add = next(iter(self._vecs.values())).shape[0] - self.n_ablate
        a = alphas.float()[:, None]
        if self.op == "add":
            coef = a.expand(-1, n_add)
        elif self.op == "ablate":
            coef = a.expand(-1, self.n_ablate)
        else:
            coef = torch.cat([(a != 0).float().expand(-1, self.n_ablate), a.expand(-1, n_add)], dim=1)
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
            if plan is not None:
                plan.update(self._coef_eff[self._vecs[layer].device])

    def set_alphas(self, alphas) -> None:
        """Give every batch row its own strength (a float sets one α for all rows). 0 = unsteered row."""
        self._alphas = row_alphas(alphas)
        self._build_coef(self._alphas)

    def _fit_rows(self, batch: int) -> None:
        rows = next(iter(self._coef.values())).shape[0]
        base = self._alphas.numel()
        if rows == batch:  # one coefficient row per batch row (the CPU plan's decode path needs B rows)
            return
        if batch % base:
            raise AlphaError(
                "the number of per-row alphas does not fit the batch",
                expected=f"{batch} alphas (or a divisor of it, repeated per row)",
                found=f"{base} alphas",
                fix="call set_alphas with one alpha per batch row",
            )
        self._build_coef(self._alphas.repeat_interleave(batch // base))

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
                    self._handles.append(ForwardWrap(block, post=self._make_output_hook(i, gate=True)))
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
        # once per forward, not per layer (a call costs ~2 µs in a decode): a traced hook must make no pybind
        # call (the native op) and no out= into a view. A part compiled on its own (a block, the inner model) is
        # traced inside an eager root forward. (torch.jit.trace and dispatch modes: the native op refuses them.)
        self._eager = not (torch.compiler.is_compiling() or _compiled(self._compile_sites))
        if self._eager:
            self._check_wraps()  # still ours on every steered block? (warns once if replaced; ~2 µs for 30)
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

    def _steer(self, h: torch.Tensor, layer: int, inplace: bool) -> torch.Tensor:
        if not inplace or (torch.is_grad_enabled() and h.requires_grad):
            h = h.clone()
        return steer_(
            h,
            self._vecs[layer],
            self._coef_eff[h.device],
            self.n_ablate,
            None if self._mask is None else self._mask_on(h.device),
            self._plans[layer],
        )

    def _decide_gate(self, h: torch.Tensor) -> None:
        cond = self.condition
        hf = h.detach().float()
        if cond.reduce == "last" or self._attn is None:
            x = hf[:, -1, :]
        else:
            m = self._attn.to(hf.device, hf.dtype)[..., None]
            x = (hf * m).sum(1) / m.sum(1).clamp_min(1.0)
        score = x @ self._cond_dir
        gate = score > cond.threshold if cond.comparator == ">" else score < cond.threshold
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
        vecs, n_ablate, coef_eff, plan = self._vecs[layer], self.n_ablate, self._coef_eff, self._plans[layer]
        dev = vecs.device
        f32, tensor, grad_enabled = torch.float32, torch.Tensor, torch.is_grad_enabled
        add_bias = plan is not None and n_ablate == 0 and len(vecs) > 0  # add only: h += plan.bias, one op, any T
        apply_ = plan.apply_ if plan is not None and n_ablate else None
        native, R = (plan.native, plan.R) if apply_ is not None else (None, None)  # kernels/native.py, if built

        def hook(module, args, output):  # hot path: bound locals, cheapest checks first (see kernels.cpu)
            if self._skip:
                return None
            h = output if type(output) is tensor else output[0]
            if grad_enabled() and h.requires_grad:
                steered = steer_(h.clone(), vecs, coef_eff[dev], n_ablate, self._mask_on(dev), plan)
                return _replace_hidden(output, steered)
            if add_bias and self._mask is None:
                h.add_(plan.bias)
                return None
            if apply_ is not None and self._mask is None and h.dtype is f32:
                decode, eager = self._decode, self._eager
                if native is not None and decode and eager and native(h, R, plan.beta, plan.bias):
                    return None  # one native call (False: h is not plain [B, 1, d] fp32; ATen runs)
                if apply_(h, decode, eager, False):
                    return None
            steer_(h, vecs, coef_eff[dev], n_ablate, self._mask_on(dev), plan)
            return None

        return hook

    def _make_input_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._skip:
                return None
            if args:
                return (self._steer(args[0], layer, inplace=False), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._steer(kwargs["hidden_states"], layer, inplace=False)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------ lifetime
    def __repr__(self) -> str:
        return (
            f"Steering(op={self.op!r}, layers={self.layers}, alpha={self.alpha}, scope={self.scope!r}, "
            f"site={self.site!r}, conditional={self.condition is not None}, active={self.active})"
        )
