"""Models on PyTorch: the base and tokenizer through transformers, and the LoRA target modules.

- A model name is what `mlxrl.model_names.resolve` reads (a hub id, a local Hugging Face folder,
  `tiny://<arch>`, an adapter folder). A PEFT adapter folder (a torch-backend checkpoint): its
  base is loaded and the adapter trained further. An MLX adapter folder is refused with the
  command that converts it.
- LoRA targets are computed from the model as on MLX: by default every linear layer inside the
  transformer blocks (except Mamba's out_proj); named targets match the last part of a module's
  name (`q_proj`).
- A GGUF base (`x.gguf`, `gguf://smollm2`) loads from its converted folder; the adapters saved on
  it name the GGUF and record the file (`base_gguf` {path, sha256}), as on MLX (`adapter_fields`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlxrl import model_names
from mlxrl.chat_templates import configure_tokenizer
from mlxrl.errors import ModelError
from mlxrl.integrity import check_adapter, check_tokenizer
from mlxrl.lora_targets import select_lora_targets
from mlxrl.model_names import ModelRef

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    base_name: str  # what the user named (hub id or path), recorded in the adapter config
    peft_dir: Path | None = None  # a PEFT adapter to continue training
    adapter_fields: dict = field(default_factory=dict)  # added to every adapter_config.json saved


def gguf_adapter_fields(ref: ModelRef) -> dict:
    """For a GGUF base: the adapter names the GGUF (not its converted folder in the cache) and
    records the file, so that infer, export and fuse find it and refuse another file."""
    from mlxrl.real_model import gguf_file, gguf_identity

    path = gguf_file(ref.base_name)
    if path is None:
        return {}
    return {"base_model_name_or_path": ref.base_name, "mlxrl": {"base_gguf": gguf_identity(path)}}


def resolve(name: str, revision: str | None = None) -> ModelRef:
    """`mlxrl.model_names.resolve`, with the adapters torch can load: PEFT ones."""
    ref = model_names.resolve(name, revision)
    if ref.adapter_format == "mlx":
        raise ModelError(f"{ref.adapter_path} holds an MLX adapter; convert it for the torch backend "
                         f"with `mlxrl export {ref.adapter_path} --format peft --output DIR` and name DIR")
    if ref.adapter_path is not None:
        check_adapter(ref.adapter_path)  # and adapter_model.bin (a pickle) is refused before peft could load it
    return ref


def load_tokenizer(model_params, base: str):
    from transformers import AutoTokenizer

    kwargs = dict(model_params.tokenizer_kwargs or {})
    source = model_params.tokenizer_name or base
    check_tokenizer(Path(source).expanduser(), "" if model_params.tokenizer_name else
                    ", or set model.tokenizer_name to a folder or hub id that has them")
    try:
        tok = AutoTokenizer.from_pretrained(model_params.tokenizer_name or base,
                                            trust_remote_code=model_params.trust_remote_code,
                                            revision=model_params.model_revision, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {base}: {_first_line(e)}") from None
    configure_tokenizer(tok, model_params, base)
    return tok


def load(cfg, quantization=None) -> Loaded:
    """Base model (fp32/bf16/fp16 per model.torch_dtype_str; 4/8-bit with `quantization`)."""
    from transformers import AutoModelForCausalLM

    mp = cfg.model
    ref = resolve(mp.model_name, mp.model_revision)
    if not cfg.training.use_peft:
        model_names.refuse_adapter_for_full_finetune(ref)
    base, peft_dir = str(ref.base_path), ref.adapter_path
    tokenizer = load_tokenizer(mp, base)
    kwargs = {**(cfg.training.grpo.model_init_kwargs or {}), **(mp.model_kwargs or {})}
    kwargs["dtype"] = "auto" if mp.torch_dtype_str == "auto" else DTYPES[mp.torch_dtype_str]
    if mp.attn_implementation:
        kwargs["attn_implementation"] = mp.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        if mp.load_pretrained_weights:
            model = AutoModelForCausalLM.from_pretrained(
                base, trust_remote_code=mp.trust_remote_code, revision=mp.model_revision, **kwargs)
        else:
            model = _untrained(base, mp, kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {base!r}: {_first_line(e)} "
                         f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from None
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir), is_trainable=True)
    return Loaded(model, tokenizer, mp.model_name if peft_dir is None else base, peft_dir,
                  gguf_adapter_fields(ref))


def _untrained(base: str, mp, kwargs: dict):
    """`model.load_pretrained_weights: false`: the architecture with transformers' own init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=mp.trust_remote_code,
                                        revision=mp.model_revision)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
    if kwargs.get("dtype") == "auto":
        kwargs["dtype"] = getattr(config, "dtype", None) or torch.float32
    return AutoModelForCausalLM.from_config(config, trust_remote_code=mp.trust_remote_code, **kwargs)


def freeze_layers(model: nn.Module, names: list[str]) -> tuple[int, list[str]]:
    """`model.freeze_layers` (Oumi's): no parameter under these module paths trains, adapters
    included. Returns (parameters frozen, names not found in the model)."""
    frozen, found = 0, set()
    for full_name, param in model.named_parameters():
        name = full_name.removeprefix("base_model.model.")
        for layer in names:
            if name.startswith(layer + "."):
                found.add(layer)
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += param.numel()
    return frozen, [n for n in names if n not in found]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(prefix, block) for each transformer block: the children of the model's `layers` list."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("layers", "h", "blocks") and isinstance(module, nn.ModuleList):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}")


def block_linear_names(model: nn.Module) -> list[str]:
    """Block-relative names of the linear layers in the transformer blocks (as mlx-lm's)."""
    names = set()
    for _, block in _blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__.startswith("Linear"):
                names.add(name)
    return sorted(n for n in names if n)


def lora_targets(model: nn.Module, peft_params) -> list[str]:
    """PEFT `target_modules`: block-relative names, which PEFT matches as name suffixes."""
    return select_lora_targets(block_linear_names(model), peft_params)


def device_kind() -> str:
    """'cuda', 'mps' or 'cpu': where TRL's Trainer will place the model."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
