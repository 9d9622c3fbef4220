"""Per architecture: where mlx-lm's weights differ from transformers', for adapters and fuse.

A LoRA delta lives in the space of the weights the MLX model computes with. For qwen2, qwen3 and
llama those are the checkpoint's weights under the same names, so the mapping is a rename and a
transpose. falcon_h1 is the trap: transformers multiplies some module outputs by µP multipliers at
runtime, while mlx-lm folds multipliers into the weights when it loads them (`sanitize`). A module
whose output transformers multiplies by `f` must get `lora_B = lora_b.T / f` (row-wise for
`mamba.in_proj`, where `f = ssm_in_multiplier * mup_vector`), a DoRA magnitude `m / |f|`, and a
fused weight or bias `W / f`; then transformers computes exactly what MLX computed.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlxrl.errors import MlxrlError, MlxrlNote

SUPPORTED = ("qwen2", "qwen3", "llama", "falcon_h1")
LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class AdapterError(MlxrlError):
    """An adapter or model that cannot be converted exactly, or a failed export/import/upload."""


class AdapterNote(MlxrlNote):
    """Something the user should know about a conversion that still went through."""


class ArchMap:
    """Architectures whose mlx-lm weights are transformers' weights under the same names."""

    refused: dict[str, str] = {}  # layer-relative module -> why its adapter cannot be converted

    def __init__(self, config: dict):
        self.config = config

    def factor(self, module: str):
        """transformers' runtime multiplier of `module`'s output (layer-relative name): a float or
        an [out] array."""
        return 1.0

    def notes(self) -> list[str]:
        """Why MLX and transformers logits may differ even for the base model."""
        return []

    def hf_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """mlx-lm's in-memory weights -> the tensors transformers expects."""
        return weights

    def hf_config(self, config: dict) -> dict:
        return config


class FalconH1Map(ArchMap):
    """µP multipliers: transformers applies them at runtime, mlx-lm folds them into weights."""

    refused = {"mamba.out_proj": (
        "PEFT refuses LoRA on a Mamba out_proj (transformers' fused Mamba kernels read "
        "out_proj.weight directly, bypassing the adapter); train without it, e.g. "
        "peft.lora_exclude_modules: [out_proj]")}
    CONFIG_MULTIPLIERS = ("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier",
                          "attention_out_multiplier", "key_multiplier", "ssm_in_multiplier",
                          "ssm_out_multiplier", "mlp_multipliers", "ssm_multipliers")

    def __init__(self, config: dict):
        from mlx_lm.models.falcon_h1 import ModelArgs, compute_mup_vector

        super().__init__(config)
        # mlx-lm's defaults fill keys the config leaves out: they are what it folded.
        self.args = a = ModelArgs.from_dict(config)
        self.factors = {
            "self_attn.q_proj": a.attention_in_multiplier,
            "self_attn.k_proj": a.attention_in_multiplier * a.key_multiplier,
            "self_attn.v_proj": a.attention_in_multiplier,
            "self_attn.o_proj": a.attention_out_multiplier,
            "mamba.in_proj": a.ssm_in_multiplier * compute_mup_vector(a),
            "mamba.out_proj": a.ssm_out_multiplier,
            "feed_forward.gate_proj": a.mlp_multipliers[0],
            "feed_forward.down_proj": a.mlp_multipliers[1],
        }

    def factor(self, module: str):
        return self.factors.get(module, 1.0)

    def notes(self) -> list[str]:
        a, notes = self.args, []
        if a.key_multiplier != 1.0 or a.attention_in_multiplier != 1.0:
            notes.append(
                f"falcon_h1: mlx-lm does not fold key_multiplier ({a.key_multiplier}) and folds "
                f"attention_in_multiplier ({a.attention_in_multiplier}) into q/k but not v, unlike "
                "transformers; unless the MLX weights were converted with them folded, the base "
                "models already differ (the adapter's delta is still mapped exactly)")
        biased = [k for k in ("attention_bias", "mlp_bias", "mamba_proj_bias", "projectors_bias")
                  if self.config.get(k)]
        if biased:
            notes.append(f"falcon_h1: mlx-lm folds µP multipliers into weights but not biases "
                         f"({', '.join(biased)}), so MLX and transformers base models differ")
        return notes

    def hf_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        a, out = self.args, {}
        for name, w in weights.items():
            module, leaf = name.rsplit(".", 1)
            layer = LAYER_PATH.match(module)
            if name == "model.embed_tokens.weight":
                w = _divide(w, a.embedding_multiplier)
            elif name == "lm_head.weight":
                w = _divide(w, a.lm_head_multiplier)
            elif layer and leaf in ("weight", "bias") and layer.group(2) in self.factors:
                f = self.factors[layer.group(2)]
                w = _divide(w, f[:, None] if leaf == "weight" and isinstance(f, mx.array) else f)
            elif name.endswith("conv1d.weight"):
                w = w.transpose(0, 2, 1)  # mlx-lm stores Conv1d weights channels-last
            out[name] = w
        return out

    def hf_config(self, config: dict) -> dict:
        # Write every multiplier explicitly: the weights were unfolded with these values.
        config = dict(config)
        for key in self.CONFIG_MULTIPLIERS:
            value = getattr(self.args, key)
            config[key] = list(value) if isinstance(value, (list, tuple)) else value
        return config


def _divide(w: mx.array, f) -> mx.array:
    return (w.astype(mx.float32) / f).astype(w.dtype)


def arch_map(config: dict) -> ArchMap:
    """The mapping for a base model's `config.json`; refuses architectures it cannot map."""
    model_type = config.get("model_type")
    if model_type == "falcon_h1":
        return FalconH1Map(config)
    if model_type in SUPPORTED:
        return ArchMap(config)
    raise AdapterError(
        f"model_type {model_type!r} is not supported for Hugging Face conversion (supported: "
        f"{', '.join(SUPPORTED)}); other architectures rename or fuse modules differently in "
        f"mlx-lm and transformers, so tensors cannot be mapped by name")


def to_hf(module: str, amap: ArchMap, lora_a, lora_b, m=None) -> dict[str, mx.array]:
    """One mlx-lm LoRA/DoRA module (full path) -> PEFT tensors (keys without the prefix)."""
    f = amap.factor(LAYER_PATH.match(module).group(2))
    lora_B = lora_b.T
    if not _is_one(f):
        lora_B = _divide(lora_B, f[:, None] if isinstance(f, mx.array) else f)
    out = {f"{module}.lora_A.weight": lora_a.T, f"{module}.lora_B.weight": lora_B}
    if m is not None:
        out[f"{module}.lora_magnitude_vector"] = m if _is_one(f) else _divide(m, abs(f))
    return out


def from_hf(module: str, amap: ArchMap, lora_A, lora_B, m=None) -> dict[str, mx.array]:
    """PEFT tensors of one module -> mlx-lm's `lora_a`, `lora_b` (and `m`)."""
    f = amap.factor(LAYER_PATH.match(module).group(2))
    if not _is_one(f):
        lora_B = _multiply(lora_B, f[:, None] if isinstance(f, mx.array) else f)
        m = None if m is None else _multiply(m, abs(f))
    out = {f"{module}.lora_a": lora_A.T, f"{module}.lora_b": lora_B.T}
    if m is not None:
        out[f"{module}.m"] = m
    return out


def _multiply(w: mx.array, f) -> mx.array:
    return (w.astype(mx.float32) * f).astype(w.dtype)


def _is_one(f) -> bool:
    return not isinstance(f, mx.array) and f == 1.0
