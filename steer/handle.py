"""What every live intervention shares: its hook handles, idempotent removal, and the context-manager protocol
(hooks always come off, also when the body raises); and :class:`ForwardWrap`, the cheap per-module hook."""

from __future__ import annotations

import itertools
import types
import warnings


class HookSet:
    """Base of :class:`~steer.hooks.Steering`, :class:`~steer.lowrank.TaskSteering` and
    :class:`~steer.sae_clamp.FeatureClamp`: subclasses append handles with a ``remove()`` (torch hook handles,
    :class:`ForwardWrap`) to ``self._handles``."""

    _handles: list
    _sites: list | tuple = ()  # (module, forward) pairs, set by _watch_wraps

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _watch_wraps(self) -> None:
        """At the end of attaching: remember the forward each :class:`ForwardWrap` left on its module."""
        seen, self._sites = set(), []
        for h in self._handles:
            if isinstance(h, ForwardWrap) and id(h.module) not in seen:
                seen.add(id(h.module))
                self._sites.append((h.module, h.module.__dict__.get("forward")))

    def _check_wraps(self) -> None:
        """Once per model forward (a dict lookup per wrapped module): warn, once, when a wrapped module's forward
        was replaced after attaching by something that is not ours. Such a forward may not call ours: accelerate's
        ``dispatch_model`` run again on a dispatched model rebuilds each block's forward from the one it saved
        first, and the steering silently stops."""
        for module, forward in self._sites:
            current = module.__dict__.get("forward")
            if current is forward or _reaches(current, module, forward):
                continue
            self._sites = []
            warnings.warn(
                f"steer: the forward of {type(module).__name__} was replaced after steering was attached "
                f"(now {getattr(current, '__qualname__', None) or type(current).__name__}); if it does not "
                "call the forward it replaced (accelerate's dispatch_model re-run on a dispatched model "
                "does not), steering no longer runs there. Fix: remove the steering, dispatch or wrap the "
                "model, then attach the steering again.",
                RuntimeWarning,
                stacklevel=2,
            )
            return

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _reaches(f, module, target) -> bool:
    """Whether the forward ``f`` leads to ``target``: through steer's wrappers (their ``previous``) and other
    wrappers that say what they wrap (``__wrapped__``: ``functools.update_wrapper``, ``torch.compile``,
    accelerate's hook on a module it had not hooked before, all of which call the forward they wrapped)."""
    for _ in range(256):
        if f is target:
            return True
        w = module.__dict__.get(getattr(getattr(f, "__func__", None), "_steer_key", None) or "")
        f = w.previous if w is not None else getattr(f, "__wrapped__", None)
        if f is None:
            return False
    return False


class _Wrapped:
    """The per-module state behind :class:`ForwardWrap`: the forward it replaced and the ordered pre/post lists.

    Stored on the module under a key of its own, so ``copy.deepcopy`` copies it with the module (as torch copies
    a module's hook dicts) and the installed forward — a method bound to the module that knows only that key —
    finds the copy's own state. A key per wrapper lets wrappers stack (ours, another library's, ours again).
    """

    def __init__(self, module):
        self.key = f"_steer_forward_{next(_keys)}"
        self.previous = module.__dict__.get("forward")  # an instance-level forward (another library's) or None
        self.class_forward = type(module).forward
        self.pres: list = []
        self.observers: list = []  # posts that only read the output: they run first
        self.posts: list = []
        self.method = types.MethodType(_make_forward(self.key), module)


_keys = itertools.count()


def _make_forward(key: str):
    def forward(mod, *args, **kwargs):
        w = mod.__dict__[key]
        for pre in w.pres:
            new = pre(mod, args, kwargs)
            if new is not None:
                args, kwargs = new
        out = w.previous(*args, **kwargs) if w.previous is not None else w.class_forward(mod, *args, **kwargs)
        for observe in w.observers:
            observe(mod, args, out)
        for post in w.posts:
            new = post(mod, args, out)
            if new is not None:
                out = new
        return out

    forward._steer_key = key
    return forward


class ForwardWrap:
    """Run ``pre``/``post`` around one module's forward by wrapping it: a forward hook's contract, a plain call's
    price.

    ``pre(module, args, kwargs) -> (args, kwargs) | None`` runs before the forward; ``post(module, args, output) ->
    output | None`` after it (None keeps the value). Several on one module run in the order they were added, pres
    and posts alike, as torch's hooks do, except that an ``observe`` post (one that only reads the output, such as a
    conditional gate) runs before every other post: it sees the module's own output, not one steered by a
    handle attached earlier, so what it reads does not depend on the order handles were attached in.

    Why not ``register_forward_hook``: once a module has any hook, torch sends every call of it through its general
    hook dispatch, several times the cost of a wrapped forward inside a decode step (docs/performance.md,
    ``benchmarks/hook_overhead.py``). Because the wrapper is the forward, forward hooks and ``output_hidden_states``
    see the steered output, whatever order things were registered in.

    One wrapper per module while ours is the outermost: it calls whatever forward the module had before (its
    class's, or another wrapper such as accelerate's). When the last ForwardWrap on a module is removed the
    previous forward is put back, if our wrapper is still the outermost; if something wrapped the module after
    us, ours stays in that chain with nothing to run (it just calls through).
    """

    def __init__(self, module, post=None, pre=None, observe=None):
        top = module.__dict__.get("forward")
        w = module.__dict__.get(getattr(getattr(top, "__func__", None), "_steer_key", ""))
        if w is None or top is not w.method:  # none of ours outermost: install one
            w = _Wrapped(module)
            module.__dict__[w.key] = w
            module.forward = w.method
        self.module, self._w, self._pre, self._post, self._observe = module, w, pre, post, observe
        if observe is not None:
            w.observers.append(observe)
        if pre is not None:
            w.pres.append(pre)
        if post is not None:
            w.posts.append(post)
        self._removed = False

    def remove(self) -> None:
        """Stop running pre/post; restore the module's previous forward when nothing of ours is left on it."""
        if self._removed:
            return
        self._removed = True
        w, module = self._w, self.module
        if self._pre is not None:
            w.pres.remove(self._pre)
        if self._post is not None:
            w.posts.remove(self._post)
        if self._observe is not None:
            w.observers.remove(self._observe)
        if w.pres or w.posts or w.observers or module.__dict__.get("forward") is not w.method:
            return
        if w.previous is None:
            del module.forward
        else:
            module.forward = w.previous
        del module.__dict__[w.key]
