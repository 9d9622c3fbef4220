"""Models on MLX: load through mlx-lm, add LoRA / DoRA / QLoRA, switch adapters off, save.

- A model name is what `mlxrl.model_names.resolve` reads: a hub id, a local Hugging Face folder,
  `tiny://...`, or an adapter folder (an mlxrl checkpoint, or a PEFT adapter such as a torch
  checkpoint, converted once), in which case base and adapter load together.
- QLoRA on MLX: the frozen base's linear layers are quantized with MLX's own affine
  quantization (no bitsandbytes); the adapter trains against the dequantized weights. A GGUF
  base keeps the file's own Q4_0 / Q4_1 / Q8_0 tensors instead (`mlxrl/mlx/gguf_base.py`).
- The DPO/GRPO reference policy is the same model with its adapter layers switched off, i.e. the
  base layers alone, as PEFT's `disable_adapter()` gives it (`adapters_disabled`), never a
  second copy.
- Full fine-tuning (`training.use_peft: false`, `load(..., full=True)`): no adapter, every weight
  trainable; its files and references are in `mlxrl/mlx/full_model.py`.
- Adapters are saved in mlx-lm's format, so `mlx_lm.load(base, adapter_path=...)` and
  `mlx_lm.fuse` work on them; mlxrl's own fields sit under the `mlxrl` key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxrl.cache import cache_dir
from mlxrl.chat_templates import configure_tokenizer
from mlxrl.errors import ModelError
from mlxrl.integrity import check_adapter, check_tokenizer
from mlxrl.lora_targets import select_lora_targets
from mlxrl.mlx.cpu_ops import DECODE_WEIGHT, decode_linear, use_cpu_ops
from mlxrl.mlx.model_config import load_model
from mlxrl.model_names import (
    ADAPTER_CONFIG,
    ModelRef,
    local_model_path,
    refuse_adapter_for_full_finetune,
    resolve,
)

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapters.safetensors"
DTYPES = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16,
          "half": mx.float16, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}
QUANT_GROUP_SIZE = 64


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    base_path: Path  # local folder of the base model
    base_name: str  # what the user named (hub id or path), recorded in checkpoints
    adapter_path: Path | None = None
    quantization: dict | None = None  # of the frozen base (QLoRA), as recorded in the adapter
    lora: dict | None = None  # mlx-lm adapter config of the LoRA layers, when there are any

    @property
    def quantized(self) -> bool:
        return self.quantization is not None


def mlx_adapter(ref: ModelRef) -> ModelRef:
    """`ref` with an adapter MLX can load: a PEFT adapter (a `--backend torch` checkpoint) is
    converted once into the cache (`mlxrl import`'s conversion), keyed by its folder and weights.
    A damaged or pickled adapter is refused first, from its bytes."""
    if ref.adapter_path is not None:
        check_adapter(ref.adapter_path)
    if ref.adapter_format != "peft":
        return ref
    import hashlib

    from mlxrl.adapters import import_peft

    weights = ref.adapter_path / "adapter_model.safetensors"
    stamp = f"{ref.adapter_path.resolve()}:{weights.stat().st_mtime_ns if weights.is_file() else 0}"
    out = cache_dir() / "imported" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if not (out / ADAPTER_FILE).is_file():
        import_peft(ref.adapter_path, out, overwrite=True)
    return dataclasses.replace(ref, adapter_path=out, adapter_format="mlx",
                               adapter_config=json.loads((out / ADAPTER_CONFIG).read_text()))


def load(model_params, peft_params=None, *, for_training: bool = False, gradient_checkpointing=False,
         full: bool = False):
    """Load the model named in `model_params` (hub id, folder or checkpoint) with mlx-lm.

    With `for_training` and a `peft_params`, the base is frozen (and quantized for q_lora) and
    fresh LoRA layers are added, unless the name is a checkpoint, whose adapter is loaded and
    left trainable (continue training from it). With `full` (training.use_peft: false) every
    weight is left trainable and no adapter is added.
    """
    from mlx_lm.utils import load_tokenizer

    ref = resolve(model_params.model_name, model_params.model_revision)
    if full:
        refuse_adapter_for_full_finetune(ref)
    ref = mlx_adapter(ref)
    base_name, base_path, adapter_path = ref.base_name, ref.base_path, ref.adapter_path
    with_adapter = f" with the adapter in {adapter_path}" if adapter_path is not None else ""
    logger.info(f"loading {base_name}{with_adapter}")
    saved = ref.adapter_config or {}
    try:
        if model_params.load_pretrained_weights:
            model, config = load_model(base_path, trust_remote_code=model_params.trust_remote_code)
        else:
            model, config = _load_untrained(base_path, model_params.trust_remote_code)
    except ValueError as e:
        raise ModelError(f"cannot load {base_path}: {e}") from None
    use_cpu_ops(model)
    tokenizer_path = base_path
    if model_params.tokenizer_name:
        tokenizer_path = local_model_path(model_params.tokenizer_name, model_params.model_revision)
    check_tokenizer(tokenizer_path, "" if model_params.tokenizer_name else
                    ", or set model.tokenizer_name to a folder or hub id that has them")
    tokenizer = load_tokenizer(tokenizer_path, tokenizer_config_extra=model_params.tokenizer_kwargs or None,
                               eos_token_ids=config.get("eos_token_id"))
    configure_tokenizer(tokenizer._tokenizer, model_params, base_name)
    cast(model, model_params.torch_dtype_str)
    model.freeze()
    if full:
        _unfreeze_all(model, base_name)
    quant = saved.get("mlxrl", {}).get("quantization")
    new_qlora = quant is None and for_training and peft_params is not None and peft_params.q_lora
    if new_qlora:
        quant = {"group_size": QUANT_GROUP_SIZE, "bits": peft_params.q_lora_bits}
    if quant:
        quant = quantize_frozen(model, quant, base_name, config.get("model_type"), new_qlora)
    lora = None
    if adapter_path is not None:
        lora = {k: v for k, v in saved.items() if k != "mlxrl"}
        add_lora(model, lora)
        model.load_weights(str(adapter_path / ADAPTER_FILE), strict=False)
    elif for_training and peft_params is not None:
        lora = lora_config(model, peft_params)
        add_lora(model, lora)
    if gradient_checkpointing:
        checkpoint_blocks(model)
    mx.eval(model.parameters())
    model.train(for_training)
    return LoadedModel(model, tokenizer, base_path, base_name, adapter_path, quant or None, lora)




def _unfreeze_all(model: nn.Module, name: str) -> None:
    """Full fine-tuning: every weight trains. A model stored quantized (an mlx-community 4-bit
    folder) keeps its quantized weights frozen in MLX, so it is refused rather than trained in part."""
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ModelError(f"{name} is stored quantized, and training.use_peft: false trains every "
                         f"weight in float: use the float model, or LoRA (training.use_peft: true)")
    model.unfreeze()


def _load_untrained(base_path: Path, trust_remote_code: bool):
    """The architecture of `base_path` with fresh weights (`model.load_pretrained_weights: false`):
    mlx-lm builds it from a folder holding only the config (and custom code), so no weight file
    is read."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for file in base_path.iterdir():
            if file.suffix in (".json", ".py") and not file.name.startswith("model"):
                (Path(tmp) / file.name).symlink_to(file.resolve())
        try:
            model, config = load_model(Path(tmp), strict=False, trust_remote_code=trust_remote_code)
        except KeyError as e:  # a `sanitize` that rewrites weights it expects to find
            raise ModelError(f"model.load_pretrained_weights: false is not supported for "
                             f"{base_path.name} on MLX (mlx-lm needs its weight {e}); "
                             f"use --backend torch") from None
    init_weights(model, config)
    return model, config


def init_weights(model: nn.Module, config: dict) -> None:
    """`load_pretrained_weights: false`: fresh weights drawn as transformers' `from_config` does
    for the transformer parts: linear and embedding weights N(0, initializer_range), biases 0,
    norm scales 1. Other parameters (an SSM's A_log, D, convolutions) keep mlx-lm's initial values.
    Uses MLX's global RNG, seeded by `train()` from training.seed."""
    std = float(config.get("initializer_range", 0.02))
    for _, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight = mx.random.normal(module.weight.shape) * std
            if "bias" in module:
                module.bias = mx.zeros_like(module.bias)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            if "weight" in module:
                module.weight = mx.ones_like(module.weight)
            if "bias" in module:
                module.bias = mx.zeros_like(module.bias)
    mx.eval(model.parameters())


def cast(model: nn.Module, dtype_name: str) -> None:
    """Cast floating-point weights to the configured dtype ('auto' keeps the checkpoint's)."""
    if dtype_name == "auto":
        return
    dtype = DTYPES[dtype_name]
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)


def quantize_frozen(model: nn.Module, quant: dict, base_name: str, model_type: str | None,
                    new_run: bool) -> dict:
    """QLoRA's frozen base; returns the quantization to record in the adapter. A GGUF base keeps
    the file's own quantized tensors (a new run tries, an adapter trained so requires them);
    any other base, or a GGUF file MLX cannot read so, gets MLX's own affine quantization."""
    from mlxrl.mlx.gguf_base import SOURCE, quantize_from_gguf
    from mlxrl.real_model import gguf_file

    if new_run or quant.get("source") == SOURCE:
        path = gguf_file(base_name)
        recorded = path and quantize_from_gguf(model, path, model_type, quant["bits"])
        if recorded:
            return recorded
        if quant.get("source") == SOURCE:
            raise ModelError(f"the adapter was trained on the quantized tensors of the GGUF file "
                             f"{base_name!r}, which MLX cannot read from {path}; give it that file")
    logger.info(f"quantizing the base to {quant['bits']} bits (QLoRA)")
    quantize_base(model, quant["group_size"], quant["bits"])
    return {"group_size": quant["group_size"], "bits": quant["bits"]}


def quantize_base(model: nn.Module, group_size: int, bits: int) -> None:
    """QLoRA's frozen base: MLX affine quantization of every linear layer whose shape allows it."""
    def eligible(_path, module):
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=eligible)
    model.freeze()


def block_linear_names(model: nn.Module) -> list[str]:
    """Layer-relative names of the linear modules in the transformer blocks."""
    names = set()
    for layer in model.layers:
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                names.add(name)
    return sorted(names)


def lora_config(model: nn.Module, peft_params) -> dict:
    """mlx-lm's adapter_config for the `peft` section (scale = alpha / r)."""
    keys = select_lora_targets(block_linear_names(model), peft_params)
    if peft_params.use_dora and peft_params.lora_dropout > 0:
        raise ModelError("DoRA with lora_dropout > 0 is not supported (dropout semantics differ "
                         "from PEFT's); set peft.lora_dropout: 0")
    return {
        "fine_tune_type": "dora" if peft_params.use_dora else "lora",
        "num_layers": len(model.layers),
        "lora_parameters": {"rank": peft_params.lora_r, "scale": peft_params.lora_scale,
                            "dropout": peft_params.lora_dropout, "keys": keys},
    }


def add_lora(model: nn.Module, adapter_config: dict) -> None:
    """mlx-lm's LoRA / DoRA layers, each made switchable (`adapters_disabled`) once, here."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    params = adapter_config["lora_parameters"]
    linear_to_lora_layers(model, adapter_config.get("num_layers", len(model.layers)), params,
                          use_dora=adapter_config.get("fine_tune_type") == "dora")
    for layer in lora_layers(model):
        if "linear" in layer and not isinstance(layer, AdapterSwitch):
            layer.__class__ = _switchable(type(layer))


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


class AdapterSwitch:
    """Mixed into the LoRA / DoRA linear layers mlxrl adds (torchtune's `disabled` flag): with
    `adapter_enabled` False the layer is its base layer alone, as PEFT's `disable_adapter()`
    gives it (no adapter matmuls, and no DoRA magnitude, which a LoRA scale of 0 would keep)."""

    adapter_enabled = True

    def __call__(self, x):
        if DECODE_WEIGHT in self:  # set by the sampler, adapter folded in (cpu_ops.py)
            return decode_linear(self, x)
        if not self.adapter_enabled:
            return self.linear(x)
        if isinstance(self, _lora_linear_class()):
            return lora_linear(self, x)
        return super().__call__(x)  # DoRA, mixture-of-experts LoRA


@functools.cache
def _lora_linear_class() -> type:
    # imported here: mlx_lm.tuner imports transformers (~4 s), which `import mlxrl.mlx.model`
    # must not pay (it is paid when adapters are added, in `add_lora`)
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear


def lora_linear(layer, x):
    """mlx-lm's LoRALinear output, `y + (scale * (dropout(x) @ A) @ B)`, with the adapter's
    product added by the matmul itself (`mx.addmm`: the GEMM accumulates into y) when all is
    float32: no [tokens, out] array for the product and no separate add, forward or backward
    (GRPO's 25M update on 2 threads, two interleaved A/Bs: ~5% less; DPO's step and one thread:
    within noise). Other dtypes keep mlx-lm's cast of the product to x's dtype.

    The adapter's products run on `[tokens, features]`: with x `[B, L, D]`, A's gradient would
    be B matmuls and a sum over B copies of A (T of them for packed rows, `shared_prefix`)."""
    y = layer.linear(x)
    shape = y.shape
    z = layer.dropout(x.reshape(-1, x.shape[-1])) @ layer.lora_a
    if y.dtype == z.dtype == layer.lora_b.dtype == mx.float32:
        return mx.addmm(y.reshape(-1, shape[-1]), z, layer.lora_b, alpha=layer.scale).reshape(shape)
    return y + (layer.scale * (z @ layer.lora_b)).astype(x.dtype).reshape(shape)


@functools.cache
def _switchable(cls: type) -> type:
    return type(cls.__name__, (AdapterSwitch, cls), {"__module__": __name__})


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The reference policy: the base model, as PEFT's `disable_adapter()` gives it, restored on
    exit. mlxrl's adapter layers read their `adapter_enabled` flag; an mlx-lm LoRA layer that
    mlxrl did not add gets scale 0 (the same output), a DoRA one is refused (its magnitude
    would stay).

    Do not call a function compiled with the adapters on inside this context: `mx.compile`
    keeps the trace it made with them on.
    """
    layers = lora_layers(model)
    foreign = [m for m in layers if not isinstance(m, AdapterSwitch)]
    if any("m" in m for m in foreign):
        raise ValueError("adapters_disabled: a DoRA layer that mlxrl did not add (load the model "
                         "with mlxrl.mlx.model.load, or add its adapters with add_lora)")
    saved = [(m, m.scale) for m in foreign]
    for m in layers:
        if isinstance(m, AdapterSwitch):
            m.adapter_enabled = False
        else:
            m.scale = 0.0
    try:
        yield model
    finally:
        for m in layers:
            if isinstance(m, AdapterSwitch):
                m.adapter_enabled = True
        for m, scale in saved:
            m.scale = scale


class GradientCheckpoint:
    """Mixed into a transformer block class for the blocks of one model (mlx-lm's
    `grad_checkpoint` patches the class itself, so every model of that class in the process):
    while `grad_checkpoint` is set, the block's activations are recomputed in the backward pass."""

    grad_checkpoint = True

    def __call__(self, *args, **kwargs):
        if not self.grad_checkpoint:
            return super().__call__(*args, **kwargs)
        block_call = super().__call__

        def inner(params, *a, **kw):
            self.update(params)
            return block_call(*a, **kw)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)


@functools.cache
def _checkpointed(cls: type) -> type:
    return type(cls.__name__, (GradientCheckpoint, cls), {"__module__": __name__})


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing for this model's blocks (once, at load)."""
    for layer in model.layers:
        if not isinstance(layer, GradientCheckpoint):
            layer.__class__ = _checkpointed(type(layer))


def freeze_layers(model: nn.Module, names: list[str]) -> list[str]:
    """`model.freeze_layers` (Oumi's): nothing under these module paths (`model.layers.0`,
    Hugging Face names, which mlx-lm keeps) trains, adapters included. Returns the names not found."""
    modules = dict(model.named_modules())
    for name in names:
        if name in modules:
            modules[name].freeze()
    return [n for n in names if n not in modules]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config_for(loaded: LoadedModel, extra: dict | None = None) -> dict:
    """mlx-lm's adapter_config.json plus an `mlxrl` block naming the base model."""
    config = dict(loaded.lora)
    config["model"] = loaded.base_name
    mlxrl_block = {"base_model": loaded.base_name}
    from mlxrl.real_model import gguf_file, gguf_identity

    source = gguf_file(loaded.base_name)
    if source is not None:  # the exact file: infer, export and fuse refuse another one
        mlxrl_block["base_gguf"] = gguf_identity(source)
    if loaded.quantized:
        mlxrl_block["quantization"] = loaded.quantization
    mlxrl_block.update(extra or {})
    config["mlxrl"] = mlxrl_block
    return config


def save_adapter(model: nn.Module, folder: Path, adapter_config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json into `folder` (which must exist)."""
    mx.save_safetensors(str(folder / ADAPTER_FILE), adapter_weights(model), metadata={"format": "mlx"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counted as the model's own numbers: a quantized layer's
    packed words count as the weights they hold (32 / bits each), and its quantization scales
    and biases are not parameters of the model (as `transformers`' `num_parameters` counts the
    unquantized model)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    packed = {name: module.bits for name, module in model.named_modules()
              if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    total = 0
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner not in packed:
            total += value.size
        elif leaf == "weight":
            total += value.size * 32 // packed[owner]
        elif leaf == "bias":
            total += value.size
    return trainable, total
