"""What both backends share about an output_dir: finding complete checkpoints, writing them
atomically, and deciding whether a run resumes, starts fresh, or must not mix with another run's
checkpoints.

A checkpoint is written into a hidden temporary folder (`staging_folder`) and renamed into place
when complete (`publish_folder`), so a killed run never leaves a half-written `checkpoint-<step>`.

Backend-neutral (no mlx or torch import), so the torch backend can use it without MLX.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mlxrl.errors import ConfigError

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STAGING, _REPLACED = ".tmp-", ".old-"  # prefixes of what a save writes before it is complete


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those holding trainer_state.json, written last), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def resume_folder(training, overwrite: bool = False, may_delete: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix two runs).

    `resume_from_checkpoint` names one; `try_resume_from_last_checkpoint` takes the newest
    complete one in output_dir. A fresh run refuses an output_dir with checkpoints unless
    `overwrite`, which deletes them (when `may_delete`: the main process only, under accelerate).
    Staging folders that a killed save left behind are removed.
    """
    output_dir = Path(training.output_dir)
    if may_delete and output_dir.is_dir():  # what a killed save left: never a complete checkpoint
        for leftover in [*output_dir.glob(f"{_STAGING}*"), *output_dir.glob(f"{_REPLACED}*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    if training.resume_from_checkpoint:
        folder = Path(training.resume_from_checkpoint)
        if not (folder / STATE_FILE).is_file():
            raise ConfigError(f"training.resume_from_checkpoint: {folder} is not a complete checkpoint")
        return folder
    existing = checkpoints(output_dir)
    if training.try_resume_from_last_checkpoint:
        return existing[-1] if existing else None
    if existing and not overwrite:
        raise ConfigError(f"{output_dir} already holds checkpoints of a run ({existing[-1].name}); "
                          f"resume it with --resume, start over with --overwrite, or set "
                          f"training.output_dir elsewhere")
    if existing and may_delete:
        for folder in existing:
            shutil.rmtree(folder)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def staging_path(output_dir: Path, name: str) -> Path:
    """The hidden folder in output_dir that `name` is written into before `publish_folder`.

    Its name is fixed (no pid) so that every process of a distributed run writes into the same one.
    """
    return Path(output_dir) / f"{_STAGING}{name}"


def staging_folder(output_dir: Path, name: str) -> Path:
    """`staging_path`, emptied and created (by one process)."""
    tmp = staging_path(output_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a complete folder into place, replacing an older one of the same name."""
    if final.exists():
        old = final.parent / f"{_REPLACED}{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def publish_files(tmp: Path, dest: Path) -> None:
    """Move each file of `tmp` into `dest` (each replaced atomically), then remove `tmp`."""
    for f in tmp.iterdir():
        os.replace(f, dest / f.name)
    tmp.rmdir()


def write_json(path: Path, data) -> None:
    """JSON written and fsynced, so a following rename never publishes an empty file."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
