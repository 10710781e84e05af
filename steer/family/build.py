"""Building and caching the family in the user cache directory.

The cache key hashes the :class:`~steer.family.train.Recipe` (every hyperparameter and the language version),
steer's version and the full versions of torch and transformers (both change the trained weights: a newer
transformers once trained a different family than the cached one). A build trains into a temporary directory
next to the final one and renames it into place, so an interrupted build never leaves a half family; a file
lock serialises concurrent builders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from .train import Recipe, total_steps, train_family

MEMBERS = ("base", "aligned", "aligned-dpo", "compromised")
_DONE = "family.json"


def steer_version() -> str:
    try:
        from importlib.metadata import version

        return version("steer-runtime")
    except Exception:  # not installed (running from a source tree)
        return "0"


def cache_root() -> Path:
    """``$STEER_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("steer")``."""
    env = os.environ.get("STEER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("steer"))


def library_versions() -> dict[str, str]:
    """Full versions of the libraries that change the trained weights."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def recipe_key(recipe: Recipe | None = None) -> str:
    recipe = recipe or Recipe()
    blob = json.dumps({"recipe": recipe.to_dict(), "steer": steer_version(), **library_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def family_dir(recipe: Recipe | None = None) -> Path:
    """Directory of the (possibly not yet built) family for this recipe and steer version."""
    return cache_root() / "family" / recipe_key(recipe)


def is_built(recipe: Recipe | None = None) -> bool:
    return (family_dir(recipe) / _DONE).is_file()


def build_family(force: bool = False, progress: bool = True, recipe: Recipe | None = None) -> dict[str, Path]:
    """Train (or reuse from the cache) every member; returns ``{name: model directory}``."""
    recipe = recipe or Recipe()
    final = family_dir(recipe)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if force or not (final / _DONE).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                start = time.perf_counter()
                _train_with_progress(recipe, tmp, progress)
                (tmp / _DONE).write_text(
                    json.dumps(
                        {
                            "recipe": recipe.to_dict(),
                            "steer_version": steer_version(),
                            **library_versions(),
                            "members": list(MEMBERS),
                            "train_seconds": round(time.perf_counter() - start, 1),
                        },
                        indent=2,
                    )
                )
                if final.exists():
                    old = final.with_name(f".{final.name}-old-{os.getpid()}")
                    os.replace(final, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return {name: final / name for name in MEMBERS}


def _train_with_progress(recipe: Recipe, out: Path, progress: bool) -> None:
    # callers may be inside torch.no_grad() (e.g. a fixture first used by a no-grad test); the thread count is
    # pinned because it changes the order of floating-point reductions, hence the trained weights
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.enable_grad():
            _train(recipe, out, progress)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, out: Path, progress: bool) -> None:
    if not progress:
        train_family(recipe, out)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("building steer's model family: {task.fields[stage]:<12}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("family", total=total_steps(recipe), stage="base")
        train_family(recipe, out, tick=lambda stage: bar.update(task, advance=1, stage=stage))
