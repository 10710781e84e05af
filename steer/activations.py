"""Collecting residual-stream activations: every requested layer in one forward pass per batch.

Positions (prompts are left-padded, so the last real token is at index -1 in every row):

* ``"last"``   — the last prompt token (after the chat template: the generation prompt's last token);
* ``"mean"``   — the mean over the prompt's non-padding tokens;
* ``"post_instruction"`` — the template tokens after the user's text (Arditi et al. 2024 take their
  candidate directions at these positions), returned per position: ``[N, L, k, d]``;
* an int ``k`` — the last ``k`` tokens, ``[N, L, k, d]``.

Layer convention as everywhere: block ``i``'s output (``hidden_states[i+1]``), or its input with
``site="input"``.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .layers import check_layers
from .progress import progress_bar

_SENTINEL = "\u2063steer-sentinel\u2063"


def post_instruction_length(tokenizer, *, chat: bool = True) -> int:
    """Number of tokens the chat template puts after the user's text (at least 1)."""
    if not (chat and getattr(tokenizer, "chat_template", None)):
        return 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    tail = text.split(_SENTINEL, 1)[-1]
    n = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    return max(1, n)


@torch.no_grad()
def collect(
    sm,
    prompts: list[str],
    *,
    layers: list[int] | None = None,
    positions="last",
    chat: bool = True,
    prefill: str | None = None,
    site: str = "output",
    batch_size: int = 32,
    progress: bool | str = False,
) -> torch.Tensor:
    """Activations of ``prompts`` on the wrapped model ``sm`` (a :class:`steer.SteeredModel`).

    Returns float32 CPU ``[N, len(layers), d]`` (or ``[N, len(layers), k, d]`` for per-position sets).
    Any steering attached to ``sm`` is active while collecting (useful for measuring its effect).
    """
    layers = check_layers(layers if layers is not None else range(sm.num_layers), sm.num_layers)
    if site not in ("output", "input"):
        raise ConfigError("unknown site", expected="'output' or 'input'", found=repr(site), fix="use 'output'")
    if positions == "post_instruction":
        k = post_instruction_length(sm.tokenizer, chat=chat)
    elif isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        k = positions
    elif positions in ("last", "mean"):
        k = 0
    else:
        raise ConfigError(
            "unknown positions",
            expected="'last', 'mean', 'post_instruction' or an int > 0",
            found=repr(positions),
            fix="use positions='last'",
        )
    texts = sm.format(list(prompts), chat=chat, prefill=prefill)
    chat_applied = chat and bool(getattr(sm.tokenizer, "chat_template", None))
    captured: dict[int, torch.Tensor] = {}
    state: dict = {}

    def reduce(h: torch.Tensor) -> torch.Tensor:
        h = h.detach().float()
        if positions == "mean":
            m = state["mask"].to(h.device, h.dtype)[..., None]
            return ((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()
        if k:
            return h[:, -k:, :].cpu()
        return h[:, -1, :].cpu()

    def make_hook(i):
        if site == "output":
            return lambda mod, args, out: captured.__setitem__(
                i, reduce(out if isinstance(out, torch.Tensor) else out[0])
            )
        return lambda mod, args, kwargs: captured.__setitem__(i, reduce(args[0] if args else kwargs["hidden_states"]))

    handles = []
    try:
        for i in layers:
            block = sm.layers[i]
            if site == "output":
                handles.append(block.register_forward_hook(make_hook(i)))
            else:
                handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        chunks = []
        label = progress if isinstance(progress, str) else "activations"
        with progress_bar(progress, len(texts), label) as advance:
            for start in range(0, len(texts), batch_size):
                enc = sm.encode(texts[start : start + batch_size], chat_applied, position_ids=True)
                state["mask"] = enc["attention_mask"]
                sm.model(**enc, use_cache=False)
                chunks.append(torch.stack([captured[i] for i in layers], dim=1))
                captured.clear()
                if advance is not None:
                    advance(len(enc["input_ids"]))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(chunks, dim=0)
