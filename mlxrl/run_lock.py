"""One run at a time in an output_dir: an OS lock on `output_dir/.mlxrl.lock` for the run's life.

`flock` locks belong to the open file, so the kernel drops the lock when the process ends in any
way (SIGKILL, power loss of the process, a crash): a killed run never leaves a stale lock. The
file holds who took the lock (pid, host, command, start time) so that a second run can say who
holds the folder. Under torchrun / accelerate only the main process (RANK 0) takes it.

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from mlxrl.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".mlxrl.lock"


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cli.py", "mlxrl", "__main__.py"):
        argv[0] = "mlxrl"
    return " ".join(shlex.quote(a) for a in argv)[:300]


def prepare_output_dir(output_dir: Path, field: str = "training.output_dir") -> Path | None:
    """Create `output_dir` if needed; one-line errors when it is a file or cannot be written.
    Returns the top folder created here, or None."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{field} {output_dir} is a file, not a folder; set {field} to a folder")
    created = None
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            break
        created = folder
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {field} {output_dir}: {e.strerror}; set {field} to a "
                          f"folder you can write") from None
    return created


class RunLock:
    """`with RunLock(output_dir):` holds the folder; a second holder gets a one-line ConfigError."""

    def __init__(self, output_dir, enabled: bool = True):
        self.output_dir, self.enabled = Path(output_dir), enabled
        self._file = None
        self._created: Path | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self._created = prepare_output_dir(self.output_dir)
        path = self.output_dir / LOCK_FILE
        try:
            self._file = open(path, "a+")
        except OSError as e:
            self._tidy()
            raise ConfigError(f"training.output_dir {self.output_dir} is not writable: "
                              f"{e.strerror}; set training.output_dir to a folder you can write") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # e.g. NFS: ENOLCK
                logger.warning(f"note: cannot lock {self.output_dir} ({e.strerror}); a second run on it "
                         f"would not be stopped")
                return self
            holder = _holder(path)
            self._file.close()
            self._file = None
            raise ConfigError(f"{self.output_dir} is in use by another run ({holder}); wait for it "
                              f"to end, or set training.output_dir elsewhere") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "command": _command(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is None:
            return
        if self._created and {p.name for p in self.output_dir.iterdir()} == {LOCK_FILE}:
            self._tidy()  # the run wrote nothing: leave no empty folder behind (still locked)
        self._file.close()
        self._file = None

    def _tidy(self) -> None:
        if self._created is None:
            return
        (self.output_dir / LOCK_FILE).unlink(missing_ok=True)
        for folder in (self.output_dir, *self.output_dir.parents):
            try:
                folder.rmdir()
            except OSError:
                break
            if folder == self._created:
                break


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text().strip().splitlines()[-1])
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, IndexError):
        return "a process that is still starting"
