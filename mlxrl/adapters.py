"""Adapters to and from Hugging Face PEFT, fused models, and uploads to the hub.

- `export_peft(checkpoint_dir, output_dir)`: an mlxrl/mlx-lm adapter -> `adapter_model.safetensors`
  + `adapter_config.json` + README.md that `peft.PeftModel.from_pretrained` loads. An adapter
  trained on a quantized base is exported against the dequantized base, written next to it in
  `dequantized_base/`; `adapter_config.json`'s `base_model_name_or_path` names the base to load.
- `import_peft(peft_dir, output_dir, base_model=None)`: a PEFT LoRA/DoRA adapter -> mlxrl's format.
- `fuse(checkpoint_dir, output_dir, quantize=False)`: the merged model in Hugging Face layout,
  dequantized (transformers loads it); `quantize=True` keeps an MLX-quantized model for mlx-lm.
- `push_to_hub(folder, repo_id)`: create the repo and upload the folder.

Every mapping is exact (rename, transpose, per-architecture factor; `mlxrl/adapter_maps.py`);
what cannot be mapped exactly is refused with the reason. Warnings carry notes the user should see.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx

from mlxrl.adapter_hub import model_card, push_to_hub
from mlxrl.adapter_maps import LAYER_PATH, AdapterError, AdapterNote, arch_map, from_hf, to_hf
from mlxrl.errors import MlxrlError
from mlxrl.integrity import check_adapter
from mlxrl.mlx.model import ADAPTER_FILE
from mlxrl.model_names import ADAPTER_CONFIG, local_model_path, resolve
from mlxrl.output_folder import staged

__all__ = ["AdapterError", "AdapterNote", "export_peft", "import_peft", "fuse", "push_to_hub"]

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
DEQUANTIZED_BASE = "dequantized_base"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
                   "vocab.*", "merges.txt", "*.tiktoken", "generation_config.json", "*.py")


# --- reading -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _mlx_adapter(folder: Path) -> tuple[dict, dict[str, mx.array]]:
    config = _read_json(folder / ADAPTER_CONFIG)
    if "peft_type" not in config:
        check_adapter(folder)
    if "peft_type" in config:
        raise AdapterError(f"{folder} holds a PEFT adapter; use `mlxrl import` to convert it")
    if config.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise AdapterError(f"{folder} is a {config['fine_tune_type']!r} fine-tune, not a LoRA "
                           f"adapter; use `mlxrl fuse` to write a model")
    if not (folder / ADAPTER_FILE).is_file():
        raise AdapterError(f"{folder / ADAPTER_FILE} not found")
    return config, mx.load(str(folder / ADAPTER_FILE))


def _base(name: str, revision: str | None = None) -> tuple[Path, dict]:
    path = local_model_path(name, revision)
    return path, _read_json(path / "config.json")


def _base_of(folder: Path, config: dict) -> tuple[str, Path, dict]:
    """(base name, base folder, its config.json) of the mlxrl adapter in `folder`."""
    ref = resolve(str(folder), _model_section(config).get("model_revision"))
    return ref.base_name, ref.base_path, _read_json(ref.base_path / "config.json")


def _base_linears(base_path: Path) -> dict[str, tuple[int, int]]:
    """Full path -> (out, in) of every linear module in the base's blocks (weights lazily)."""
    import mlx.nn as nn

    from mlxrl.mlx.model_config import load_model

    model, _ = load_model(base_path, lazy=True)
    dims = {}
    for name, module in model.named_modules():
        if LAYER_PATH.match(name) and isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            out, inp = module.weight.shape
            bits = getattr(module, "bits", None)
            dims[name] = (out, inp * 32 // bits if bits else inp)
    return dims


def _group(tensors: dict[str, mx.array], leaves: dict[str, str], where: str) -> dict[str, dict]:
    """{module path: {role: tensor}} for tensor names `<module>.<leaf>`; refuses any other name."""
    modules: dict[str, dict] = {}
    for name, value in tensors.items():
        leaf = next((lf for lf in leaves if name.endswith("." + lf)), None)
        module = name[: -len(leaf) - 1] if leaf else name
        if leaf is None or not LAYER_PATH.match(module):
            raise AdapterError(
                f"{where}: cannot convert tensor {name!r} exactly: only LoRA/DoRA tensors of "
                f"modules under model.layers.N are supported (expected <module>.{{{', '.join(leaves)}}})")
        modules.setdefault(module, {})[leaves[leaf]] = value
    return modules


def _check_modules(modules: dict[str, dict], linears: dict, rank: int, where: str,
                   refused: dict[str, str]) -> None:
    for module, parts in modules.items():
        if (why := refused.get(LAYER_PATH.match(module).group(2))) is not None:
            raise AdapterError(f"{where}: cannot convert {module}: {why}")
        if module not in linears:
            raise AdapterError(f"{where}: {module} is not a linear layer of the base model")
        if "A" not in parts or "B" not in parts:
            raise AdapterError(f"{where}: {module} lacks its A or B factor")
        out, inp = linears[module]
        want = {"A": (rank, inp), "B": (out, rank), "m": (out,)}
        for role, t in parts.items():
            if tuple(t.shape) != want[role]:
                raise AdapterError(f"{where}: {module} {role} has shape {tuple(t.shape)}, "
                                   f"expected {want[role]} for rank {rank} on the base model")


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, AdapterNote, stacklevel=3)


# --- export --------------------------------------------------------------------------------------

EXPORT_FILES = (PEFT_WEIGHTS, PEFT_CONFIG, "README.md", DEQUANTIZED_BASE)
IMPORT_FILES = (ADAPTER_FILE, ADAPTER_CONFIG)
FUSE_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
              "config.json", "README.md", *TOKENIZER_FILES)


def export_peft(checkpoint_dir, output_dir, overwrite: bool = False) -> Path:
    """Write the adapter in `checkpoint_dir` as a Hugging Face PEFT adapter into `output_dir`
    (which must be empty unless `overwrite`; written whole or not at all: `output_folder`)."""
    folder, out = Path(checkpoint_dir), Path(output_dir)
    config, tensors = _mlx_adapter(folder)
    params = config["lora_parameters"]
    dora = config.get("fine_tune_type") == "dora"
    if dora and params.get("dropout", 0.0) > 0:
        raise AdapterError(f"{folder}: DoRA with dropout > 0 trains differently in PEFT; "
                           "cannot export it exactly")
    mlxrl_block = config.get("mlxrl", {})
    base_name, base_path, hf_config = _base_of(folder, config)
    amap = arch_map(hf_config)
    leaves = {"lora_a": "A", "lora_b": "B", "m": "m"}
    modules = _group(tensors, leaves, str(folder / ADAPTER_FILE))
    # mlx-lm's factors are [in, r] and [r, out]: check them in PEFT's orientation.
    _check_modules({k: {r: (t.T if r != "m" else t) for r, t in v.items()}
                    for k, v in modules.items()}, _base_linears(base_path), params["rank"],
                   str(folder), amap.refused)
    peft = {}
    for module, parts in sorted(modules.items()):
        for key, value in to_hf(module, amap, parts["A"], parts["B"], parts.get("m")).items():
            peft[PREFIX + key] = value
    notes = amap.notes()
    with staged(out, overwrite, EXPORT_FILES, AdapterError) as tmp:
        base_for_peft = base_name
        if mlxrl_block.get("quantization") or "quantization" in hf_config:
            _write_fused(folder, tmp / DEQUANTIZED_BASE, with_adapter=False)
            base_for_peft = str((out / DEQUANTIZED_BASE).resolve())
        mx.save_safetensors(str(tmp / PEFT_WEIGHTS), peft, metadata={"format": "pt"})
        peft_config = _peft_config(params, dora, sorted(modules), base_for_peft)
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        _write_card(tmp, "adapter", base_name, base_for_peft, mlxrl_block, notes)
    _warn(notes)
    return out


def _model_section(config: dict) -> dict:
    return (config.get("mlxrl", {}).get("config") or {}).get("model") or {}


def _peft_config(params: dict, dora: bool, modules: list[str], base: str) -> dict:
    rank, alpha = params["rank"], params["scale"] * params["rank"]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": params.get("dropout", 0.0), "target_modules": modules,
        "use_dora": dora, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
        "inference_mode": True, "revision": None,
    }


# --- import --------------------------------------------------------------------------------------

# PEFT options whose adapters are not a plain rank-r, global-scale delta on linear layers.
_REFUSE_IF_SET = {
    "modules_to_save": "it trains full copies of modules (modules_to_save)",
    "target_parameters": "it adapts nn.Parameters directly (target_parameters)",
    "lora_bias": "it trains a bias on lora_B (lora_bias)",
    "trainable_token_indices": "it trains embedding rows (trainable_token_indices)",
    "layer_replication": "it duplicates layers (layer_replication)",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens)",
    "use_qalora": "it is a QA-LoRA adapter (use_qalora)",
    "fan_in_fan_out": "its weights are stored transposed for Conv1D layers (fan_in_fan_out)",
    "megatron_config": "it targets Megatron parallel layers (megatron_config)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def _check_peft_config(pcfg: dict, where: str) -> tuple[int, float, bool]:
    """(rank, mlx scale, dora) of a PEFT LoRA config, or the reason it cannot be converted."""
    def refuse(reason):
        raise AdapterError(f"{where}: cannot convert exactly: {reason}")

    if pcfg.get("peft_type") != "LORA":
        refuse(f"peft_type is {pcfg.get('peft_type')!r}; only LORA adapters convert")
    for key, reason in _REFUSE_IF_SET.items():
        if pcfg.get(key):
            refuse(reason)
    if pcfg.get("bias", "none") != "none":
        refuse(f"it trains biases (bias: {pcfg['bias']!r})")
    init = str(pcfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        refuse(f"init_lora_weights {init!r} changes the base weights")
    rank, alpha = pcfg.get("r", 8), pcfg.get("lora_alpha", 8)
    for key, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        if any(v != default for v in (pcfg.get(key) or {}).values()):
            refuse(f"{key} gives modules their own rank/alpha; mlx-lm has one global value")
    dora = bool(pcfg.get("use_dora"))
    if dora and pcfg.get("lora_dropout", 0.0) > 0:
        refuse("DoRA with lora_dropout > 0 trains differently in mlx-lm")
    scale = alpha / (rank ** 0.5 if pcfg.get("use_rslora") else rank)
    return rank, float(scale), dora


def import_peft(peft_dir, output_dir, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Convert the PEFT adapter in `peft_dir` to an mlxrl/mlx-lm adapter in `output_dir` (empty
    unless `overwrite`). Another architecture or shape than the adapter's is refused first."""
    folder, out = Path(peft_dir), Path(output_dir)
    pcfg = _read_json(folder / PEFT_CONFIG)
    rank, scale, dora = _check_peft_config(pcfg, str(folder / PEFT_CONFIG))
    weights = folder / PEFT_WEIGHTS
    check_adapter(folder)  # weights missing, truncated, or only a pickled adapter_model.bin
    base = base_model or pcfg.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{folder / PEFT_CONFIG} names no base model; pass --base MODEL")
    gguf_base = _gguf_base(base, None if base_model else pcfg.get("mlxrl"), str(folder / PEFT_CONFIG))
    base_path, hf_config = _base(base, None if base_model else pcfg.get("revision"))
    if base_model:
        _check_same_architecture(pcfg, hf_config, base_model, str(folder / PEFT_CONFIG))
    amap = arch_map(hf_config)
    tensors = mx.load(str(weights))
    if not tensors or any(not k.startswith(PREFIX) for k in tensors):
        raise AdapterError(f"{weights}: tensor names must start with {PREFIX!r}")
    leaves = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m",
              "lora_magnitude_vector.weight": "m"}
    modules = _group({k[len(PREFIX):]: v for k, v in tensors.items()}, leaves, str(weights))
    if dora != any("m" in parts for parts in modules.values()):
        raise AdapterError(f"{weights}: use_dora is {dora} but the magnitudes are "
                           f"{'missing' if dora else 'present'}")
    _check_modules(modules, _base_linears(base_path), rank, str(weights), amap.refused)
    mlx_tensors = {}
    for module, parts in sorted(modules.items()):
        mlx_tensors.update(from_hf(module, amap, parts["A"], parts["B"], parts.get("m")))
    layers = [int(LAYER_PATH.match(m).group(1)) for m in modules]
    keys = sorted({LAYER_PATH.match(m).group(2) for m in modules})
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": hf_config["num_hidden_layers"] - min(layers),
        "lora_parameters": {"rank": rank, "scale": scale,
                            "dropout": pcfg.get("lora_dropout", 0.0), "keys": keys},
        "model": base,
        "mlxrl": {"base_model": base, "method": "import",
                  "source": {"format": "peft", "path": str(folder), "config": pcfg},
                  **gguf_base},
    }
    with staged(out, overwrite, IMPORT_FILES, AdapterError) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), mlx_tensors, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _warn(amap.notes())
    return out


def _gguf_base(base: str, recorded_block: dict | None, where: str) -> dict:
    """`{"base_gguf": ...}` for a GGUF base: the file the adapter recorded (refused if `base` is
    now another file), or, for a base given with --base, that file; else {}."""
    from mlxrl.real_model import check_gguf_base, gguf_file, gguf_identity

    recorded = (recorded_block or {}).get("base_gguf")
    if recorded:
        check_gguf_base(recorded, base, where)
        return {"base_gguf": recorded}
    path = gguf_file(base)
    return {"base_gguf": gguf_identity(path)} if path is not None else {}


def _check_same_architecture(pcfg: dict, hf_config: dict, base_model: str, where: str) -> None:
    """`--base` of another architecture than the adapter's recorded base is refused (PEFT's
    tensor names fit many architectures); when that base is not here, only shapes are checked."""
    recorded = pcfg.get("base_model_name_or_path")
    if not recorded or recorded == base_model:
        return
    try:
        _, theirs = _base(recorded, pcfg.get("revision"))
    except MlxrlError:
        return
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size")
    differ = [f"{k} {theirs.get(k)} vs {hf_config.get(k)}" for k in keys if theirs.get(k) != hf_config.get(k)]
    if differ:
        raise AdapterError(f"{where}: the adapter was trained on {recorded}, and --base {base_model} "
                           f"is another model ({'; '.join(differ)}); pass the base it was trained on")


# --- fuse ----------------------------------------------------------------------------------------

def fuse(checkpoint_dir, output_dir, quantize: bool = False, overwrite: bool = False) -> Path:
    """Merge the adapter in `checkpoint_dir` into its base and write the model to `output_dir`.

    Dequantized, in Hugging Face layout, by default. `quantize=True` (quantized bases only) keeps
    mlx-lm's quantized layout: re-quantizing W + dW may erase small deltas (mlx-lm #1172) and
    transformers cannot load the result.
    """
    folder, out = Path(checkpoint_dir), Path(output_dir)
    config, _ = _mlx_adapter(folder)
    with staged(out, overwrite, FUSE_FILES, AdapterError) as tmp:
        if quantize:
            _write_quantized(folder, tmp)
        else:
            _write_fused(folder, tmp, with_adapter=True)
            base_name = _base_of(folder, config)[0]
            _write_card(tmp, "fused", base_name, base_name, config.get("mlxrl", {}), [])
    return out


def _mlx_model(folder: Path, with_adapter: bool):
    """The base as mlxrl trained on it (dtype, quantization), with the adapter loaded or not."""
    from mlx_lm.tuner.utils import load_adapters

    from mlxrl.mlx.model import cast, quantize_frozen
    from mlxrl.mlx.model_config import load_model

    config = _read_json(folder / ADAPTER_CONFIG)
    section = _model_section(config)
    base_name, base_path, hf_config = _base_of(folder, config)
    model, _ = load_model(base_path, trust_remote_code=bool(section.get("trust_remote_code")))
    cast(model, section.get("torch_dtype_str", "auto"))
    model.freeze()
    quant = config.get("mlxrl", {}).get("quantization")
    if quant:
        quantize_frozen(model, quant, base_name, hf_config.get("model_type"), new_run=False)
    if with_adapter:
        try:
            load_adapters(model, str(folder))
        except ValueError as e:
            raise AdapterError(f"{folder}: {e}") from None
    return model, base_path, hf_config, quant


def _merge(model, dequantize: bool) -> None:
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def _write_fused(folder: Path, out: Path, with_adapter: bool) -> Path:
    """The (fused or bare) dequantized model in Hugging Face names, layout and config."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    model, base_path, hf_config, _ = _mlx_model(folder, with_adapter)
    _merge(model, dequantize=True)
    dequantize_model(model)
    amap = arch_map(hf_config)
    weights = amap.hf_weights(dict(tree_flatten(model.parameters())))
    config = amap.hf_config({k: v for k, v in hf_config.items()
                             if k not in ("quantization", "quantization_config")})
    dtype = str(next(iter(weights.values())).dtype).split(".")[-1]
    config["torch_dtype"] = config["dtype"] = dtype
    _save_weights(out, weights, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(base_path, out)
    return out


def _write_quantized(folder: Path, out: Path) -> Path:
    from mlx.utils import tree_flatten

    model, base_path, hf_config, quant = _mlx_model(folder, with_adapter=True)
    quant = quant or hf_config.get("quantization")
    if not quant:
        raise AdapterError(f"{folder}: the base is not quantized, so there is nothing to keep "
                           "quantized; fuse without --quantize (or quantize the fused model "
                           "with mlx_lm.convert -q)")
    _merge(model, dequantize=False)
    quant = _mlx_lm_quantization(model, quant)
    config = dict(hf_config, quantization=quant, quantization_config=quant)
    _save_weights(out, dict(tree_flatten(model.parameters())), {"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(base_path, out)
    adapter_config = _read_json(folder / ADAPTER_CONFIG)
    base_name = _base_of(folder, adapter_config)[0]
    note = ("MLX-quantized merged model for mlx-lm: transformers cannot load it, and "
            "re-quantizing W + dW may erase small adapter deltas (mlx-lm #1172)")
    _write_card(out, "mlx", base_name, base_name, adapter_config.get("mlxrl", {}), [note])
    return out


def _mlx_lm_quantization(model, quant: dict) -> dict:
    """mlx-lm's `quantization` config: the common group size and bits, plus each layer that
    differs (a GGUF base may mix Q4 and Q8 layers)."""
    import mlx.nn as nn

    common = (quant["group_size"], quant["bits"])
    config = {"group_size": common[0], "bits": common[1]}
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear) and (module.group_size, module.bits) != common:
            config[name] = {"group_size": module.group_size, "bits": module.bits}
    return config


def _save_weights(out: Path, weights: dict[str, mx.array], metadata: dict) -> None:
    from mlx_lm.utils import make_shards

    out.mkdir(parents=True, exist_ok=True)
    shards = make_shards(weights)
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_tokenizer(base_path: Path, out: Path) -> None:
    for pattern in TOKENIZER_FILES:
        for path in base_path.glob(pattern):
            if path.is_file():
                shutil.copy(path, out / path.name)


def _write_card(out: Path, kind: str, base_name: str, load_base: str, mlxrl_block: dict,
                notes: list[str]) -> None:
    (out / "README.md").write_text(model_card(kind, base_name, load_base, mlxrl_block, notes))
