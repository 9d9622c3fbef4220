"""mlxrl's messages: one `mlxrl` logger (each module logs to its child, `mlxrl.<module>`).

Levels: notes about a run's settings (`note: ...`) and warnings are WARNING; what is happening
(the header, "loading model", a line per logging step, the summary) is INFO; details a user asks
for with `--verbose` are DEBUG.

Who shows them:
- the CLI (`cli_logging`): a handler on the `mlxrl` logger that prints plain lines to stderr,
  level from `--quiet` (errors only) / `--verbose`, for the duration of the command;
- the Python API (`mlxrl.train/infer/evaluate`, `api_logging`): nothing is configured when the
  program has its own logging set-up (any handler on `mlxrl` or the root logger), so records go
  where it sends them; otherwise the same plain stderr lines for the duration of the call, so a
  script's notes are not lost. The root logger is never touched.

Lines go through `tqdm.write`, so they land above a live progress bar instead of through it.
Live bars are drawn only on a terminal (`live_bars()`): piped, in CI or under nohup the output is
plain lines, without `\\r` frames.
"""

from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = "mlxrl"


class ConsoleHandler(logging.Handler):
    """Plain one-line messages on the current `sys.stderr` (read at each record, so a caller that
    swaps stderr, as click's test runner does, gets them), written above any live tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's contract: never raise from emit)
            self.handleError(record)


def _console(level: int) -> ConsoleHandler:
    handler = ConsoleHandler(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


@contextlib.contextmanager
def _installed(handler: logging.Handler, level: int, propagate: bool):
    logger = logging.getLogger(LOGGER)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def cli_level(quiet: bool = False, verbose: bool = False) -> int:
    return logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO


@contextlib.contextmanager
def cli_logging(quiet: bool = False, verbose: bool = False):
    """The CLI's set-up while a command runs: plain lines on stderr at the flags' level."""
    level = cli_level(quiet, verbose)
    with _installed(_console(level), level, propagate=False) as logger:
        yield logger


@contextlib.contextmanager
def api_logging(quiet: bool = False):
    """The Python API's default: plain lines on stderr only when the program configured no
    logging (no handler on `mlxrl` or above it); otherwise nothing changes."""
    logger = logging.getLogger(LOGGER)
    if logger.hasHandlers():
        yield logger
        return
    level = logging.ERROR if quiet else logging.INFO
    with _installed(_console(level), level, propagate=True) as logger:
        yield logger


def live_bars() -> bool:
    """Whether to draw live progress bars: stderr is a terminal and INFO lines are shown."""
    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and logging.getLogger(LOGGER).isEnabledFor(logging.INFO)


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextlib.contextmanager
def muted(name: str, level: int = logging.ERROR):
    """Records of logger `name` below `level` are dropped while the block runs."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
