"""The plugin's state in one vLLM worker process: the vectors (from ``STEER_VECTORS``), the vector bank each steered
layer reads, and persistent per-slot buffers (one slot per row of vLLM's persistent batch) that the logits
processor (:mod:`.batch`) writes and the layers (:mod:`.models`) read.

Buffers, allocated once at model init (``max_num_seqs`` slots, ``K`` vectors, ``L`` layers):

* ``bank[l]``: each vector's kernel operands at layer l (the op's ablation directions, then its add vectors:
  :mod:`steer.ops`), in the order of ``STEER_VECTORS`` (vectors are applied one after the other, as handles
  attached in that order are in transformers);
* ``coef`` [S, K, L]: the α slot s applies with vector k at layer l (0: not steered there; a request's
  layers override and α land here);
* ``scope`` [S, K]: 0 all tokens, 1 prompt tokens only, 2 generated tokens only;
* ``prompt_len`` [S]: the slot's prompt length (a token at position p is a prompt token iff p < prompt_len);
* ``gate`` [S+1, K]: each conditional vector's decision for the slot's request, written at its last prompt
  token (whatever chunk of a chunked prefill holds it) and read by every later token; ``score_sum`` [S+1, K]:
  the running sum of prompt-token scores of ``"mean"`` conditions. A request vLLM takes out of its batch
  (unscheduled for a step) keeps both on its ``SamplingParams`` and gets them back.

A forward reads only these buffers and vLLM's own per-step tensors (positions, ``query_start_loc``); no Python
branch depends on data.
"""

from __future__ import annotations

import os

import torch

from steer.errors import ConfigError, LayerError
from steer.resolve import activation_op, activation_scope, pick_direction
from steer.serve import load_named_vectors
from steer.serve.protocol import Policy

ENV = "STEER_VECTORS"
SCOPE_CODES = {None: 0, "all": 0, "prompt": 1, "generated": 2}


def load_vectors(spec: str | None = None) -> dict:
    """``NAME=FILE,NAME=FILE`` (default: the environment's ``STEER_VECTORS``) -> {name: SteeringVector}."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    return load_named_vectors(
        [p.strip() for p in spec.split(",") if p.strip()], source=ENV, example=f"{ENV}=safety=r.safetensors"
    )


def _mode(vec) -> str:
    return activation_op(vec)[0]


def _op_of(name: str, vec):
    """The vector's op (:func:`steer.resolve.activation_op`: its recommended mode, else its own op, else add;
    ``conditional``: its own op, gated) if the plugin can apply it."""
    from steer.kernels import reference_steer_
    from steer.ops import OPS

    mode, op = activation_op(vec)
    site = vec.meta.get("site") or "output"
    if op.reference is not reference_steer_ or site != "output":
        raise ConfigError(
            f"vector {name!r} cannot be served by the vLLM plugin in mode {mode!r} at site {site!r}",
            expected="block outputs steered by an op of the ablate/add family: "
            + ", ".join(n for n, o in OPS.items() if o.reference is reference_steer_)
            + ", or conditional",
            found=f"mode {mode!r}, site {site!r}",
            fix="re-save the vector with one of those modes, or serve it with `steer serve`",
        )
    if mode == "conditional":
        cond = vec.condition
        if not cond or vec.condition_direction is None or cond.get("reduce", "last") not in ("last", "mean"):
            raise ConfigError(
                f"vector {name!r}: the vLLM plugin needs a condition it can read",
                expected="a condition (layer, threshold, condition.direction) with reduce 'last' or 'mean'",
                found=str(cond),
                fix="recompute the condition with `steer vectors refusal`, or serve it with `steer serve`",
            )
    return op


def check_conditional_scope(name: str, vec, requested: str | None) -> None:
    """A gated vector steers generated tokens only in the plugin: under chunked prefill, prompt tokens before the
    last one are computed before the gate (read at the last prompt token) is known."""
    if _mode(vec) == "conditional" and activation_scope(vec, requested) != "generated":
        raise ValueError(
            f"steer: vector {name!r} is conditional; the vLLM plugin steers generated tokens only for gated vectors "
            f'(scope {activation_scope(vec, requested)!r} asked): pass "scope": "generated"'
        )


def _direction_for(vec, layer: int, source):
    """The direction steering ``layer`` as steer's transformers path picks it (``source_layer``, else the
    layer's own, else the single direction: :func:`steer.resolve.pick_direction`), or None."""
    try:
        return pick_direction(vec, source if source is not None else layer)
    except LayerError:
        return None


def request_layers(vec, spec) -> tuple[int, ...]:
    """The layers a request's spec steers with ``vec``: its own, else the file's recommended ones, else all."""
    return tuple(spec.layers or vec.recommended.get("layers") or vec.layers)


def steerable_layers(vec, num_layers: int | None = None) -> list[int]:
    """The layers a request may steer with ``vec``: those with a direction (the file's ``source_layer``, the
    layer's own, or the single one) and what the vector's op needs there."""
    if num_layers is None:
        num_layers = (vec.meta.get("model") or {}).get("num_layers") or (max(vec.layers) + 1)
    try:
        needs = activation_op(vec)[1].needs
    except ConfigError:
        needs = ()
    source = vec.recommended.get("source_layer")
    return [
        layer
        for layer in range(num_layers)
        if _direction_for(vec, layer, source) is not None and all(f"{n}.{layer}" in vec.extra for n in needs)
    ]


class SteerState:
    """Vectors, bank and slot buffers of this process (see the module docstring)."""

    def __init__(self, vectors: dict, hidden_size: int, num_layers: int, architecture: str, slots: int, device):
        fp = {"architecture": architecture, "model_type": "", "hidden_size": hidden_size, "num_layers": num_layers}
        self.ops = {}
        for name, vec in vectors.items():
            if vec.kind == "task" or not vec.directions:
                raise ConfigError(
                    f"vector {name!r} is not supported by steer's vLLM plugin",
                    expected="directions applied by an op (add, ablate, ablate_add, ace; conditional): refusal, sae "
                    "or custom vectors",
                    found=f"kind {vec.kind!r}",
                    fix="serve task vectors as LoRA adapters (`steer export lora`); serve stacks with `steer serve`",
                )
            try:
                vec.check_model(fp, check_architecture=False)  # vLLM's names differ from transformers'
            except Exception as exc:
                raise type(exc)(f"{ENV}: vector {name!r}: {exc}") from None
            cond_layer = [int(vec.condition["layer"])] if _mode(vec) == "conditional" else []
            bad = [layer for layer in list(vec.layers) + cond_layer if not 0 <= layer < num_layers]
            if bad:
                raise ConfigError(
                    f"vector {name!r} has layers this model lacks",
                    expected=f"layers in [0, {num_layers})",
                    found=str(bad),
                    fix="recompute the vector for this model",
                )
            self.ops[name] = _op_of(name, vec)
        self.vectors, self.names = vectors, list(vectors)
        self.policy = Policy(vectors=vectors)
        self.num_layers, self.slots, self.device = num_layers, slots, device
        k = len(self.names)
        # per layer: [(vector index, op, operands [M, d] fp32, n_ablate)] in the vectors' order, for every layer a
        # request may steer with that vector (its recommended layers or any override)
        self.bank: dict[int, list] = {layer: [] for layer in range(num_layers)}
        # gates: (vector index, layer, unit direction, threshold, comparator) read at the block output
        self.conditions: dict[int, list] = {}
        for i, (name, vec) in enumerate(vectors.items()):
            op, source = self.ops[name], vec.recommended.get("source_layer")
            for layer in steerable_layers(vec, num_layers):
                d = _direction_for(vec, layer, source)
                extras = {n: vec.extra[f"{n}.{layer}"] for n in op.needs}
                operands, n_ablate = op.prepare(d.float().reshape(-1, hidden_size), extras)
                self.bank[layer].append((i, op, operands.float().to(device), n_ablate))
            if _mode(vec) == "conditional":
                c, cdir = vec.condition, vec.condition_direction.float()
                self.conditions.setdefault(int(c["layer"]), []).append(
                    (
                        i,
                        (cdir / cdir.norm()).to(device),
                        float(c["threshold"]),
                        c.get("comparator", ">"),
                        c.get("reduce", "last"),
                    )
                )
        self.layers = sorted({layer for layer, entries in self.bank.items() if entries} | set(self.conditions))
        self.gated = torch.tensor([_mode(v) == "conditional" for v in vectors.values()], device=device)
        self.coef = torch.zeros(slots, k, num_layers, device=device)
        self.scope = torch.zeros(slots, k, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.gate = torch.zeros(slots + 1, k, device=device)  # row ``slots``: where non-deciding tokens write
        self.score_sum = torch.zeros(slots + 1, k, device=device)  # "mean" conditions: Σ prompt-token scores
        self.slot_params: dict[int, object] = {}

    # ------------------------------------------------------------------ slots (the logits processor)
    def set_slot(self, slot: int, specs, prompt_len: int, params=None) -> None:
        """Slot ``slot`` now holds a request with ``specs`` (SteerSpecs; empty: unsteered). A request vLLM took out
        of the batch for a while and puts back gets its gate decisions back (kept on its ``params``)."""
        if slot in self.slot_params:  # vLLM refilled a slot without reporting its request as removed
            self.release(slot)
        self.clear(slot)
        self.prompt_len[slot] = prompt_len
        for s in specs:
            k = self.names.index(s.vector)
            for layer in request_layers(self.vectors[s.vector], s):
                self.coef[slot, k, layer] = s.alpha
            self.scope[slot, k] = SCOPE_CODES[activation_scope(self.vectors[s.vector], s.scope)]
        kept = (getattr(params, "extra_args", None) or {}).get("_steer_gate")
        if kept is not None:
            self.gate[slot] = torch.tensor(kept[0], device=self.device)
            self.score_sum[slot] = torch.tensor(kept[1], device=self.device)
        self.slot_params[slot] = params

    def release(self, slot: int) -> None:
        """The request in ``slot`` leaves the batch: keep its gate decisions with it, then clear the slot."""
        params = self.slot_params.pop(slot, None)
        if params is not None and getattr(params, "extra_args", None) is not None and bool(self.gated.any()):
            params.extra_args["_steer_gate"] = (self.gate[slot].tolist(), self.score_sum[slot].tolist())
        self.clear(slot)

    def clear(self, slot: int) -> None:
        self.coef[slot].zero_()
        self.scope[slot].zero_()
        self.prompt_len[slot] = 0
        self.gate[slot].zero_()
        self.score_sum[slot].zero_()

    def move(self, a: int, b: int, swap: bool) -> None:
        if not swap and b in self.slot_params:  # the request b held leaves without a "removed": keep its gates
            self.release(b)
        for buf in (self.coef, self.scope, self.prompt_len, self.gate, self.score_sum):
            if swap:
                tmp = buf[a].clone()
                buf[a] = buf[b]
                buf[b] = tmp
            else:
                buf[b] = buf[a]
        pa, pb = self.slot_params.pop(a, None), self.slot_params.pop(b, None)
        if pa is not None:
            self.slot_params[b] = pa
        if swap and pb is not None:
            self.slot_params[a] = pb
        if not swap:
            self.coef[a].zero_()
            self.scope[a].zero_()
            self.prompt_len[a] = 0
            self.gate[a].zero_()
            self.score_sum[a].zero_()

    # ------------------------------------------------------------------ the forward (the layers)
    def steer(self, layer: int, x: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor):
        """``x`` [T, d] (the residual stream of this step's packed tokens at ``layer``) steered: each vector in
        turn, ``x − Σ_j c_j (x·u_j) u_j + Σ_m c_m v_m`` with per-token coefficients (the op's, from the token's
        request's α, scope, layers and gate). A token whose request does not steer here gets exactly ``x``.

        A condition read at this layer is decided first, on the unsteered ``x`` (as in transformers, where the
        gate observes the block before any steering there), at each request's last prompt token: the score there
        (``reduce="last"``) or the mean over the prompt's tokens, summed chunk by chunk (``"mean"``)."""
        n = positions.shape[0]
        qsl = query_start_loc.to(positions.device, torch.long)
        slot = torch.searchsorted(qsl[1:], torch.arange(n, device=positions.device), right=True)
        slot = slot.clamp_max(self.slots - 1)
        for k, direction, threshold, comparator, reduce in self.conditions.get(layer, ()):
            score = (x.float() * direction).sum(-1)
            if reduce == "mean":
                # a prefill that starts at position 0 starts the sum over (vLLM recomputes preempted requests)
                self.score_sum[:, k].scatter_(0, torch.where(positions == 0, slot, self.slots), 0.0)
                prompt = positions < self.prompt_len[slot]
                self.score_sum[:, k].index_add_(0, torch.where(prompt, slot, self.slots), score)
                score = self.score_sum[slot, k] / self.prompt_len[slot].clamp_min(1)
            decided = (score > threshold) if comparator == ">" else (score < threshold)
            last = positions == self.prompt_len[slot] - 1
            # each request's last prompt token writes its slot's decision; every other token writes a spare row
            self.gate[:, k].scatter_(0, torch.where(last, slot, self.slots), decided.float())
        if not self.bank[layer]:
            return x
        is_prompt = (positions < self.prompt_len[slot])[:, None]
        scope = self.scope[slot]
        on = (scope == 0) | ((scope == 1) & is_prompt) | ((scope == 2) & ~is_prompt)
        gate = torch.where(self.gated, self.gate[slot], 1.0)  # [T, K]: 1 for vectors without a condition
        alpha = self.coef[slot, :, layer] * on * gate  # [T, K]
        out = x.float()
        for k, op, operands, j in self.bank[layer]:
            c = op.coefficients(alpha[:, k], j, operands.shape[0])  # [T, M]
            base, step = out, out
            # row-wise products and sums (no matmul over tokens): a token's result does not depend on how many
            # tokens share the step, so a request gives the same numbers alone and in any batch
            for m in range(operands.shape[0]):
                v = operands[m]
                if m < j:
                    step = step - c[:, m : m + 1] * (base * v).sum(-1, keepdim=True) * v
                else:
                    step = step + c[:, m : m + 1] * v
            out = step
        return out.to(x.dtype)


_STATE: SteerState | None = None


def get_state() -> SteerState | None:
    return _STATE


def set_state(state: SteerState | None) -> None:
    global _STATE
    _STATE = state
