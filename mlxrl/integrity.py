"""Is a file or folder that mlxrl is about to read whole and of the kind it expects? Checked from
the bytes on disk before any loader runs, so that a damaged checkpoint, a folder of the other
backend or pickled weights give one line instead of a loader's traceback (or an unpickler's run).

- `safetensors_problem(path)`: a cheap structural check (the 8-byte header length, the JSON
  header, every tensor's byte range inside the file and the file no shorter than the data).
- `json_problem(path)`: the file parses as JSON.
- `adapter_problem(folder)` / `model_problem(folder)` / `checkpoint_problem(folder)`: an adapter
  folder (MLX or PEFT) or a model folder (a full fine-tune's) is usable for inference / for an
  exact resume.
- `refuse_pickled_weights(folder)`: a model or PEFT folder whose weights exist only as pickles.

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mlxrl.errors import ModelError
from mlxrl.run_dir import RUN_FILE

MLX_ADAPTER = "adapters.safetensors"
PEFT_ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when it looks whole."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name}: missing"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: truncated ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                return f"{path.name}: truncated or not safetensors ({size:,} bytes)"
            header = json.loads(f.read(length))
    except OSError as e:
        return f"{path.name}: cannot be read ({e.strerror})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name}: not safetensors (unreadable header)"
    if not isinstance(header, dict):
        return f"{path.name}: not safetensors (unreadable header)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + length + max(ends, default=0)
    if size < need:
        return f"{path.name}: truncated ({size:,} of {need:,} bytes)"
    return None


def json_problem(path: Path) -> str | None:
    """Why `path` is not a readable JSON file, or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name}: missing"
    try:
        json.loads(path.read_bytes())
    except OSError as e:
        return f"{path.name}: cannot be read ({e.strerror})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name}: not valid JSON"
    return None


def adapter_kind(folder: Path) -> str | None:
    """'mlx' or 'torch' (a PEFT folder) by the files in `folder`, or None if it holds neither."""
    folder = Path(folder)
    if (folder / MLX_ADAPTER).exists():
        return "mlx"
    if (folder / PEFT_ADAPTER).exists() or (folder / "adapter_model.bin").exists():
        return "torch"
    config = folder / ADAPTER_CONFIG
    if config.is_file() and json_problem(config) is None:
        return "torch" if "peft_type" in json.loads(config.read_text()) else "mlx"
    return None


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter in `folder` cannot be loaded (config and weights), or None."""
    folder = Path(folder)
    problem = json_problem(folder / ADAPTER_CONFIG)
    if problem is not None:
        return problem
    weights = MLX_ADAPTER if adapter_kind(folder) == "mlx" else PEFT_ADAPTER
    if weights == PEFT_ADAPTER and not (folder / PEFT_ADAPTER).exists() \
            and (folder / "adapter_model.bin").exists():
        return "adapter_model.bin: a pickle file (mlxrl reads only adapter_model.safetensors)"
    return safetensors_problem(folder / weights)


def model_problem(folder: Path) -> str | None:
    """Why the model folder `folder` (config.json and safetensors weights, one file or shards)
    cannot be loaded, or None."""
    folder = Path(folder)
    problem = json_problem(folder / "config.json")
    if problem is not None:
        return problem
    index = folder / MODEL_INDEX
    if not index.exists():
        return safetensors_problem(folder / MODEL_FILE)
    if (problem := json_problem(index)) is not None:
        return problem
    shards = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
    return next((p for p in (safetensors_problem(folder / s) for s in shards) if p), None)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from exactly (adapter or model, optimizer, state), or None."""
    folder = Path(folder)
    kind = adapter_kind(folder)
    problem = json_problem(folder / STATE_FILE) or (adapter_problem(folder) if kind else model_problem(folder))
    if problem is not None:
        return problem
    state = json.loads((folder / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{STATE_FILE}: no global_step"
    for name in ("optimizer.safetensors", *(p.name for p in folder.glob("rng_state*.safetensors"))):
        if (problem := safetensors_problem(folder / name)) is not None:
            return problem
    if kind == "torch" or (kind is None and _written_by(folder) == "torch"):
        return json_problem(folder / "scheduler.json")
    return None


def _written_by(folder: Path) -> str | None:
    """The backend named in the folder's mlxrl_run.json, if it has a readable one."""
    record = folder / RUN_FILE
    if json_problem(record) is not None:
        return None
    data = json.loads(record.read_text())
    return data.get("backend") if isinstance(data, dict) else None


def check_adapter(folder: Path) -> None:
    """Raise a one-line `ModelError` when the adapter in `folder` is damaged or incomplete."""
    problem = adapter_problem(folder)
    if problem is not None:
        hint = _other_checkpoints(Path(folder))
        raise ModelError(f"{folder} is damaged or incomplete ({problem}){hint}")


def _other_checkpoints(folder: Path) -> str:
    """"; the newest readable checkpoint beside it is X" when there is one."""
    siblings = sorted((p for p in folder.parent.glob("checkpoint-*") if p != folder
                       and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
    for other in reversed(siblings):
        if adapter_problem(other) is None:
            return f"; the newest readable checkpoint beside it is {other}"
    return ""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken", "tokenizer.tiktoken")


def check_tokenizer(folder: Path, other_source: str = "") -> None:
    """A local model folder without tokenizer files is refused: transformers would fall back to a
    tokenizer with no vocabulary and every text would become the same few tokens.
    `other_source`: how else the user can name a tokenizer, for the message."""
    folder = Path(folder)
    if folder.is_dir() and not any(any(folder.glob(p)) for p in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                         f"copy them from the model's original folder{other_source}")


def refuse_pickled_weights(folder: Path, what: str = "model") -> None:
    """A folder whose weights are only pickle files (`pytorch_model.bin`, `adapter_model.bin`,
    ...) is refused before transformers or peft could unpickle them."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder} holds {what} weights only as pickle files ({', '.join(pickles)}); "
                         f"mlxrl loads only safetensors, which run no code when read. Convert them "
                         f"where you trust the file (save_pretrained(..., safe_serialization=True))")
