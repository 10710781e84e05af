"""What every live intervention shares: its hook handles, idempotent removal, and the context-manager protocol
(hooks always come off, also when the body raises); and :class:`ForwardWrap`, the cheap per-module hook."""

from __future__ import annotations

import types


class HookSet:
    """Base of :class:`~steer.hooks.Steering`, :class:`~steer.lowrank.TaskSteering` and
    :class:`~steer.sae_clamp.FeatureClamp`: subclasses append handles with a ``remove()`` (torch hook handles,
    :class:`ForwardWrap`) to ``self._handles``."""

    _handles: list

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ForwardWrap:
    """Run ``pre``/``post`` around one module's forward by wrapping it: a forward hook's contract, a plain call's
    price.

    ``pre(module, args, kwargs) -> (args, kwargs) | None`` runs before the forward; ``post(module, args, output)
    -> output | None`` after it (None keeps the value). Why not ``register_forward_hook``: once a module has any
    hook, torch sends every call of it through its general hook dispatch, measured at ~9 µs per call inside a
    decode step here against ~1.6 µs for a wrapped forward (``benchmarks/hook_overhead.py``) — at 30 steered
    layers that alone is most of the steering budget. Because the wrapper is the forward, forward hooks and
    ``output_hidden_states`` see the steered output, whatever order things were registered in.

    The wrapper is a method bound to the module (``copy.deepcopy`` rebinds it to the copy) that calls whatever
    forward the module had before (its class's, or another wrapper such as accelerate's). :meth:`remove` puts
    that back when this wrapper is still the outermost; when something wrapped the module after us, it leaves
    the wrapper in their chain but inert (it then just calls through).
    """

    def __init__(self, module, post=None, pre=None):
        self.module = module
        previous = module.__dict__.get("forward")       # an instance-level forward (another wrapper) or None
        class_forward = type(module).forward
        state = self._state = [pre, post]
        self._removed = False

        def forward(mod, *args, **kwargs):
            pre_fn, post_fn = state
            if pre_fn is not None:
                new = pre_fn(mod, args, kwargs)
                if new is not None:
                    args, kwargs = new
            out = previous(*args, **kwargs) if previous is not None else class_forward(mod, *args, **kwargs)
            if post_fn is not None:
                new = post_fn(mod, args, out)
                if new is not None:
                    out = new
            return out

        forward._steer_wrap = self                       # lets remove() unwind inert wrappers of ours
        self._previous = previous
        self._method = types.MethodType(forward, module)
        module.forward = self._method

    def remove(self) -> None:
        """Stop running pre/post and restore the module's previous forward if nothing wrapped it since."""
        if self._removed:
            return
        self._removed = True
        self._state[:] = [None, None]
        module = self.module
        top = module.__dict__.get("forward")
        wrap = getattr(getattr(top, "__func__", None), "_steer_wrap", None)
        while wrap is not None and wrap._removed and top is wrap._method:   # unwind removed wrappers on top
            if wrap._previous is None:
                del module.forward
            else:
                module.forward = wrap._previous
            top = module.__dict__.get("forward")
            wrap = getattr(getattr(top, "__func__", None), "_steer_wrap", None)
