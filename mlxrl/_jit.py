"""Let MLX's CPU JIT use the vector units (Linux x86-64 only), for the compiles mlxrl runs.

`mx.compile` fuses elementwise ops into C++ kernels that MLX builds at run time. The Linux
`mlx[cpu]` wheel passes no `-m` flags, so those kernels run one element at a time with library
calls for fma and floor: SiLU * up on 8 x 128 x 1536 floats takes 28 ms here. With the CPU's
vector flags, inlining allowed and `-fno-trapping-math` (so gcc may compute both sides of a
select), the same kernel vectorizes and takes 1.1 ms, with bit-identical results:
`-ffp-contract=off` keeps every multiply and add rounded as MLX's prebuilt kernels round them
(tests/test_cpu_speedups.py checks this).

How MLX 0.32 builds a kernel (libmlx.so, `Compiled::eval_cpu`): the first time a process needs a
kernel it looks for `<tmp>/mlx/<version>/cpu/lib<name>.so`, where `<tmp>` is C++'s
`temp_directory_path()`, i.e. $TMPDIR (or TMP, TEMP, TEMPDIR, else /tmp) read at that moment; it
loads the library if it is there, else writes the source beside it and runs
`g++ -std=c++17 -O3 -Wall -fPIC -shared ... "<name>.cpp" -o "<lib>"` through popen, so `g++` is
whatever PATH names at that moment. Both are read at every build, not once per process.

So `compile_environment()` sets both, while it is active, to mlxrl's own: PATH starts with a
folder holding a `g++` wrapper that adds the flags when it compiles a file in mlxrl's kernel
folder (and passes every other command through untouched, and retries a kernel that fails to build
with the flags without them), and TMPDIR is that kernel folder (`<cache>/jit/<digest>/kernels`,
one per compiler and flags). MLX's own folder ($TMPDIR/mlx/...) is never read or written by
mlxrl's builds, and mlxrl's folder only ever holds kernels its wrapper built. On exit PATH and
TMPDIR are restored. Python's own `tempfile` folder is pinned first, so it does not move.
Entry points enter it (`mlxrl.runtime.mlx_runtime`); importing mlxrl does nothing of this.
`MLXRL_NO_JIT_FLAGS=1` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from mlxrl.cache import cache_dir

status: str = "not set up (no MLX work yet in this process)"

# (cpuinfo flags that must all be present, the gcc flags they allow), best first
_VECTOR_FLAGS = (
    ({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma", "f16c"},
     "-mavx2 -mfma -mf16c -mavx512f -mavx512vl -mavx512bw -mavx512dq"),
    ({"avx2", "fma", "f16c"}, "-mavx2 -mfma -mf16c"),
)
# -fno-strict-aliasing: MLX's exp reads an int vector as floats through a pointer cast
_EXACT_AND_INLINED = "-ffp-contract=off -fno-trapping-math -fno-strict-aliasing -finline-limit=10000"

_WRAPPER = """#!/bin/sh
# Written by mlxrl (mlxrl/_jit.py): MLX CPU JIT kernels built in {kernels} get vector flags;
# every other command passes through untouched.
case "$*" in
  *{kernels_pattern}*) {real} {flags} -include {marker_header} "$@" 2>/dev/null && exit 0 ;;
esac
exec {real} "$@"
"""
_depth = 0  # nesting of compile_environment(): only the outermost sets and restores
_kernels: Path | None = None  # the kernel folder while compile_environment() is active


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compiler_flags(available: set[str]) -> str | None:
    for needed, flags in _VECTOR_FLAGS:
        if needed <= available:
            return f"{flags} {_EXACT_AND_INLINED}"
    return None


def marker(flags: str) -> bytes:
    """The string the wrapper embeds in every kernel library it builds with `flags`."""
    return b"mlxrl-jit-" + hashlib.sha256(flags.encode()).hexdigest()[:16].encode()


def jit_folder(real: str, flags: str) -> Path:
    """mlxrl's folder for (real compiler, flags, wrapper): the wrapper, its marker header and
    `kernels/` (a changed wrapper gets a new folder, so no kernel of another build is reused)."""
    digest = hashlib.sha256(f"{real} {flags} {_WRAPPER}".encode()).hexdigest()[:12]
    return cache_dir() / "jit" / digest


def install_wrapper(real: str, flags: str) -> Path:
    """Write the `g++` wrapper for (real compiler, flags) if it is not there; returns its folder."""
    folder = jit_folder(real, flags)
    header = folder / "mlxrl_jit_marker.h"
    kernels = folder / "kernels"
    script = _WRAPPER.format(real=shlex.quote(real), flags=flags, kernels=kernels,
                             kernels_pattern=shlex.quote(f"{kernels}/mlx/"),
                             marker_header=shlex.quote(str(header)))
    files = {header: f'__attribute__((used)) static const char mlxrl_jit_marker[] = "{marker(flags).decode()}";\n',
             folder / "g++": script}
    for path, text in files.items():
        if not (path.is_file() and path.read_text() == text):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{path.name}.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
    kernels.mkdir(exist_ok=True)
    return folder


def _path_without_wrappers(path: str) -> str:
    """PATH without mlxrl's wrapper folders (a child process may inherit its parent's)."""
    return os.pathsep.join(p for p in path.split(os.pathsep)
                           if not (p and (Path(p) / "mlxrl_jit_marker.h").is_file()))


def _plan() -> tuple[str, str | None, str | None]:
    """(status when off, real compiler, flags): both None when the wrapper does not apply."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return "not needed (not Linux x86-64)", None, None
    if os.environ.get("MLXRL_NO_JIT_FLAGS"):
        return "off (MLXRL_NO_JIT_FLAGS)", None, None
    flags = compiler_flags(cpu_flags())
    if flags is None:
        return "off (no AVX2/FMA on this CPU)", None, None
    real = shutil.which("g++", path=_path_without_wrappers(os.environ.get("PATH", "")))
    if real is None:
        return "off (no g++ on PATH)", None, None
    return "", real, flags


@contextlib.contextmanager
def compile_environment():
    """While active, MLX's JIT kernels are built by mlxrl's wrapper into mlxrl's kernel folder
    (see the module docstring); PATH and TMPDIR are restored on exit. Re-entrant."""
    global status, _depth, _kernels
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    saved = {k: os.environ.get(k) for k in ("PATH", "TMPDIR")}
    off, real, flags = _plan()
    if real is not None:
        try:
            folder = install_wrapper(real, flags)
        except OSError as e:
            off, real = f"off (could not write the g++ wrapper: {e})", None
    if real is None:
        status = off
    else:
        tempfile.gettempdir()  # pin Python's temp folder before TMPDIR changes
        os.environ["PATH"] = os.pathsep.join([str(folder), _path_without_wrappers(saved["PATH"] or "")])
        os.environ["TMPDIR"] = str(folder / "kernels")
        _kernels = folder / "kernels"
        status = f"on ({flags.split(' -ffp')[0]}; kernels in {folder / 'kernels'})"
    _depth = 1
    try:
        yield
    finally:
        _depth, _kernels = 0, None
        if real is not None:
            _finish_pending_builds()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _finish_pending_builds() -> None:
    """Kernels of work still queued (mx.async_eval) are built now, inside the environment."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.synchronize()


def kernel_folder() -> Path | None:
    """mlxrl's kernel folder while `compile_environment()` is active (else None)."""
    return _kernels


def kernels_built() -> int | None:
    """How many kernel libraries mlxrl's folder holds (0 before a first run builds them), None
    when the wrapper is not active."""
    if _kernels is None:
        return None
    return sum(1 for _ in _kernels.glob("mlx/*/cpu/lib*.so"))
