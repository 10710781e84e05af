"""The one progress bar steer shows for long work (activations, evaluation, task vectors, layer selection)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(enabled, total: int, label: str):
    """A transient rich bar (label, bar, done/total, elapsed). Yields ``advance(n)``, or None when ``enabled`` is
    false, so callers can pass it on as a ``progress`` callback; the bar stops on exit, errors included."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = p.add_task(label, total=total)
    p.start()
    try:
        yield lambda n=1: p.update(task, advance=n)
    finally:
        p.stop()
