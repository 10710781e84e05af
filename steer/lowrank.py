"""Parameter steering per request: every batch row gets its own α for a task vector τ, in one batch.

Instead of changing weights (which would give one α to the whole batch, see :mod:`steer.params`), each
touched module gets a forward hook that adds the row's share of the weight delta to the module's output,
the multi-LoRA trick of Punica (Chen et al. 2023) and S-LoRA (Sheng et al. 2023)::

    Linear / Conv1D, low-rank τ = up @ down:   y = x Wᵀ + b + α_row · ((x downᵀ) upᵀ)  (+ α_row · Δb)
    Embedding, low-rank τ:                      y = E[ids] + α_row · (up[ids] @ down)

``α_row`` lives in one persistent ``[B, 1, 1]`` buffer per device, updated in place by
:meth:`TaskSteering.set_alphas`; the hooks are registered once, read that buffer and never branch on
data (torch.compile / CUDA-graph friendly). The low-rank path costs two thin GEMMs (rank R) per module,
``O(T·R·(in+out))`` flops and ``R·(in+out)`` weights read — a few percent of the base GEMM for R ≪ d.
The extra GEMM runs on ``x.view(B, -1, in)`` so inputs flattened to ``[B·T, in]`` work too.

Dense τ with per-row α: we *run it* — ``y += α_row · (x τᵀ)``, one extra read of a weight-sized tensor
(≈2× weight traffic for the touched modules) — rather than grouping rows by α. Grouping would need one
merged forward per distinct α (k× traffic for k distinct values, split KV caches, reordered rows), which
only wins for k = 1, and that case is merged mode (1×, :mod:`steer.params`). For a smaller per-request
cost, compute τ with ``--rank`` (``steer vectors task --rank 16``). Any other touched module (norm
weights, biases of non-linear modules) uses an exact fallback for outputs that are affine in the
parameter: ``y += α_row · (f(x; θ₀+τ) − f(x; θ₀))`` via ``torch.func.functional_call``.

Rows with α = 0 get ``y + 0·Δ`` = ``y`` exactly. The model's weights are never modified.

**Conditional (gated) task vectors.** With a condition (CAST, Lee et al. 2024; mode ``conditional``), a row
whose gate opens runs ``θ + α·τ`` and a row whose gate stays closed runs the weights untouched. τ reaches
every layer, the embedding included, so the gate cannot be read inside the steered forward (the first
blocks would already have run with τ). At each prefill the handle therefore runs a **gate pass** first: the
same inputs, no KV cache, through the model up to the condition block, whose output is read (last prompt
token or prompt mean) and the forward stopped there. Every gated task vector is closed during a gate pass,
so a gate never depends on another gated task vector or on attach order; activation steering at earlier
blocks and ungated task vectors do apply (as they do for an activation gate). Cost: blocks ``0..c`` of the
prompt once per request (c is usually an early block). The decision is held for every generated token;
``set_gates`` carries it when a scheduler moves rows between batches.
"""

from __future__ import annotations

import inspect
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .config import Condition, check_alpha, check_gates, row_alphas, spread_rows
from .errors import AlphaError, ConfigError
from .handle import ForwardWrap, HookSet
from .layers import check_layers, get_layers
from .params import check_task_model, dense_tau, factors, is_conv1d, task_info
from .positions import is_cache, past_length
from .vector import SteeringVector

_PASS = threading.local()  # .on: a gate pass runs in this thread (every gated task vector is closed)


class _GateRead(Exception):
    """Stops a gate pass once the condition block's output has been read."""


def _in_gate_pass() -> bool:
    return getattr(_PASS, "on", False)


def _first_tensor(args, kwargs):
    for key in ("input_ids", "inputs_embeds"):
        x = kwargs.get(key)
        if isinstance(x, torch.Tensor):
            return x
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


class TaskSteering(HookSet):
    """Per-request task-vector steering through forward hooks (see module docstring).

    Context manager; :meth:`set_alphas` takes one α per batch row (or a float for all rows).
    """

    def __init__(
        self,
        model: nn.Module,
        vector: SteeringVector,
        alpha: float = 1.0,
        *,
        condition: Condition | None = None,
        layers_path: str | None = None,
    ):
        self.model = model
        params = check_task_model(vector, model)
        info = task_info(vector)
        self.alpha = check_alpha(alpha)
        self.condition = condition
        self.mode = "conditional" if condition is not None else "per_request"
        self.prompt_length: int | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None
        self._gate: torch.Tensor | None = None  # [rows] bool: the rows' decisions (None: undecided, closed)
        self._reading = False
        self._read: tuple | None = None
        self.on_gate = None  # callable(gate [rows] float): a stack's activation members follow this gate
        if condition is not None:
            blocks = get_layers(model, layers_path)
            block = blocks[check_layers([condition.layer], len(blocks))[0]]
            dev = next((p.device for p in block.parameters()), torch.device("cpu"))
            c = condition.direction.float()
            self._cond_dir = (c / c.norm()).to(dev)
            self._cond_block = block
            sig = inspect.signature(model.forward).parameters
            self._takes_use_cache = "use_cache" in sig or any(p.kind == p.VAR_KEYWORD for p in sig.values())
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            for attr, p in mod.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mod, attr))
        plan: dict[nn.Module, dict[str, str]] = {}  # module -> {attr: param name}
        for name, p in params.items():
            for mod, attr in owners.get(id(p), []):
                if plan.get(mod, {}).get(attr) is None:
                    plan.setdefault(mod, {})[attr] = name
        self._devices: list[torch.device] = []
        self._coef: list[torch.Tensor] = []  # per device slot: [B, 1, 1] fp32, updated in place
        self._alphas = torch.tensor([self.alpha], dtype=torch.float32)
        self._handles: list = []
        self.modules: list[str] = []
        names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        try:
            # prepend: a gate pass runs before every other handle's pre-hook prepares the real forward
            self._handles.append(model.register_forward_pre_hook(self._begin_forward, with_kwargs=True, prepend=True))
            if condition is not None:
                self._handles.append(ForwardWrap(self._cond_block, observe=self._observe))
            for mod, attrs in plan.items():
                self._attach(mod, attrs, vector, info)
                self.modules.append(names.get(mod, type(mod).__name__))
            self._watch_wraps()
        except BaseException:
            self.remove()
            raise
        self._build_coef(self._alphas)

    # ------------------------------------------------------------------ per-device α buffers
    def _slot(self, device: torch.device) -> int:
        if device not in self._devices:
            self._devices.append(device)
            self._coef.append(torch.zeros(1, 1, 1))
        return self._devices.index(device)

    @torch.inference_mode(False)  # persistent buffers must stay writable outside inference mode
    def _build_coef(self, alphas: torch.Tensor) -> None:
        if self.condition is not None:  # α of the rows whose gate is open, 0 elsewhere (undecided = closed)
            gate = self._gate if self._gate is not None and self._gate.numel() == alphas.numel() else None
            alphas = alphas.float() * (gate.float() if gate is not None else 0.0)
            if self.on_gate is not None:
                self.on_gate(gate.float() if gate is not None else torch.zeros(alphas.numel()))
        self._uniform = bool((alphas == alphas.reshape(-1)[0]).all())
        col = alphas.float().reshape(-1, 1, 1)
        for i, dev in enumerate(self._devices):
            if self._coef[i].shape == col.shape and self._coef[i].device == dev:
                self._coef[i].copy_(col)  # in place: hooks (and compiled graphs) keep the same tensor
            else:
                self._coef[i] = col.to(dev).clone(memory_format=torch.contiguous_format)

    def begin(self, prompt_length: int | None = None) -> None:
        """A new batch of requests. τ steers every token, so only a gated vector uses the (padded) prompt length:
        its gate is decided at the forward with no past that is no longer than it (None: any forward with no
        past). ``begin(0)``: the rows are past their prompts, no forward decides a gate."""
        self.prompt_length = None if prompt_length is None else int(prompt_length)

    def set_alphas(self, alphas) -> None:
        """One α per batch row (a float sets every row). 0 leaves a row bit-exactly unsteered. A gated vector
        closes every row until the next prefill decides (or :meth:`set_gates`)."""
        self._alphas = row_alphas(alphas)
        self._gate = None
        self._build_coef(self._alphas)

    def set_gates(self, gates) -> None:
        """Set every row's gate (bools, one per row of the last :meth:`set_alphas`) instead of deciding it at
        the next prefill: a scheduler that moves rows between batches carries each row's ``last_gate``."""
        g = check_gates(self.condition, gates, self._alphas.numel())
        self._gate = g.clone()
        self._build_coef(self._alphas)

    def _begin_forward(self, module, args, kwargs):
        if not torch.compiler.is_compiling():
            self._check_wraps()  # still ours on every steered linear? (warns once if replaced)
        x = _first_tensor(args, kwargs)
        if x is None:
            return None
        batch, rows = x.shape[0], self._coef[0].shape[0] if self._coef else 1
        if self.condition is not None and _in_gate_pass():
            return None  # closed during every gate pass (its hooks return early): nothing to fit
        if self.condition is not None:
            seq = int(x.shape[1]) if x.dim() > 1 else 1
            if past_length(args, kwargs, seq) == 0 and (self.prompt_length is None or seq <= self.prompt_length):
                alphas = self._alphas if self._alphas.numel() == batch else spread_rows(self._alphas, batch)
                if self.on_gate is not None:  # followers closed, one row each, before the gate pass runs
                    self.on_gate(torch.zeros(batch))
                self._decide(args, kwargs, alphas)  # the set α are kept: the next batch may have other rows
                return None
        if batch != rows:
            if self._gate is not None and self._gate.numel() != batch:
                self._gate = spread_rows(self._gate, batch)
            self._build_coef(spread_rows(self._alphas, batch))
        return None

    # ------------------------------------------------------------------ the gate pass
    def _observe(self, module, args, out):
        if self._reading:
            self._read = (out if isinstance(out, torch.Tensor) else out[0],)
            raise _GateRead

    def _decide(self, args, kwargs, alphas: torch.Tensor) -> None:
        """Run the gate pass on this forward's inputs and open the rows whose condition holds."""
        kw = {
            k: v
            for k, v in kwargs.items()
            if k not in ("past_key_values", "past_key_value", "cache", "use_cache") and not is_cache(v)
        }
        if self._takes_use_cache:
            kw["use_cache"] = False
        for k in ("output_hidden_states", "output_attentions", "output_router_logits"):
            if k in kw:  # capture wrappers of some transformers releases are only undone when a forward returns
                kw[k] = False
        self._read = None
        self._reading, _PASS.on = True, True
        try:
            self.model(*(None if is_cache(a) else a for a in args), **kw)
        except _GateRead:
            pass
        finally:
            self._reading, _PASS.on = False, False
        if self._read is None:
            raise ConfigError(
                "the gate pass never reached the condition block",
                expected=f"block {self.condition.layer}'s output to be computed by the model's forward",
                found="a forward that did not run that block",
                fix="use a condition layer the model runs, or steer unconditionally (mode='per_request')",
            )
        attn = kwargs.get("attention_mask")
        attn = attn if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None
        score, gate = self.condition.decide(self._read[0], self._cond_dir, attn)
        self._read = None
        self.last_scores, self.last_gate = score, gate
        self._gate = gate.detach().cpu()
        self._build_coef(alphas)

    # ------------------------------------------------------------------ hooks
    def _attach(self, mod: nn.Module, attrs: dict[str, str], vector: SteeringVector, info: dict) -> None:
        p0 = getattr(mod, next(iter(attrs)))
        dev, dtype = p0.device, p0.dtype
        slot = self._slot(dev)
        kind = (
            "embedding"
            if isinstance(mod, nn.Embedding)
            else "linear"
            if isinstance(mod, nn.Linear) or is_conv1d(mod)
            else "other"
        )
        if kind == "other" or set(attrs) - {"weight", "bias"} or (kind == "embedding" and "bias" in attrs):
            if kind != "other" or set(attrs) - {"weight", "bias"} or not type(mod).__name__.endswith("Norm"):
                raise ConfigError(
                    f"per-request steering cannot apply the task vector to {type(mod).__name__} "
                    f"({', '.join(sorted(attrs))})",
                    expected="deltas on Linear / Conv1D / Embedding weights or biases, or on norm weights",
                    found=f"a delta on a {type(mod).__name__} (its output is not affine in these parameters)",
                    fix="compute the vector with --exclude for these parameters, or use mode='merged'",
                )
            self._handles.append(
                mod.register_forward_hook(self._affine_hook(mod, attrs, vector, slot), with_kwargs=True)
            )
            return
        w_name, b_name = attrs.get("weight"), attrs.get("bias")
        db = dense_tau(vector, b_name).to(dev, dtype) if b_name else None
        pair = factors(vector, w_name) if w_name else None
        if w_name is None:
            lin = None
        elif pair is not None:  # Linear orientation [out, R] @ [R, in] (embedding: [V, R] @ [R, d])
            up, down = pair[0].to(dev, dtype), pair[1].to(dev, dtype)
            lin = (
                ("lowrank", down.contiguous(), up.T.contiguous())
                if kind == "linear"
                else ("lowrank", up.contiguous(), down.contiguous())
            )
        else:
            tau = dense_tau(vector, w_name).to(dev, dtype)
            conv = bool(info[w_name].get("conv1d"))
            lin = ("dense", (tau.T if conv else tau).contiguous())
        make = self._linear_hook if kind == "linear" else self._embedding_hook
        self._handles.append(ForwardWrap(mod, post=make(lin, db, slot)))  # a plain call's price, not a hook's

    def _linear_hook(self, lin, db, slot: int):
        coefs = self._coef
        mode = lin[0] if lin is not None else None
        a, b = (lin[1], lin[2]) if mode == "lowrank" else (lin[1] if lin else None, None)

        gated = self.condition is not None

        def hook(module, args, out):
            if gated and _in_gate_pass():
                return None
            c = coefs[slot]
            B = c.shape[0]
            n = out.shape[-1]
            if out.dim() != 3 or out.shape[0] != B:  # tokens out of their rows (e.g. routed to MoE experts)
                if not self._uniform:
                    raise AlphaError(
                        f"per-request α cannot reach {type(module).__name__}: it sees tokens routed "
                        "out of their batch rows",
                        expected="one α for the whole batch here",
                        found="gates that differ between rows" if gated else "different α per row",
                        fix="compute the task vector with --exclude for the routed experts, or steer ungated"
                        if gated
                        else "use one α per batch, or mode='merged'",
                    )
                c, B = c[:1], 1
            y = out.view(B, -1, n) if out.is_contiguous() else out.reshape(B, -1, n)
            if torch.is_grad_enabled() and out.requires_grad:
                y = y.clone()
            if mode == "lowrank":
                t = F.linear(args[0], a)  # [.., R] = x downᵀ
                t = t.view(B, -1, t.shape[-1]).mul_(c)  # α_row · (x downᵀ)
                y.view(-1, n).addmm_(t.view(-1, t.shape[-1]), b)  # y += (α x downᵀ) upᵀ
            elif mode == "dense":
                t = F.linear(args[0], a)  # x τᵀ, one extra weight read
                y.addcmul_(t.view(B, -1, n), c)
            if db is not None:
                y.addcmul_(c, db)
            return y.view(out.shape)

        return hook

    def _embedding_hook(self, lin, db, slot: int):
        coefs = self._coef
        mode, a, b = lin if lin[0] == "lowrank" else (lin[0], lin[1], None)

        gated = self.condition is not None

        def hook(module, args, out):
            if gated and _in_gate_pass():
                return None
            c = coefs[slot]
            B, n = c.shape[0], out.shape[-1]
            ids = args[0]
            if out.shape[0] != B:  # ids shared by every row (e.g. GPT-2's position ids [1, T])
                ids = ids.expand(B, *ids.shape[1:])
                out = out.expand(B, *out.shape[1:]).contiguous()
            y = out.reshape(B, -1, n)
            if torch.is_grad_enabled() and out.requires_grad:
                y = y.clone()
            if mode == "lowrank":
                t = F.embedding(ids, a)  # up[ids]  [.., R]
                t = t.reshape(B, -1, t.shape[-1]).mul_(c)
                y.view(-1, n).addmm_(t.view(-1, t.shape[-1]), b)
            else:
                y.addcmul_(F.embedding(ids, a).reshape(B, -1, n), c)
            return y.view(out.shape)

        return hook

    def _affine_hook(self, mod: nn.Module, attrs: dict[str, str], vector: SteeringVector, slot: int):
        coefs = self._coef
        steered = {}
        for attr, name in attrs.items():
            p = getattr(mod, attr)
            steered[attr] = (p.detach().float() + dense_tau(vector, name).to(p.device)).to(p.dtype)

        busy = [False]  # functional_call goes through module.__call__, which would fire this hook again

        gated = self.condition is not None

        def hook(module, args, kwargs, out):
            if busy[0] or (gated and _in_gate_pass()):
                return None
            h = out if isinstance(out, torch.Tensor) else out[0]
            busy[0] = True
            try:
                alt = torch.func.functional_call(module, steered, args, kwargs)
            finally:
                busy[0] = False
            alt = alt if isinstance(alt, torch.Tensor) else alt[0]
            c = coefs[slot]
            y = h + (alt - h).reshape(c.shape[0], -1, h.shape[-1]).mul_(c).view(h.shape)
            return y if isinstance(out, torch.Tensor) else (y, *out[1:])

        return hook

    # ------------------------------------------------------------------ lifetime
    def restore(self) -> None:
        """Same as :meth:`remove`: the weights were never touched (the name merged mode also has)."""
        self.remove()

    def __repr__(self) -> str:
        return f"TaskSteering({self.mode}, modules={len(self.modules)}, active={self.active})"
