"""Checkpoint layout and atomic writes.

    output_dir/
      checkpoint-<step>/   adapters.safetensors, adapter_config.json (mlx-lm format),
                           optimizer.safetensors, mlxrl_run.json, trainer_state.json
      adapters.safetensors, adapter_config.json, trainer_state.json,
      mlxrl_run.json       (the final adapter; mlxrl_run.json: backend, config, files written)
      metrics.jsonl

A checkpoint is written into a hidden temporary folder and renamed into place when complete
(`mlxrl.run_dir`), so a killed run never leaves a half-written `checkpoint-<step>` that looks
complete. Only safetensors and JSON are ever read back.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxrl.mlx.model import save_adapter
from mlxrl.run_dir import (
    RUN_FILE,
    STATE_FILE,
    leftovers,
    publish_files,
    publish_folder,
    staging_folder,
    write_json,
)
from mlxrl.stopping import is_write_error, save_failed, write_error_text

OPTIMIZER_FILE = "optimizer.safetensors"


def write_checkpoint(output_dir: Path, step: int, model, adapter_config: dict, optimizer,
                     trainer_state: dict, run_record: dict) -> Path:
    final = output_dir / f"checkpoint-{step}"
    with _one_line_write_errors(output_dir, final.name):
        tmp = staging_folder(output_dir, final.name)
        save_adapter(model, tmp, adapter_config)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), {k: v for k, v in flat.items() if isinstance(v, mx.array)})
        write_json(tmp / RUN_FILE, run_record)
        write_json(tmp / STATE_FILE, trainer_state)
        publish_folder(tmp, final)
    return final


def write_final(output_dir: Path, model, adapter_config: dict, trainer_state: dict,
                run_record: dict) -> None:
    """The final adapter in output_dir itself; each file replaced atomically. Its RUN_FILE lists
    the files, so that `--overwrite` removes exactly these."""
    with _one_line_write_errors(output_dir, "the final adapter"):
        tmp = staging_folder(output_dir, "final")
        save_adapter(model, tmp, adapter_config)
        write_json(tmp / STATE_FILE, trainer_state)
        names = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / RUN_FILE, {**run_record, "files": [*names, RUN_FILE]})
        publish_files(tmp, output_dir)


@contextlib.contextmanager
def _one_line_write_errors(output_dir: Path, what: str):
    """A failed write (disk full, read-only disk) removes the staging folder and becomes one
    line that says what is intact; anything else (Ctrl-C too) still removes the staging folder."""
    try:
        yield
    except BaseException as e:
        reason = write_error_text(e, output_dir) if is_write_error(e) else None
        for leftover in leftovers(output_dir):
            shutil.rmtree(leftover, ignore_errors=True)
        if reason is None:
            raise
        raise save_failed(output_dir, what, reason) from None


def load_optimizer_state(folder: Path) -> dict | None:
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return tree_unflatten(list(mx.load(str(path)).items()))
