"""TensorBoard and W&B for a run's metrics, under the tags transformers' callbacks use.

`training.enable_tensorboard` (Oumi's default: on) and `training.enable_wandb`. The torch backend
reports through transformers' own `TensorBoardCallback` / `WandbCallback` (TRL's `report_to`);
the MLX backend through this module, with the same names (`tag`): `train/<metric>` for training
records, `eval/<metric>` for `eval_<metric>`, at the run's global step; at the end
`train_runtime`, `train_samples_per_second`, `train_steps_per_second` and `train_loss`, as the
Trainer logs them. Where the torch backend has no TensorBoard package, this writer serves it too,
so the default never costs a note.

TensorBoard: a minimal event-file writer (TFRecord framing, `Event` / `Summary` protobufs written
by hand: no TensorFlow, torch or tensorboard package needed), in `output_dir/runs/<time>_<host>/`
as transformers' default (`training.logging_dir` when set). W&B: `wandb.init` with
WANDB_PROJECT (default `huggingface`, as transformers) and `training.run_name`, then `wandb.log`
with `train/global_step` as the x axis; WANDB_MODE=offline works without a network.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from datetime import datetime
from pathlib import Path

from mlxrl.errors import ConfigError

logger = logging.getLogger(__name__)

# What transformers' WandbCallback puts in the run summary instead of the history.
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                "total_flos")


def tag(name: str) -> str:
    """transformers' `rewrite_logs`: `eval_x` -> `eval/x`, `test_x` -> `test/x`, else `train/x`."""
    for prefix in ("eval", "test"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1:]}"
    return f"train/{name}"


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record (not its step), by their reporting tags."""
    return {tag(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v == v}


# ----------------------------------------------------------------------------- TensorBoard


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int = 0, file_version: str | None = None,
                values: dict[str, float] | None = None) -> bytes:
    """A serialized tensorflow `Event`: wall_time (1, double), step (2, int64), file_version (3),
    summary (5) of `Summary.Value`s with tag (1) and simple_value (2, float)."""
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + bytes([2 << 3]) + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if values:
        summary = b"".join(_field(1, _field(1, name.encode()) + bytes([2 << 3 | 5])
                                  + struct.pack("<f", value)) for name, value in values.items())
        out += _field(5, summary)
    return out


def record_bytes(data: bytes) -> bytes:
    """TFRecord framing: length, its masked CRC-32C, the data, its masked CRC-32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class EventWriter:
    """Scalars into one TensorBoard event file in `folder`, made at the first scalars: a run that
    fails before it logs anything leaves no folder behind."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path: Path | None = None
        self._file = None

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = self.folder / name
        self._file = open(self.path, "ab")
        self._file.write(record_bytes(event_bytes(time.time(), 0, file_version="brain.Event:2")))

    def _write(self, event: bytes) -> None:
        if self._file is None:
            self._open()
        self._file.write(record_bytes(event))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._write(event_bytes(time.time(), step, values=values))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


def drop_events(folder: Path, output_dir: Path) -> None:
    """Remove the event files this process wrote in `folder` (their names hold its pid), then,
    for the default `output_dir/runs/<stamp>`, that folder and `runs/` when left empty: nothing
    else is touched (a user's logging_dir keeps its other files and itself)."""
    for file in folder.glob(f"events.out.tfevents.*.{os.getpid()}.*"):
        file.unlink(missing_ok=True)
    runs = Path(output_dir) / "runs"
    for empty in (folder, runs) if Path(folder).parent == runs else ():
        if not empty.is_dir() or any(empty.iterdir()):
            break
        empty.rmdir()


def default_logdir(output_dir: str | Path) -> Path:
    """transformers' default: output_dir/runs/<Mon DD_HH-MM-SS>_<host>."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return Path(output_dir) / "runs" / f"{stamp}_{socket.gethostname()}"


# ----------------------------------------------------------------------------- W&B


class WandbRun:
    """A W&B run as transformers' WandbCallback makes one (project, name, config, x axis)."""

    def __init__(self, run_name: str | None, config: dict):
        import wandb

        self.wandb = wandb
        self.owned = wandb.run is None
        if self.owned:
            kwargs = {"name": run_name} if run_name else {}
            try:
                wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), **kwargs)
            except Exception as e:
                raise wandb_error(e) or e from None
        wandb.config.update(config, allow_val_change=True)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step"}
        for key in SUMMARY_KEYS:
            if key in values:
                self.wandb.run.summary[key] = values.pop(key)
        if values:
            self.wandb.log({**scalars(values), "train/global_step": step})

    def close(self) -> None:
        if self.owned and self.wandb.run is not None:
            self.wandb.finish()


def wandb_error(e: BaseException) -> ConfigError | None:
    """W&B's refusal to start (no API key and no terminal to ask on, a malformed key) as one line,
    else None."""
    import sys

    errors = getattr(sys.modules.get("wandb"), "errors", None)
    if errors is None or not isinstance(e, (errors.UsageError, errors.AuthenticationError)):
        return None
    return ConfigError(f"training.enable_wandb: W&B did not start ({e}); run `wandb login` or set "
                       f"WANDB_API_KEY, or WANDB_MODE=offline to log locally (or enable_wandb: false)")


# ----------------------------------------------------------------------------- both


class Reporters:
    """The reporters of one run; `log(step, record)` sends a metrics record to each."""

    def __init__(self, tensorboard: EventWriter | None = None, wandb: WandbRun | None = None):
        self.tensorboard, self.wandb = tensorboard, wandb

    def log(self, step: int, record: dict) -> None:
        if self.tensorboard is not None:
            values = scalars({k: v for k, v in record.items() if k != "total_flos"})
            self.tensorboard.scalars(step, values)
        if self.wandb is not None:
            self.wandb.log(step, record)

    def close(self) -> None:
        for reporter in (self.tensorboard, self.wandb):
            if reporter is not None:
                reporter.close()


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def for_run(cfg, *, tensorboard: bool = True, wandb: bool = True) -> Reporters | None:
    """The reporters `cfg.training` asks for (the ones a backend leaves to this module), None
    when there are none. W&B without the `wandb` package is a note."""
    import dataclasses

    t = cfg.training
    board = None
    if tensorboard and t.enable_tensorboard:
        folder = Path(t.logging_dir) if t.logging_dir else default_logdir(t.output_dir)
        board = EventWriter(folder)
        logger.info(f"TensorBoard logs: {folder}")
    run = None
    if wandb and t.enable_wandb:
        if installed("wandb"):
            run = WandbRun(t.run_name, dataclasses.asdict(cfg))
        else:
            logger.warning("note: training.enable_wandb is on but wandb is not installed "
                        "(pip install wandb); metrics go to metrics.jsonl")
    return Reporters(board, run) if board or run else None
