"""Checkpoint layout and atomic writes.

    output_dir/
      checkpoint-<step>/   adapters.safetensors, adapter_config.json (mlx-lm format),
                           optimizer.safetensors, trainer_state.json
      adapters.safetensors, adapter_config.json, trainer_state.json   (the final adapter)
      metrics.jsonl

A checkpoint is written into a hidden temporary folder and renamed into place when complete, so a
killed run never leaves a half-written `checkpoint-<step>` that looks complete. Only safetensors
and JSON are ever read back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxrl.mlx.model import save_adapter
from mlxrl.run_dir import STATE_FILE

OPTIMIZER_FILE = "optimizer.safetensors"


def write_checkpoint(output_dir: Path, step: int, model, adapter_config: dict, optimizer,
                     trainer_state: dict) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_adapter(model, tmp, adapter_config)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), {k: v for k, v in flat.items() if isinstance(v, mx.array)})
        _write_json(tmp / STATE_FILE, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_final(output_dir: Path, model, adapter_config: dict, trainer_state: dict) -> None:
    """The final adapter in output_dir itself; each file replaced atomically."""
    tmp = output_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp, adapter_config)
    _write_json(tmp / STATE_FILE, trainer_state)
    for f in tmp.iterdir():
        os.replace(f, output_dir / f.name)
    tmp.rmdir()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def load_optimizer_state(folder: Path) -> dict | None:
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return tree_unflatten(list(mx.load(str(path)).items()))
