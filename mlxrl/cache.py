"""mlxrl's cache folder: `$MLXRL_CACHE`, else `~/.cache/mlxrl`. Tiny models, converted PEFT
adapters and the JIT compiler wrapper live under it (each in its own subfolder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MLXRL_CACHE`, or `~/.cache/mlxrl` (read at each call, so a test may point it elsewhere)."""
    return Path(os.environ.get("MLXRL_CACHE") or Path.home() / ".cache" / "mlxrl")
