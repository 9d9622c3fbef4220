"""What a process needs before mlxrl runs MLX work, done by the entry points, never at import.

`mlx_runtime()` is entered by the CLI (once it knows the backend is MLX), `mlxrl.train()`,
`mlxrl.infer()`, `mlxrl.evaluate()`, the benchmarks and the tests' conftest:
- the system OpenBLAS is bound before the first `import mlx.core` (`_blas.py`; once per
  process, since a loaded library stays; a warning, once, when mlx.core came first);
- while the block runs, MLX's JIT kernels are built with the CPU's vector flags into mlxrl's own
  kernel folder (`_jit.py`); PATH and TMPDIR are restored on exit.

Backend-neutral: imports neither mlx nor torch.
"""

from __future__ import annotations

import contextlib

from mlxrl import _blas, _jit


@contextlib.contextmanager
def mlx_runtime():
    """Set up this process for MLX work by mlxrl for the duration of the block (re-entrant)."""
    _blas.bind_openblas()
    with _jit.compile_environment():
        yield


def status() -> dict[str, str]:
    """What the set-up did in this process: {"BLAS": ..., "CPU JIT flags": ...}."""
    return {"BLAS": _blas.status, "CPU JIT flags": _jit.status}
