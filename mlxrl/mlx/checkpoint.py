"""Checkpoint layout and atomic writes.

    output_dir/
      checkpoint-<step>/   adapters.safetensors, adapter_config.json (mlx-lm format),
                           optimizer.safetensors, trainer_state.json
      adapters.safetensors, adapter_config.json, trainer_state.json   (the final adapter)
      metrics.jsonl

A checkpoint is written into a hidden temporary folder and renamed into place when complete
(`mlxrl.run_dir`), so a killed run never leaves a half-written `checkpoint-<step>` that looks
complete. Only safetensors and JSON are ever read back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxrl.mlx.model import save_adapter
from mlxrl.run_dir import STATE_FILE, publish_files, publish_folder, staging_folder, write_json

OPTIMIZER_FILE = "optimizer.safetensors"


def write_checkpoint(output_dir: Path, step: int, model, adapter_config: dict, optimizer,
                     trainer_state: dict) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = staging_folder(output_dir, final.name)
    try:
        save_adapter(model, tmp, adapter_config)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), {k: v for k, v in flat.items() if isinstance(v, mx.array)})
        write_json(tmp / STATE_FILE, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final)
    return final


def write_final(output_dir: Path, model, adapter_config: dict, trainer_state: dict) -> None:
    """The final adapter in output_dir itself; each file replaced atomically."""
    tmp = staging_folder(output_dir, "final")
    save_adapter(model, tmp, adapter_config)
    write_json(tmp / STATE_FILE, trainer_state)
    publish_files(tmp, output_dir)


def load_optimizer_state(folder: Path) -> dict | None:
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return tree_unflatten(list(mx.load(str(path)).items()))
