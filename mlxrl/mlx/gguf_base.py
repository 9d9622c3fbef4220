"""QLoRA on a GGUF base: the file's own Q4_0 / Q4_1 / Q8_0 weights as MLX quantized layers.

    quantize_from_gguf(model, gguf_path, model_type, bits_wanted) -> {"source": "gguf", ...} | None

The model is first loaded as usual from the float32 folder transformers converted the file to
(`mlxrl.real_model`: config, tokenizer, norms, embeddings, biases). Then each linear layer whose
GGUF tensor is Q4_0, Q4_1 or Q8_0 is replaced by an `nn.QuantizedLinear` holding that tensor as
`mx.load` returns it: MLX reads these three block types as its own affine quantization (group
size 32; 4 bits for Q4_0 / Q4_1, 8 for Q8_0; w = scale * q + bias per group), so the frozen base
is the weights the user runs in llama.cpp, not MLX's re-quantization of their dequantized copy.

- Tensor names: llama.cpp's (`mlxrl.gguf_model.tensor_name`, the `gguf` package's table).
- llama files store q/k rows in llama.cpp's interleaved RoPE order; the rows go back to Hugging
  Face's rotate-half order (`gguf_model.unpermute_rope_rows`), the packed words, scales and
  biases of a row alike (a group never spans two rows).
- Scales and biases arrive as float16; they take the layer's dtype (float32 for a GGUF base
  unless model.torch_dtype_str says otherwise: the dequantized weight is then llama.cpp's
  exactly; bfloat16 rounds the scales, as MLX's own quantization of a bfloat16 model would).
- A linear stored in float (F32 / F16) stays the float layer it is; one whose scales do not fit
  float16 is left dequantized, with a note.
- A file `mx.load` cannot read (K-quants, Q5_x, IQ types) or another architecture than llama,
  qwen2, qwen3 gives None after one note line; the caller then quantizes the dequantized weights
  with MLX's own grouping, as for any float base.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxrl.gguf_model import ARCHS, GgufError, tensor_name, unpermute_rope_rows

logger = logging.getLogger(__name__)

SOURCE = "gguf"  # the `source` of an adapter's recorded quantization read from the file
MLX_READS = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32")  # what mx.load reads from a GGUF file


def quantize_from_gguf(model: nn.Module, path: Path, model_type: str, bits_wanted: int) -> dict | None:
    """Replace `model`'s linear layers by the GGUF file's quantized tensors; returns the
    quantization to record (`source`, and the group size and bits of most layers), or None after
    a note when the file cannot give them (the caller quantizes with MLX then)."""
    fallback = f"the base is quantized from its dequantized weights with MLX's own {bits_wanted}-bit grouping"
    if model_type not in ARCHS:
        logger.warning(f"note: peft.q_lora: mlxrl reads the quantized tensors of {', '.join(ARCHS)} "
                       f"GGUF files, not {model_type}; {fallback}")
        return None
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError):
        logger.warning(f"note: peft.q_lora: MLX cannot read {path.name} (it holds "
                       f"{', '.join(_unreadable_types(path))} tensors; MLX reads "
                       f"{', '.join(MLX_READS)}); {fallback}")
        return None
    heads = _rope_heads(metadata) if model_type == "llama" else {}
    config = {"num_hidden_layers": len(model.layers)}
    replaced, dequantized = [], []
    for name, linear in _linears(model):
        gguf_name = tensor_name(model_type, config, f"{name}.weight").removesuffix(".weight")
        if f"{gguf_name}.scales" not in tensors:
            continue  # stored in float: the converted folder's weight is the file's
        layer = _quantized_linear(linear, tensors, gguf_name, heads.get(name.rsplit(".", 1)[-1]))
        if layer is None:
            dequantized.append(gguf_name)
        else:
            replaced.append((name, layer))
    if dequantized:
        logger.warning(f"note: peft.q_lora: {len(dequantized)} tensors of {path.name} "
                       f"({', '.join(dequantized[:3])}{' ...' if len(dequantized) > 3 else ''}) have "
                       f"scales MLX cannot hold in float16; they stay dequantized (float)")
    if not replaced:
        return None  # a float file: QLoRA quantizes it as any float base
    model.update_modules(tree_unflatten(replaced))
    model.freeze()
    return _recorded(path, [layer for _, layer in replaced], bits_wanted)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _rope_heads(metadata: dict) -> dict[str, int]:
    """Heads of the q and k projections, from the file's own metadata (llama.cpp's keys)."""
    n_heads = int(metadata["llama.attention.head_count"])
    n_kv = int(metadata.get("llama.attention.head_count_kv", n_heads))
    return {"q_proj": n_heads, "k_proj": n_kv}


def _quantized_linear(linear: nn.Linear, tensors: dict, gguf_name: str,
                      rope_heads: int | None) -> nn.QuantizedLinear | None:
    weight, scales, biases = (tensors[f"{gguf_name}.{k}"] for k in ("weight", "scales", "biases"))
    out_dims, in_dims = linear.weight.shape
    if weight.shape[0] != out_dims or in_dims % scales.shape[1]:
        raise GgufError(f"GGUF tensor {gguf_name} {tuple(weight.shape)} does not fit the model's "
                        f"layer [{out_dims}, {in_dims}]")
    if not (mx.isfinite(scales).all() and mx.isfinite(biases).all()).item():
        return None
    if rope_heads is not None:
        weight, scales, biases = (unpermute_rope_rows(t, rope_heads) for t in (weight, scales, biases))
    group_size, bits = in_dims // scales.shape[1], weight.shape[1] * 32 // in_dims
    layer = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in linear, group_size=group_size, bits=bits)
    dtype = linear.weight.dtype
    layer.weight, layer.scales, layer.biases = weight, scales.astype(dtype), biases.astype(dtype)
    if "bias" in linear:
        layer.bias = linear.bias
    return layer


def _recorded(path: Path, layers: list[nn.QuantizedLinear], bits_wanted: int) -> dict:
    kinds: dict[tuple[int, int], int] = {}
    for layer in layers:
        kinds[(layer.group_size, layer.bits)] = kinds.get((layer.group_size, layer.bits), 0) + 1
    group_size, bits = max(kinds, key=kinds.get)
    logger.info(f"QLoRA base: {len(layers)} linear layers keep {path.name}'s own quantization "
                f"({', '.join(f'{n} at {b} bits' for (_, b), n in sorted(kinds.items()))})")
    if bits != bits_wanted:
        logger.warning(f"note: peft.q_lora_bits={bits_wanted}: a GGUF base trains on the file's own "
                       f"{bits}-bit weights")
    return {"source": SOURCE, "group_size": group_size, "bits": bits}


def _unreadable_types(path: Path) -> list[str]:
    import gguf

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    return sorted(kinds - set(MLX_READS)) or sorted(kinds)
