"""The one error handler of every `mlxrl` command, and the MLX set-up of the commands that run MLX.

`@friendly_errors` (or `@friendly_errors(mlx=True)`) under click's decorators:
- a user error (`MlxrlError`) prints `error: <one line>` and exits with the error's `exit_code`
  (1 unless it says otherwise: 128 + signal for a run stopped by a signal); under
  `accelerate launch`, an error marked `main_process_only` prints on RANK 0 alone;
- `--debug` (or MLXRL_DEBUG=1) lets the traceback through instead;
- Ctrl-C prints `interrupted` (naming the output a command leaves as it was) and exits 130;
- warnings of category `MlxrlNote` (e.g. an adapter conversion's) print as `note: <line>`;
- `mlx=True`: the command runs inside `mlxrl.runtime.mlx_runtime()` (OpenBLAS, JIT flags);
- mlxrl's messages (the `mlxrl` logger) print as plain lines on stderr while the command runs
  (`mlxrl.console.cli_logging`): errors only with the command's `--quiet`, details with `--verbose`.

Its own module so that `mlxrl.cli` (run as `__main__` by `python -m mlxrl.cli`) and the command
modules it registers share it without importing each other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings

import click

from mlxrl.console import cli_logging
from mlxrl.errors import MlxrlError, MlxrlNote


def friendly_errors(fn=None, *, mlx: bool = False):
    if fn is None:
        return functools.partial(friendly_errors, mlx=mlx)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("MLXRL_DEBUG") == "1"
        try:
            with cli_logging(bool(kwargs.get("quiet")), bool(kwargs.get("verbose"))), \
                    _mlx_runtime() if mlx else contextlib.nullcontext(), _notes_printed():
                return fn(*args, **kwargs)
        except MlxrlError as e:
            if debug:
                raise
            if not (e.main_process_only and os.environ.get("RANK", "0") != "0"):
                click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 1))
        except KeyboardInterrupt:
            output = kwargs.get("output")  # export, import and fuse write it whole or not at all
            click.echo(f"interrupted: {output} was left as it was" if output else "interrupted", err=True)
            sys.exit(130)
    return wrapper


def _mlx_runtime():
    from mlxrl.runtime import mlx_runtime

    return mlx_runtime()


@contextlib.contextmanager
def _notes_printed():
    """`MlxrlNote` warnings print as `note:` lines when raised; other warnings as they would."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", MlxrlNote)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, MlxrlNote):
                logging.getLogger("mlxrl.cli").warning(f"note: {message}")
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
