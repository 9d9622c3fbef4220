"""mlxrl's cache folder: `$MLXRL_CACHE`, else `~/.cache/mlxrl`. Tiny models, converted PEFT
adapters and the JIT compiler wrapper live under it (each in its own subfolder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MLXRL_CACHE`, or `~/.cache/mlxrl` (read at each call, so a test may point it elsewhere)."""
    return Path(os.environ.get("MLXRL_CACHE") or Path.home() / ".cache" / "mlxrl")


def cached_folder(final: Path, build) -> Path:
    """`final`, built once by `build(folder)` when it holds no config.json yet.

    Safe under concurrent processes: each builds into its own temporary folder beside `final`
    and moves it into place with an atomic rename; a loser of the race drops its copy and uses
    the winner's.
    """
    import shutil
    import tempfile

    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
