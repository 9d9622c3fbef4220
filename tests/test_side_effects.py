"""Importing mlxrl changes nothing in the process; the entry points that run MLX set it up.

Each case runs in a fresh interpreter (this test process has OpenBLAS bound by conftest.py) and
reads the process's own state from the operating system: `os.environ`, the libraries mapped in
/proc/self/maps, whether the system OpenBLAS is loaded (`dlopen` with RTLD_NOLOAD), and the
files in MLX's kernel folder ($TMPDIR/mlx) and mlxrl's ($MLXRL_CACHE/jit).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from mlxrl import _blas, _jit

ROOT = Path(__file__).resolve().parents[1]
HAS_VECTOR_UNITS = _jit.compiler_flags(_jit.cpu_flags()) is not None and platform.machine() == "x86_64"
LINUX = sys.platform.startswith("linux")

PROBE = f"CANDIDATES = {_blas._CANDIDATES!r}\n" + r'''
import ctypes, json, os, subprocess


def openblas_loaded():
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            return True
        except OSError:
            pass
    return False


def libraries():
    return sorted({line.split()[-1] for line in open("/proc/self/maps") if ".so" in line})


def linked(paths):
    """The shared libraries these extension modules link against (what importing them maps)."""
    out = set()
    for path in paths:
        text = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        out |= {os.path.realpath(w) for w in text.split() if w.startswith("/")}
    return out


def files(folder):
    return sorted(str(p) for p in __import__("pathlib").Path(folder).rglob("*")) if os.path.isdir(folder) else []
'''

IMPORTS = PROBE + r'''
import sys
import click, numpy, yaml  # third-party packages load their own libraries; mlxrl's effects are the rest

before = dict(os.environ), libraries(), files(os.environ["TMPDIR"]), files(os.environ["MLXRL_CACHE"])
import mlxrl
from mlxrl.config import TrainConfig, load_config
import mlxrl.cli, mlxrl.evaluation, mlxrl.inference, mlxrl.model_names, mlxrl.runtime, mlxrl.tiny_models
after = dict(os.environ), libraries(), files(os.environ["TMPDIR"]), files(os.environ["MLXRL_CACHE"])
new = sorted(set(after[1]) - set(before[1]))
extensions = [p for p in new if ".cpython-" in p]
print(json.dumps({"environ": before[0] == after[0], "tmp": before[2] == after[2],
                  "cache": before[3] == after[3], "openblas": openblas_loaded(),
                  "unexplained": sorted(set(map(os.path.realpath, new)) - set(extensions) - linked(extensions)),
                  "mlx": "mlx.core" in sys.modules, "torch": "torch" in sys.modules}))
'''


def _run(script: str, tmp_path: Path, **env) -> dict:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    full_env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(ROOT), **env)
    full_env.setdefault("MLXRL_CACHE", str(tmp_path / "cache"))
    for key in ("MLXRL_NO_JIT_FLAGS", "MLXRL_NO_OPENBLAS"):
        full_env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_mlxrl_changes_nothing(tmp_path):
    result = _run(IMPORTS, tmp_path)
    assert result == {"environ": True, "tmp": True, "cache": True, "openblas": False,
                      "unexplained": [], "mlx": False, "torch": False}


def test_the_mlx_model_module_leaves_transformers_to_adding_adapters(tmp_path):
    """`import mlxrl.mlx.model` (the MLX backend's loader) does not import mlx-lm's tuner, and so
    transformers (~4 s): that waits until a model is loaded or adapters are added."""
    script = ("import json, sys\nimport mlxrl.mlx.model\n"
              "print(json.dumps({m: m in sys.modules for m in ('mlx_lm.tuner', 'transformers')}))")
    assert _run(script, tmp_path) == {"mlx_lm.tuner": False, "transformers": False}


TRAIN = PROBE + r'''
import mlxrl
from mlxrl import runtime

before = dict(os.environ)
state = mlxrl.train("configs/quickstart/sft.yaml", ["--training.max_steps", "2", "--training.save_steps", "0",
                    "--training.output_dir", os.environ["OUT"]], quiet=True)
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print(json.dumps({"steps": state["global_step"], "changed": changed,
                  "openblas": openblas_loaded(), "tmp": files(os.environ["TMPDIR"]), **runtime.status()}))
'''


def test_train_gets_openblas_and_the_jit_flags_and_restores_the_environment(tmp_path):
    # the session's cache: the tiny model and mlxrl's kernels are there already (a fast test)
    result = _run(TRAIN, tmp_path, OUT=str(tmp_path / "out"),
                  MLXRL_CACHE=os.environ.get("MLXRL_CACHE") or str(Path.home() / ".cache" / "mlxrl"))
    # PATH and TMPDIR are back; mlx-lm's own `import mlx_lm` sets TRANSFORMERS_NO_ADVISORY_WARNINGS
    # (already set here when this test process has imported mlx_lm)
    assert result["steps"] == 2 and set(result["changed"]) <= {"TRANSFORMERS_NO_ADVISORY_WARNINGS"}, result
    # MLX's own kernel folder ($TMPDIR/mlx) was not used. mlx-lm's tuner (its LoRA layers) imports
    # wandb when it is installed, and wandb makes its temporary folders at import: those are W&B's.
    wandb_own = ("wandb-media", "wandb-artifacts")
    assert [p for p in result["tmp"] if not p.endswith(wandb_own)] == []
    if LINUX:  # this machine: OpenBLAS is installed, and the CPU has the vector units
        assert result["openblas"] and result["BLAS"].startswith("OpenBLAS"), result
    if HAS_VECTOR_UNITS:
        assert result["CPU JIT flags"].startswith("on (-mavx2"), result


def test_mlxrl_env_reports_openblas_and_jit_flags(tmp_path):
    env = dict(os.environ, MLXRL_CACHE=str(tmp_path), TMPDIR=str(tmp_path))
    for key in ("MLXRL_NO_JIT_FLAGS", "MLXRL_NO_OPENBLAS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", "env"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith(("BLAS", "CPU")))
    if LINUX:
        assert lines["BLAS"].startswith("OpenBLAS ("), proc.stdout
    if HAS_VECTOR_UNITS:
        assert lines["CPU"].startswith(f"JIT flags on (-mavx2 -mfma -mf16c; kernels in {tmp_path}/jit/"), proc.stdout


LATE = PROBE + r'''
import warnings

import mlx.core  # the user's program imports MLX first
import mlxrl
from mlxrl.runtime import mlx_runtime, status

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        with mlx_runtime():
            pass
    mlxrl.bind_openblas()
print(json.dumps({"warnings": [str(w.message) for w in caught], "openblas": openblas_loaded(), **status()}))
'''


def test_mlx_imported_before_the_set_up_is_said_once(tmp_path):
    result = _run(LATE, tmp_path)
    if LINUX:  # elsewhere there is nothing to bind
        assert len(result["warnings"]) == 1, result
        assert "imported before" in result["warnings"][0] and "mlxrl.bind_openblas()" in result["warnings"][0]
        assert not result["openblas"] and "imported before" in result["BLAS"]


TORCH_CLI = PROBE + r'''
from mlxrl.cli import main

main(["train", "-c", "configs/quickstart/dpo.yaml", "--backend", "torch", "--quiet",
      "--training.max_steps", "1", "--training.save_steps", "0", "--training.output_dir", os.environ["OUT"]],
     standalone_mode=False)
print(json.dumps({"openblas": openblas_loaded(), "mlx": "mlx.core" in __import__("sys").modules}))
'''


def test_torch_backend_never_binds_openblas(tmp_path):
    """The system OpenBLAS fights torch's own threads (1.70 s/step instead of TRL's 0.57 on the
    DPO bench): `--backend torch` decides before any MLX set-up, and never does it."""
    result = _run(TORCH_CLI, tmp_path, OUT=str(tmp_path / "out"),
                  MLXRL_CACHE=os.environ.get("MLXRL_CACHE") or str(Path.home() / ".cache" / "mlxrl"))
    assert result == {"openblas": False, "mlx": False}
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
