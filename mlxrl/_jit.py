"""Let MLX's CPU JIT use the vector units (Linux x86-64 only).

`mx.compile` fuses elementwise ops into C++ kernels that MLX builds at run time with
`g++ -O3 -shared` into $TMPDIR/mlx/<version>/cpu/. The Linux `mlx[cpu]` wheel passes no `-m` flags,
so those kernels run one element at a time with library calls for fma and floor: SiLU * up on
8 x 128 x 1536 floats takes 28 ms here. With the CPU's vector flags, inlining allowed and
`-fno-trapping-math` (so gcc may compute both sides of a select), the same kernel vectorizes and
takes 1.1 ms, with bit-identical results: `-ffp-contract=off` keeps every multiply and add rounded
as MLX's prebuilt kernels round them (tests/test_cpu_speedups.py checks this).

How: a `g++` wrapper on PATH that adds the flags when it compiles a file under `/mlx/.../cpu/` and
passes everything else through untouched (and retries a kernel that fails to build with the
flags without them); each kernel library it builds with the flags embeds a marker string. MLX
reuses a kernel library it finds on disk, so libraries without the marker (built by a plain MLX
process, or with other flags) are removed here once they are a minute old
(a younger one may be about to be loaded by another process); MLX rebuilds them on first use.
`MLXRL_NO_JIT_FLAGS=1` turns this off.
"""

import hashlib
import os
import platform
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

status: str = "not attempted"

# (cpuinfo flags that must all be present, the gcc flags they allow), best first
_VECTOR_FLAGS = (
    ({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma", "f16c"},
     "-mavx2 -mfma -mf16c -mavx512f -mavx512vl -mavx512bw -mavx512dq"),
    ({"avx2", "fma", "f16c"}, "-mavx2 -mfma -mf16c"),
)
# -fno-strict-aliasing: MLX's exp reads an int vector as floats through a pointer cast
_EXACT_AND_INLINED = "-ffp-contract=off -fno-trapping-math -fno-strict-aliasing -finline-limit=10000"

_WRAPPER = """#!/bin/sh
# Written by mlxrl (mlxrl/_jit.py): MLX CPU JIT kernels get vector flags, all else passes through.
case "$*" in
  *"/mlx/"*"/cpu/"*) "{real}" {flags} -include "{marker_header}" "$@" 2>/dev/null && exit 0 ;;
esac
exec "{real}" "$@"
"""


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


def kernel_dir() -> Path | None:
    """Where MLX keeps its CPU kernel libraries (C++'s temp_directory_path() / mlx / version / cpu)."""
    try:
        mlx_version = version("mlx")
    except PackageNotFoundError:
        return None
    tmp = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(tmp) / "mlx" / mlx_version / "cpu"


def marker(flags: str) -> bytes:
    """The string the wrapper embeds in every kernel library it builds with `flags`."""
    return b"mlxrl-jit-" + hashlib.sha256(flags.encode()).hexdigest()[:16].encode()


def drop_stale_kernels(folder: Path, flags: str, min_age_s: float = 60.0) -> int:
    """Remove kernel libraries not built with `flags` (without their marker); returns how many."""
    if not folder.is_dir():
        return 0
    removed, now, wanted = 0, time.time(), marker(flags)
    for lib in folder.glob("lib*.so"):
        try:
            if now - lib.stat().st_mtime < min_age_s or wanted in lib.read_bytes():
                continue
            lib.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def _cache_dir() -> Path:
    return Path(os.environ.get("MLXRL_CACHE") or Path.home() / ".cache" / "mlxrl")


def install_wrapper(real: str, flags: str) -> Path:
    """The folder holding the `g++` wrapper for (real compiler, flags)."""
    digest = hashlib.sha256(f"{real} {flags}".encode()).hexdigest()[:12]
    folder = _cache_dir() / "jit" / digest
    header = folder / "mlxrl_jit_marker.h"
    files = {header: f'__attribute__((used)) static const char mlxrl_jit_marker[] = "{marker(flags).decode()}";\n',
             folder / "g++": _WRAPPER.format(real=real, flags=flags, marker_header=header)}
    for path, text in files.items():
        if not (path.is_file() and path.read_text() == text):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{path.name}.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
    return folder


def _path_without_wrappers() -> str:
    """PATH without mlxrl's wrapper folders (a child process inherits its parent's)."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "/mlxrl/jit/" not in p)


def tune_cpu_jit() -> str:
    """Put the wrapper first on PATH when this machine can use it; returns a status line."""
    global status
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        status = "not needed (not Linux x86-64)"
    elif os.environ.get("MLXRL_NO_JIT_FLAGS"):
        status = "off (MLXRL_NO_JIT_FLAGS)"
    elif (flags := compiler_flags(cpu_flags())) is None:
        status = "off (no AVX2/FMA on this CPU)"
    elif (real := shutil.which("g++", path=_path_without_wrappers())) is None:
        status = "off (no g++ on PATH)"
    else:
        try:
            folder = install_wrapper(real, flags)
            os.environ["PATH"] = f"{folder}{os.pathsep}{_path_without_wrappers()}"
            dropped = drop_stale_kernels(kernel_dir() or Path("/nonexistent"), flags)
            status = f"on ({flags.split(' -ffp')[0]}; {dropped} stale kernels dropped)"
        except OSError as e:
            status = f"off (could not write the g++ wrapper: {e})"
    return status
