"""The PyTorch/TRL backend: the same configs through TRL's SFT, DPO and GRPO trainers with PEFT LoRA.

    translate.py   the one translation point: config -> TRL config, LoRA, quantization (what it
                   cannot honour: the table in mlxrl/capabilities.py)
    model.py       base model, tokenizer and LoRA targets through transformers
    methods.py     mlxrl's token ids and reward functions handed to TRL's three trainers
    callbacks.py   metrics.jsonl with MLX's metric names, MLX's checkpoint steps, progress bar
    train.py       `train(cfg)`: the run, resume, final adapter and trainer_state.json

Nothing heavy is imported here: `missing_packages()` and `auto_backend()` only look packages and
device files up, so `mlxrl env` and `--backend auto` stay fast and an MLX run never loads torch.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from pathlib import Path

REQUIRED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def missing_packages() -> list[str]:
    """The packages the torch backend needs that are not installed."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _torch_build() -> dict[str, str | None]:
    """torch's build (`cuda`, `hip` versions) read from its version.py, without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return {}
    found = {}
    for name in ("cuda", "hip"):
        match = re.search(rf"^{name}\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        found[name] = match.group(1) if match else None
    return found


def gpu_for_torch() -> str | None:
    """A GPU torch can use here, in words ("CUDA 12.8 build, NVIDIA GPU"), else None: a CUDA
    (or ROCm) build of torch and the device's driver nodes, without importing torch (fast, and
    nothing of torch loads into an MLX process)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    build = _torch_build()
    if build.get("cuda") and (any(Path("/dev").glob("nvidia[0-9]*"))
                              or Path("/proc/driver/nvidia/gpus").is_dir()):
        return f"CUDA {build['cuda']} build of torch, NVIDIA GPU"
    if build.get("hip") and Path("/dev/kfd").exists():
        return f"ROCm {build['hip']} build of torch, AMD GPU"
    return None


def auto_backend() -> tuple[str, str]:
    """(backend, why) for `--backend auto`: MLX on Apple Silicon; torch where it has a GPU (and
    the torch extra is installed); MLX otherwise: on a CPU the MLX backend is faster than torch
    (DPO on the quickstart: 0.28 vs 3.6 s/step) and uses less memory."""
    if apple_silicon():
        return "mlx", "Apple Silicon: MLX runs on its GPU"
    gpu = gpu_for_torch()
    missing = missing_packages()
    if gpu and not missing:
        return "torch", gpu
    if gpu:
        return "mlx", (f"{gpu}, but the torch backend needs {', '.join(missing)} "
                       f"(pip install 'mlxrl[torch]')")
    return "mlx", f"no GPU for torch on this {platform.system()} {platform.machine()} machine; " \
                  f"on a CPU MLX is the faster backend"
