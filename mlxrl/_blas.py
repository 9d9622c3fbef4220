"""Bind the system OpenBLAS before MLX loads (Linux only).

The Linux `mlx[cpu]` wheel bundles the Netlib reference BLAS (~6 GFLOP/s). Loading the system
OpenBLAS with RTLD_GLOBAL *before* the first `import mlx.core` makes MLX's cblas calls resolve to
it: about 57x faster on fp32 matmuls with identical results. A CDLL after mlx is imported does
nothing, so the MLX entry points call `bind_openblas()` first (`mlxrl.runtime.mlx_runtime`).
Importing mlxrl does not: a process that never runs MLX (the torch backend, whose own threads
fight OpenBLAS's) never gets it.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libopenblas.so",
)

bound: str | None = None  # path of the BLAS bound, or None
status: str = "not bound (no MLX work yet in this process)"
_attempted = False


def bind_openblas() -> str | None:
    """Load OpenBLAS globally if on Linux and mlx is not imported yet; once per process (a
    second call returns the first one's result). Returns what was bound."""
    global bound, status, _attempted
    if _attempted:
        return bound
    _attempted = True
    if not sys.platform.startswith("linux"):
        status = "not needed (not Linux)"
        return None
    if os.environ.get("MLXRL_NO_OPENBLAS"):
        status = "disabled by MLXRL_NO_OPENBLAS"
        return None
    if "mlx.core" in sys.modules:
        status = "MLX's bundled reference BLAS: mlx.core was imported before mlxrl could bind OpenBLAS"
        warnings.warn("mlxrl: mlx.core was imported before mlxrl could bind the system OpenBLAS, so "
                      "MLX's matmuls use its bundled reference BLAS (~50x slower on Linux); call "
                      "mlxrl.bind_openblas() before the first `import mlx.core`", stacklevel=3)
        return None
    names = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.insert(1, found)
    for name in names:
        try:
            ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
        except OSError:
            continue
        bound, status = name, f"OpenBLAS ({name})"
        return bound
    status = "reference BLAS bundled with mlx (install libopenblas0-pthread for ~50x faster matmuls)"
    warnings.warn("mlxrl: system OpenBLAS not found; " + status, stacklevel=3)
    return None


@contextlib.contextmanager
def threads(n: int):
    """Within the block, OpenBLAS runs its matmuls on at most `n` threads (the bound OpenBLAS's
    `openblas_set_num_threads`; nothing where none is bound). Every queued MLX computation
    finishes first, so no matmul runs while the count changes; the count is restored after."""
    import mlx.core as mx

    lib = _library()
    before = lib.openblas_get_num_threads() if lib else 0
    if before <= n:
        yield
        return
    mx.synchronize()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        mx.synchronize()
        lib.openblas_set_num_threads(before)


def _library():
    if not bound:
        return None
    lib = ctypes.CDLL(bound)
    return lib if hasattr(lib, "openblas_set_num_threads") else None
