"""The wheel is what a user installs: built by pip from the package alone, installed into a fresh
virtual environment, `mlxrl quickstart` runs from a folder outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mlxrl" / "assets").rglob("*") if p.is_file())


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of what the sdist holds (pyproject, README, the package): nothing of
    the checkout around it can leak in."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "mlxrl", src / "mlxrl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("mlxrl-*.whl")
    return wheel


def _venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed. The packages of this environment (mlx, torch, ...)
    are reachable through a .pth that lists its site-packages folder as a plain path, so the .pth
    files in that folder, and with them this environment's editable mlxrl, are not processed."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, a folder outside the checkout, the environment to run in) with the wheel installed."""
    tmp_path = tmp_path_factory.mktemp("packaging")
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert ASSETS and all(a in names for a in ASSETS), sorted(set(ASSETS) - set(names))
    venv = _venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([venv / "bin" / "python", "-c", "import mlxrl; print(mlxrl.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's mlxrl, not the checkout's
    return venv, elsewhere, env


def test_quickstart_from_an_installed_wheel_outside_the_checkout(installed):
    """The whole quickstart (--scale 0.01: 2 steps a stage, 16-row evals; ~15 s on an idle
    2-core machine) from the configs and data in the wheel."""
    venv, elsewhere, env = installed
    proc = _run([venv / "bin" / "mlxrl", "quickstart", "--scale", "0.01", "--output", "qs"], cwd=elsewhere, env=env)
    report = elsewhere / "qs" / "report.md"
    assert proc.stdout.strip() == f"report: {Path('qs') / 'report.md'}" and report.is_file()
    assert "| SFT |" in report.read_text() and (elsewhere / "qs" / "grpo" / "adapters.safetensors").is_file()
