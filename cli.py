"""The ``steer`` command line, from a checkout: ``python cli.py --help``.

A thin shim: the commands live in :mod:`steer.cli` (installed with the package; console script ``steer``), so
no symbolic link is needed and a checkout without symlink support (Windows' default) works the same.
"""

from steer.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
