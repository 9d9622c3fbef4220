"""How a run stops early, the same on both backends: SIGINT / SIGTERM save a checkpoint and exit
with the resume command; a non-finite loss or gradient stops before the update (or skips it).

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

from mlxrl.errors import MlxrlError
from mlxrl.run_dir import checkpoints


class NonFiniteLoss(MlxrlError):
    pass


class TrainingInterrupted(MlxrlError):
    main_process_only = True  # every process of a distributed run stops; one says so

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops.

    A second signal stops at once (the last complete checkpoint stays intact), unless it comes
    within `same_request_s` of the first: a launcher such as torchrun forwards the Ctrl-C that its
    workers also got from the terminal.
    """

    same_request_s = 1.0

    def __init__(self):
        self.signum = None
        self._first_at = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.same_request_s:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def interrupted(signum: int, step: int, total_steps: int, folder: Path) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(f"{name} at step {step}/{total_steps}: saved {folder}; "
                               f"resume with the same command plus --resume", exit_code=128 + signum)


def kept_checkpoint(output_dir: Path) -> str:
    """What survives in output_dir, for error messages."""
    kept = checkpoints(output_dir)
    return f"the last checkpoint ({kept[-1]}) is intact" if kept else "no checkpoint was written yet"


def non_finite(what: str, output_dir: Path) -> NonFiniteLoss:
    return NonFiniteLoss(f"{what}; {kept_checkpoint(output_dir)}. Lower the learning rate, or set "
                         f"training.skip_non_finite_steps: true to skip such steps")


WRITE_ERRORS = (OSError, RuntimeError)  # MLX reports a failed write as RuntimeError("[write] ...")


def write_error_text(error: BaseException, folder: Path) -> str:
    """A failed write in a few words: the OS's reason, or the library's first line, with "No space
    left on device" when the disk is full (MLX's own message does not say why)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    return f"No space left on device ({text})" if full and "No space" not in text else text


def is_write_error(error: BaseException) -> bool:
    """An exception from writing a file: OSError, MLX's RuntimeError, safetensors' error."""
    return isinstance(error, WRITE_ERRORS) or type(error).__name__ == "SafetensorError"


def save_failed(output_dir: Path, what: str, reason: str) -> MlxrlError:
    """`what` (e.g. "checkpoint-8") could not be written; says what is intact."""
    kept = checkpoints(output_dir)
    where = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
    return MlxrlError(f"could not save {what} in {output_dir}: {reason}; {where}")
