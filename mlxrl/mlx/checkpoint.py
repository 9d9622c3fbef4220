"""Checkpoint layout and atomic writes.

    output_dir/
      checkpoint-<step>/   adapters.safetensors, adapter_config.json (mlx-lm format),
                           optimizer.safetensors, mlxrl_run.json, trainer_state.json
      adapters.safetensors, adapter_config.json, trainer_state.json,
      mlxrl_run.json       (the final adapter; mlxrl_run.json: backend, config, files written)
      metrics.jsonl

A full fine-tune (`training.use_peft: false`) writes a Hugging Face model folder where a LoRA run
writes its adapter (`mlxrl.mlx.full_model.FullModelFiles`); the rest is the same. The model's
files come from a `files` object: `write(folder)`, and `read(folder)` for a resume.

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

from mlxrl.mlx.model import ADAPTER_FILE, save_adapter
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


class AdapterFiles:
    """A LoRA run's files: the adapter in mlx-lm's format."""

    def __init__(self, model, adapter_config: dict):
        self.model, self.adapter_config = model, adapter_config

    def write(self, folder: Path) -> None:
        save_adapter(self.model, folder, self.adapter_config)

    def read(self, folder: Path) -> None:
        self.model.load_weights(str(folder / ADAPTER_FILE), strict=False)


def write_checkpoint(output_dir: Path, step: int, files, optimizer, trainer_state: dict,
                     run_record: dict) -> Path:
    final = output_dir / f"checkpoint-{step}"
    with _one_line_write_errors(output_dir, final.name):
        tmp = staging_folder(output_dir, final.name)
        files.write(tmp)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), {k: v for k, v in flat.items() if isinstance(v, mx.array)})
        write_json(tmp / RUN_FILE, run_record)
        write_json(tmp / STATE_FILE, trainer_state)
        publish_folder(tmp, final)
    return final


def write_final(output_dir: Path, files, trainer_state: dict, run_record: dict) -> None:
    """The final adapter (or model) in output_dir itself; each file replaced atomically. Its
    RUN_FILE lists the files, so that `--overwrite` removes exactly these."""
    what = "the final adapter" if isinstance(files, AdapterFiles) else "the final model"
    with _one_line_write_errors(output_dir, what):
        tmp = staging_folder(output_dir, "final")
        files.write(tmp)
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
