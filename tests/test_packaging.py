"""Import names: nothing of ours may shadow Hugging Face's `kernels` distribution (or a bare `cli`)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import transformers.utils as u; from transformers import LlamaConfig, AutoModelForCausalLM; "
    "assert u.is_kernels_available() is False, 'kernels probed as available'; print('ok')"
)


def _run(cwd, extra_path=""):
    env = {**os.environ, "PYTHONPATH": extra_path}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_transformers_unaffected_when_installed(tmp_path):
    _run(tmp_path)


def test_transformers_unaffected_with_repo_root_on_sys_path():
    _run(ROOT, str(ROOT))  # like `python -m pytest` from the checkout


def test_installed_names_live_under_steer(tmp_path):
    code = (
        "import importlib.util as u; import steer.kernels, steer.vectors, steer.cli; "
        "assert u.find_spec('cli') is None or 'steer' not in (u.find_spec('cli').origin or ''); "
        "assert u.find_spec('kernels') is None; assert u.find_spec('vectors') is None; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    assert out.returncode == 0, out.stderr


def test_kernels_imports_nothing_of_ours_and_has_no_version():
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith(("steer", "vectors", "cli")), (path, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("steer", "vectors", "cli")) for a in node.names), path
            if isinstance(node, ast.Assign):
                assert not any(getattr(t, "id", None) == "__version__" for t in node.targets), path


def test_wheel_ships_the_native_source(tmp_path):
    """`python -m steer.kernels.native` compiles kernels/native.cpp from the installed package: it must be in it.
    Built from a copy of the sources (a build/ folder left in the checkout would leak into the wheel)."""
    import shutil
    import zipfile

    import pytest

    if subprocess.run([sys.executable, "-c", "import setuptools"], capture_output=True).returncode:
        pytest.skip("setuptools not installed in this interpreter (pip builds in isolation there)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "build")
    for name in ("steer", "vectors", "kernels"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (whl,) = (tmp_path / "dist").glob("steer_runtime-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "steer/kernels/native.cpp" in names and "steer/kernels/native.py" in names
    # the CLI ships as a real module (no symlink to ../cli.py), with its console script
    cli = zipfile.ZipFile(whl).read("steer/cli.py").decode()
    assert "def main(" in cli and "@app.command" in cli
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "steer = steer.cli:main" in zipfile.ZipFile(whl).read(entry).decode()


def test_no_symbolic_links_in_the_repository():
    """A checkout without symlink support (Windows' default) must get working files."""
    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        import pytest

        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in out.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_top_level_cli_shim_runs_the_cli():
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0 and "generate" in out.stdout, out.stderr
