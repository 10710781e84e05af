"""What every live intervention shares: its hook handles, idempotent removal, and the context-manager protocol
(hooks always come off, also when the body raises)."""

from __future__ import annotations


class HookSet:
    """Base of :class:`~steer.hooks.Steering`, :class:`~steer.lowrank.TaskSteering` and
    :class:`~steer.sae_clamp.FeatureClamp`: subclasses append ``torch`` hook handles to ``self._handles``."""

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
