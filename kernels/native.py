"""Optional native decode step for the CPU path: one C++ call per steered layer instead of three ATen calls.

Why: in a real decode every ATen call costs several times what it costs in a tight loop (each decoder layer's weight
traffic evicts the code and data the call needs; docs/performance.md, ``benchmarks/hook_overhead.py``). Ablation +
addition through ATen is three calls (view, GEMM into a buffer, fused ``addmm_``); :file:`native.cpp` does the same
maths (``h - sum_j beta_j (h.r_j) r_j + sum_k alpha_k v_k``, projections of the original h, fp32) in one call from
the :class:`~.cpu.Plan`'s per-row operands. Prompts, masks, half dtypes, autograd and add-only steering (already one
``add_``) keep the ATen path.

Built explicitly, never on import::

    python -m steer.kernels.native          # `make` runs it; needs a C++ compiler and ninja (~25 s)

It compiles with :mod:`torch.utils.cpp_extension` into ``$STEER_CACHE_DIR`` (else the user cache dir)
``/native/<key>``, the key hashing the source, torch's and Python's versions and the machine. A
:class:`~.cpu.Plan` made later (steering attaches) uses it when that build exists; set ``STEER_NATIVE=0`` to
turn it off. Without a build the ATen path runs: same maths, more calls.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.cpp")
_CFLAGS = ["-O3", "-fopenmp-simd"]
_STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (a build: ~25 s)
_override: bool | None = None  # use(): True = required (built on demand), False = off, None = automatic
_loaded: dict[str, object] = {}  # key -> module (None: the library there failed to import; warned once)
_build_error: NativeBuildError | None = None  # the first failed build of this process (not retried)


class NativeBuildError(RuntimeError):
    """The native op could not be compiled (no compiler, no ninja, or a compile error)."""


@functools.cache
def _key() -> str | None:
    """Hash of the source and of everything the binary depends on; None when the source is missing."""
    try:
        h = hashlib.sha256(SOURCE.read_bytes())
    except OSError:
        return None
    parts = (
        torch.__version__,
        str(torch.version.git_version),
        str(torch._C._GLIBCXX_USE_CXX11_ABI),
        sys.version,
        platform.machine(),
        platform.system(),
        " ".join(_CFLAGS),
    )
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """Where this source's build for this torch/Python/machine lives (``$STEER_CACHE_DIR/native/<key>``)."""
    env = os.environ.get("STEER_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("steer"))
    return root / "native" / (_key() or "no-source")


def _name() -> str:
    return f"steer_native_{_key()}"


def _library(directory: Path, name: str) -> Path | None:
    for ext in (".so", ".pyd"):
        if (directory / f"{name}{ext}").is_file():
            return directory / f"{name}{ext}"
    return None


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load():
    """The built module, or None: not built for this source/torch/Python/machine, a build in progress, or a
    library that does not import (warned once; steering then keeps the ATen path)."""
    key = _key()
    if key is None:
        return None
    if key not in _loaded:
        directory = build_dir()
        path = _library(directory, _name())
        if path is None or (directory / "lock").exists():  # not built, or torch's build still holds its lock
            return None
        try:
            _loaded[key] = _import(path, _name())
        except Exception as e:  # corrupt, truncated or built against another torch: keep the ATen path
            _loaded[key] = None  # remembered first: a warning turned into an error must not retry every attach
            warnings.warn(
                f"steer's native CPU op at {path} does not load ({type(e).__name__}: {e}); steering "
                "uses the ATen path. Fix: `python -m steer.kernels.native` rebuilds it (in a new "
                "process).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[key]


def build(verbose: bool = False):
    """Compile :file:`native.cpp` (a no-op when already built) and return the module.

    Raises :class:`NativeBuildError` naming what is missing when it cannot compile (remembered: a process
    tries once).
    """
    global _build_error
    if _build_error is not None:
        raise _build_error
    try:
        return _build(verbose)
    except NativeBuildError as e:
        _build_error = e
        raise


def _build(verbose: bool):
    module = load()
    if module is not None:
        return module
    if _key() is None:
        raise NativeBuildError(f"{SOURCE} is missing; fix: reinstall steer-runtime (the wheel ships it).")
    from torch.utils.cpp_extension import load as cpp_load
    from torch.utils.cpp_extension import verify_ninja_availability

    with _ninja_on_path():
        try:
            verify_ninja_availability()
        except RuntimeError as e:
            raise NativeBuildError(
                "building steer's native CPU op needs ninja, which was not found; "
                "fix: `pip install ninja` (the ATen path works without it)."
            ) from e
        directory = build_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _check_lock(directory / "lock")
            stale = _library(directory, _name())
            if stale is not None and _loaded.get(_key(), 0) is None:  # built before, does not import: rebuild
                stale.unlink()
                _loaded.pop(_key(), None)
        except OSError as e:
            raise NativeBuildError(
                f"cannot prepare the build folder {directory} ({e}); fix: make it writable or "
                "set STEER_CACHE_DIR to a writable folder."
            ) from e
        try:
            cpp_load(
                name=_name(),
                sources=[str(SOURCE)],
                extra_cflags=_CFLAGS,
                build_directory=str(directory),
                verbose=verbose,
            )
        except Exception as e:  # compiler or headers missing, or a compile error: say so, keep the ATen path
            raise NativeBuildError(
                f"compiling {SOURCE.name} failed ({type(e).__name__}: {str(e)[-500:]}); fix: "
                "install a C++ compiler (g++ or clang++) and Python's development headers, "
                "and see `python -m steer.kernels.native -v` for the compiler's output; "
                "without it steering stays on the ATen path."
            ) from e
    _loaded.pop(_key(), None)
    module = load()
    if module is None:
        raise NativeBuildError(
            f"the build finished but {_name()} does not load from {directory}; fix: delete that folder and build again."
        )
    return module


def _check_lock(lock: Path) -> None:
    """torch's build waits, without a timeout, while ``lock`` exists: drop one a killed build left behind
    (older than ``_STALE_LOCK_S``), refuse to wait on a young one."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        return
    raise NativeBuildError(
        f"another build of steer's native op holds {lock} (for {age:.0f} s); fix: wait for it "
        "to finish, or delete that file if no build is running."
    )


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs ``ninja`` from PATH; a venv's pip-installed ninja is not there unless the venv is activated.
    Adds its folder to PATH for the build only."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        candidates = [Path(sys.executable).parent]
        try:
            import ninja

            candidates.append(Path(ninja.BIN_DIR))
        except (ImportError, AttributeError):
            pass
        found = [d for d in candidates if shutil.which("ninja", path=str(d)) is not None]
        if found:
            os.environ["PATH"] = os.pathsep.join([str(found[0]), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def use(flag: bool | None) -> bool | None:
    """Override the choice (tests, benchmarks): True = use it (built now if needed; raises
    :class:`NativeBuildError` if that fails), False = never, None = automatic. Returns the previous override.
    Read by a :class:`~.cpu.Plan` when it is made, i.e. when steering attaches."""
    global _override
    if flag:
        build()
    previous, _override = _override, flag
    return previous


@contextlib.contextmanager
def using(flag: bool | None):
    """``with using(False): Steering(...)``: :func:`use` for a block, the previous choice restored after."""
    previous = use(flag)
    try:
        yield
    finally:
        use(previous)


def decode_fn():
    """``decode_(h, R, beta, bias) -> bool`` when the native op is enabled and built, else None."""
    off = os.environ.get("STEER_NATIVE", "").strip().lower() in ("0", "off", "false", "no")
    if _override is False or (_override is None and off):
        return None
    module = load()
    return None if module is None else module.decode_


def main() -> int:
    try:
        build(verbose="-v" in sys.argv)
    except NativeBuildError as e:
        print(f"steer native CPU op not built: {e}", file=sys.stderr)
        return 1
    print(f"steer native CPU op ready: {_library(build_dir(), _name())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
