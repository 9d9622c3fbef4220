"""What both backends share about an output_dir: finding checkpoints and writing them atomically
(`mlxrl.run_plan` decides whether a run resumes, starts fresh, or must not mix with another run).

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

STATE_FILE = "trainer_state.json"
RUN_FILE = "mlxrl_run.json"  # the backend and config of the run that wrote a folder (run_plan.py)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STAGING, _REPLACED = ".tmp-", ".old-"  # prefixes of what a save writes before it is complete


def checkpoint_folders(output_dir: Path, complete: bool = True) -> list[Path]:
    """`checkpoint-<step>` folders, oldest first; with `complete`, only those holding
    trainer_state.json (written last)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
             and (not complete or (p / STATE_FILE).is_file())]
    return [p for _, p in sorted(found)]


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return checkpoint_folders(output_dir)


def leftovers(output_dir: Path) -> list[Path]:
    """Staging folders a killed save left behind: never a complete checkpoint."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [*output_dir.glob(f"{_STAGING}*"), *output_dir.glob(f"{_REPLACED}*")]


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


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


def publish_files(tmp: Path, dest: Path) -> list[str]:
    """Move each file of `tmp` into `dest` (each replaced atomically), then remove `tmp`;
    returns the names moved."""
    names = sorted(f.name for f in tmp.iterdir())
    for name in names:
        os.replace(tmp / name, dest / name)
    tmp.rmdir()
    return names


def write_json(path: Path, data) -> None:
    """JSON written and fsynced, so a following rename never publishes an empty file."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
