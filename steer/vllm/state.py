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
* ``prompt_len`` [S]: the slot's prompt length (a token at position p is a prompt token iff p < prompt_len).

A forward reads only these buffers and vLLM's own per-step tensors (positions, ``query_start_loc``); no Python
branch depends on data.
"""

from __future__ import annotations

import os

import torch

from steer.errors import ConfigError
from steer.serve.protocol import Policy

ENV = "STEER_VECTORS"
SCOPE_CODES = {None: 0, "all": 0, "prompt": 1, "generated": 2}


def load_vectors(spec: str | None = None) -> dict:
    """``NAME=FILE,NAME=FILE`` (default: the environment's ``STEER_VECTORS``) -> {name: SteeringVector}."""
    from steer.vector import SteeringVector

    spec = os.environ.get(ENV, "") if spec is None else spec
    out = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                f"bad {ENV} entry",
                expected="NAME=FILE[,NAME=FILE...]",
                found=repr(part),
                fix="e.g. safety=r.safetensors",
            )
        if name in out:
            raise ConfigError(f"{ENV} names {name!r} twice", expected="distinct names", found=spec, fix="rename one")
        out[name] = SteeringVector.load(path)
    return out


def _op_of(name: str, vec):
    """The vector's op (its recommended mode, else its own op, else add) if the plugin can apply it."""
    from steer.kernels import reference_steer_
    from steer.ops import OPS

    mode = vec.recommended.get("mode") or vec.meta.get("op") or "add"
    op = OPS.get(mode)
    if op is None or op.reference is not reference_steer_:
        raise ConfigError(
            f"vector {name!r} cannot be served by the vLLM plugin in mode {mode!r}",
            expected="an op of the ablate/add family: "
            + ", ".join(n for n, o in OPS.items() if o.reference is reference_steer_),
            found=repr(mode),
            fix="re-save the vector with one of those modes, or serve it with `steer serve`",
        )
    return op


class SteerState:
    """Vectors, bank and slot buffers of this process (see the module docstring)."""

    def __init__(self, vectors: dict, hidden_size: int, num_layers: int, architecture: str, slots: int, device):
        fp = {"architecture": architecture, "model_type": "", "hidden_size": hidden_size, "num_layers": num_layers}
        self.ops = {}
        for name, vec in vectors.items():
            if vec.kind == "task" or vec.condition is not None or not vec.directions:
                raise ConfigError(
                    f"vector {name!r} is not supported by steer's vLLM plugin yet",
                    expected="directions applied by an op (add, ablate, ablate_add, ace): refusal, sae or custom",
                    found=f"kind {vec.kind!r}" + (", conditional" if vec.condition is not None else ""),
                    fix="serve task vectors as LoRA adapters (`steer export lora`); use `steer serve` for the rest",
                )
            try:
                vec.check_model(fp, check_architecture=False)  # vLLM's names differ from transformers'
            except Exception as exc:
                raise type(exc)(f"{ENV}: vector {name!r}: {exc}") from None
            bad = [layer for layer in vec.layers if not 0 <= layer < num_layers]
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
        self.layers = sorted({layer for v in vectors.values() for layer in v.layers})
        # per steered layer: [(vector index, op, operands [M, d] fp32, n_ablate)] in the vectors' order
        self.bank: dict[int, list] = {}
        for layer in self.layers:
            entries = []
            for i, (name, vec) in enumerate(vectors.items()):
                d = vec.directions.get(layer)
                if d is None:
                    continue
                op = self.ops[name]
                extras = {n: vec.extra[f"{n}.{layer}"] for n in op.needs if f"{n}.{layer}" in vec.extra}
                missing = [n for n in op.needs if n not in extras]
                if missing:
                    raise ConfigError(
                        f"vector {name!r} lacks what op {op.name!r} needs at layer {layer}",
                        expected=", ".join(f"extra.{n}.{layer}" for n in op.needs),
                        found="missing " + ", ".join(missing),
                        fix="recompute the vector with `steer vectors refusal`",
                    )
                operands, n_ablate = op.prepare(d.float().reshape(-1, hidden_size), extras)
                entries.append((i, op, operands.float().to(device), n_ablate))
            self.bank[layer] = entries
        self.coef = torch.zeros(slots, k, num_layers, device=device)
        self.scope = torch.zeros(slots, k, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ slots (the logits processor)
    def set_slot(self, slot: int, specs, prompt_len: int) -> None:
        """Slot ``slot`` now holds a request with ``specs`` (SteerSpecs; empty: unsteered)."""
        self.clear(slot)
        self.prompt_len[slot] = prompt_len
        for s in specs:
            k = self.names.index(s.vector)
            vec = self.vectors[s.vector]
            layers = s.layers or tuple(vec.recommended.get("layers") or vec.layers)
            for layer in layers:
                self.coef[slot, k, layer] = s.alpha
            self.scope[slot, k] = SCOPE_CODES[s.scope or vec.recommended.get("scope")]

    def clear(self, slot: int) -> None:
        self.coef[slot].zero_()
        self.scope[slot].zero_()
        self.prompt_len[slot] = 0

    def move(self, a: int, b: int, swap: bool) -> None:
        for buf in (self.coef, self.scope, self.prompt_len):
            if swap:
                tmp = buf[a].clone()
                buf[a] = buf[b]
                buf[b] = tmp
            else:
                buf[b] = buf[a]
        if not swap:
            self.clear(a)

    # ------------------------------------------------------------------ the forward (the layers)
    def steer(self, layer: int, x: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor):
        """``x`` [T, d] (the residual stream of this step's packed tokens at ``layer``) steered: each vector in
        turn, ``x − Σ_j c_j (x·u_j) u_j + Σ_m c_m v_m`` with per-token coefficients (the op's, from the token's
        request's α, scope and layers). A token whose request does not steer here gets exactly ``x``."""
        n = positions.shape[0]
        qsl = query_start_loc.to(positions.device, torch.long)
        slot = torch.searchsorted(qsl[1:], torch.arange(n, device=positions.device), right=True)
        slot = slot.clamp_max(self.slots - 1)
        is_prompt = (positions < self.prompt_len[slot])[:, None]
        scope = self.scope[slot]
        on = (scope == 0) | ((scope == 1) & is_prompt) | ((scope == 2) & ~is_prompt)
        alpha = self.coef[slot, :, layer] * on  # [T, K]
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
