"""What both backends share about an output_dir: finding complete checkpoints, and deciding
whether a run resumes, starts fresh, or must not mix with another run's checkpoints.

Backend-neutral (no mlx or torch import), so the torch backend can use it without MLX.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mlxrl.errors import ConfigError

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those holding trainer_state.json, written last), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resume_folder(training, overwrite: bool = False, may_delete: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix two runs).

    `resume_from_checkpoint` names one; `try_resume_from_last_checkpoint` takes the newest
    complete one in output_dir. A fresh run refuses an output_dir with checkpoints unless
    `overwrite`, which deletes them (when `may_delete`: the main process only, under accelerate).
    """
    output_dir = Path(training.output_dir)
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
