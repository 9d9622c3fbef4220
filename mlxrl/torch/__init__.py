"""The PyTorch/TRL backend: the same configs through TRL's SFT, DPO and GRPO trainers with PEFT LoRA.

    translate.py   the one translation point: config -> TRL config, LoRA, quantization (what it
                   cannot honour: the table in mlxrl/capabilities.py)
    model.py       base model, tokenizer and LoRA targets through transformers
    methods.py     mlxrl's token ids and reward functions handed to TRL's three trainers
    callbacks.py   metrics.jsonl with MLX's metric names, MLX's checkpoint steps, progress bar
    train.py       `train(cfg)`: the run, resume, final adapter and trainer_state.json

Nothing heavy is imported here: `missing_packages()` and `auto_backend()` only look packages up,
so `mlxrl env` and `--backend auto` stay fast.
"""

from __future__ import annotations

import importlib.util
import platform

REQUIRED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def missing_packages() -> list[str]:
    """The packages the torch backend needs that are not installed."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def auto_backend() -> tuple[str, str]:
    """(backend, why) for `--backend auto`: MLX on Apple Silicon; elsewhere torch when installed."""
    if apple_silicon():
        return "mlx", "Apple Silicon: MLX runs on its GPU"
    missing = missing_packages()
    if not missing:
        return "torch", f"{platform.system()} {platform.machine()} with torch + TRL installed"
    return "mlx", f"not Apple Silicon, but the torch backend needs {', '.join(missing)} " \
                  f"(pip install 'mlxrl[torch]')"
