"""Writing a command's output folder (export, import, fuse) so that a failure changes nothing.

    with staged(out, overwrite, owned=("adapter_model.safetensors", ...)) as tmp:
        ... write every file into tmp ...

- A folder that is not empty is refused unless `overwrite`: the user may keep other things there.
- Everything is written into a hidden staging folder inside `out` and moved into place only when
  all of it is written: a full disk, a crash or Ctrl-C leave `out` as it was (and no staging).
- With `overwrite`, the files of an earlier output of the same command (`owned`, glob patterns)
  that the new one does not write are removed; anything else stays and is named in a note.

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

from mlxrl.errors import MlxrlError, MlxrlNote
from mlxrl.stopping import is_write_error, write_error_text

STAGING = ".tmp-mlxrl-output"


class OutputNote(MlxrlNote):
    """A note for the user about the output folder (printed as `note:` by the CLI)."""


@contextlib.contextmanager
def staged(out: Path, overwrite: bool, owned: tuple[str, ...], error=MlxrlError):
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{out} is a file; name a folder for the output")
    existing = [p for p in out.iterdir() if p.name != STAGING] if out.is_dir() else []
    if existing and not overwrite:
        raise error(f"{out} is not empty; pass --overwrite to replace an earlier output there "
                    f"(other files are kept), or name an empty folder")
    created = not out.exists()
    tmp = out / STAGING
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _publish(tmp, out, owned)
    except BaseException as e:
        reason = write_error_text(e, out) if is_write_error(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if reason is None:
            raise
        state = "not created" if created else "left as it was"
        raise error(f"could not write {out}: {reason}; {out} was {state}") from None


def _publish(tmp: Path, out: Path, owned: tuple[str, ...]) -> None:
    new = {p.name for p in tmp.iterdir()}
    stale = {p for pattern in owned for p in out.glob(pattern)} - {out / n for n in new}
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in sorted(new):
        dest = out / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    tmp.rmdir()
    kept = sorted(p.name for p in out.iterdir() if p.name not in new)
    if kept:
        warnings.warn(f"{out} also holds files this command did not write, left as they are: "
                      f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}", OutputNote, stacklevel=4)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` replaced whole by `text` (a temporary file renamed over it): two commands writing
    the same file leave one of their versions, never a mix, and a full disk leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MlxrlError(f"could not write {path}: {write_error_text(e, path.parent)}") from None
