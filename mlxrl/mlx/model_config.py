"""Every MLX model load goes through `load_model(path)`: mlx-lm's loader, fed a config that means
what transformers means by the same `config.json`.

transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}` and no top-level
`rope_theta`; mlx-lm's llama, qwen2 and falcon_h1 read only the top-level keys and fall back to
their own default base (10^4, 10^6, 10^11) without a word. So the RoPE settings are resolved here
the way transformers 5 resolves them (`RotaryEmbeddingConfigMixin`: `rope_scaling` overrides
`rope_parameters`; `rope_theta` inside the dict, else top level, else 10000; `type` is the old
name of `rope_type`), then written in the form mlx-lm's `initialize_rope` reads: `rope_theta`
plus a `rope_scaling` dict whose numbers make mlx-lm compute transformers' frequencies and
attention factor. A RoPE type mlx-lm cannot compute as transformers does stops with one line.

This full reading covers llama, qwen2, qwen3 and falcon_h1 (`ROPE_CHECKED`). Other architectures
keep mlx-lm's own reading, except that a transformers-5 `rope_parameters` of the default type gets
its top-level `rope_theta` when the mlx-lm model does not read `rope_parameters` itself; a
scaled type there is refused.

Also filled where `config.json` leaves them out and mlx-lm's default differs from transformers':
`head_dim` (falcon_h1: hidden_size / heads; qwen3: 128) and `tie_word_embeddings` (from whether
the weights hold an `lm_head`). Sliding-window layers, which mlx-lm's qwen2, qwen3 and falcon_h1
do not implement, are refused.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

from mlxrl.errors import ModelError

DEFAULT_THETA = 10000.0  # transformers' `default_theta` for llama, qwen2, qwen3 and falcon_h1
NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# mlx-lm models that build their RoPE with `initialize_rope(head_dim, rope_theta, traditional,
# rope_scaling, max_position_embeddings)`, read here and checked against transformers.
ROPE_CHECKED = ("llama", "qwen2", "qwen3", "falcon_h1")
NO_SLIDING_WINDOW = ("qwen2", "qwen3", "falcon_h1")  # mlx-lm attends to every token here


def load_model(path: Path, *, lazy: bool = False, strict: bool = True,
               trust_remote_code: bool = False):
    """mlx-lm's `load_model` with the config normalised; returns (model, config).
    `strict=False` builds the architecture without weight files (fresh weights)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = Path(path)
    overrides = mlx_lm_overrides(load_config(path), path)
    try:
        return mlx_lm_load_model(path, lazy=lazy, strict=strict, model_config=overrides,
                                 trust_remote_code=trust_remote_code)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"cannot load {path}: {e}") from None


def mlx_lm_overrides(config: dict, path: Path) -> dict:
    """The keys to set on `config` so that mlx-lm builds the model transformers builds."""
    where = f"{path / 'config.json'}"
    overrides = rope_overrides(config, where)
    arch = config.get("model_type")
    if "head_dim" not in config and arch == "falcon_h1":
        overrides["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if "head_dim" not in config and arch == "qwen3":
        overrides["head_dim"] = 128  # Qwen3Config's default
    names = _weight_names(path)
    if "tie_word_embeddings" not in config:  # transformers' classes default to untied
        overrides["tie_word_embeddings"] = bool(names) and "lm_head.weight" not in names
    if arch in NO_SLIDING_WINDOW:
        _refuse_sliding_window(config, where)
    return overrides


def rope_overrides(config: dict, where: str) -> dict:
    """{'rope_theta': base, 'rope_scaling': dict or None, 'rope_parameters': None} for mlx-lm."""
    if config.get("model_type") not in ROPE_CHECKED:
        return _unchecked_arch_rope(config, where)
    params = _resolved_rope_parameters(config, where)
    rope_type = params["rope_type"]
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0 and rope_type != "proportional":
        raise ModelError(f"{where}: partial_rotary_factor {partial} (RoPE on part of each head) "
                         f"is not implemented by mlx-lm's {config.get('model_type')}")
    translate = _TRANSLATIONS.get(rope_type)
    if translate is None:
        raise ModelError(f"{where}: rope_type {rope_type!r} cannot run on MLX as transformers "
                         f"runs it (mlx-lm computes: {', '.join(_TRANSLATIONS)})")
    try:
        scaling = translate(params, config)
    except KeyError as e:
        raise ModelError(f"{where}: rope_parameters of type {rope_type!r} lack {e}") from None
    except _Unsupported as e:
        raise ModelError(f"{where}: rope_type {rope_type!r}: {e}") from None
    # qwen3 in mlx-lm reads rope_parameters when rope_scaling is None: hide the raw dict.
    return {"rope_theta": float(params["rope_theta"]), "rope_scaling": scaling,
            "rope_parameters": None}


def _unchecked_arch_rope(config: dict, where: str) -> dict:
    """Other architectures: mlx-lm's own reading, except the transformers-5 layout that a model
    which knows only the top-level keys would miss."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config or "rope_theta" not in params:
        return {}
    if "rope_parameters" in _mlx_lm_args_fields(config):
        return {}  # this mlx-lm model reads transformers 5's layout itself
    if params.get("rope_type", "default") != "default":
        raise ModelError(f"{where}: rope_parameters of type {params['rope_type']!r}, which mlxrl "
                         f"translates for mlx-lm only on {', '.join(ROPE_CHECKED)} (this is "
                         f"{config.get('model_type')!r}); add rope_theta and rope_scaling as "
                         f"mlx-lm's model reads them to config.json")
    return {"rope_theta": float(params["rope_theta"])}


def _mlx_lm_args_fields(config: dict) -> set[str]:
    import dataclasses

    from mlx_lm.utils import _get_classes

    try:
        return {f.name for f in dataclasses.fields(_get_classes(config)[1])}
    except (ValueError, TypeError):  # an architecture mlx-lm lacks: its loader says so later
        return set()


def _resolved_rope_parameters(config: dict, where: str) -> dict:
    """The one RoPE dict transformers 5 would use, its defaults filled."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:  # per-layer-type RoPE (e.g. {"full_attention": {...}, "sliding_attention": {...}})
        if any(v != nested[0] for v in nested):
            raise ModelError(f"{where}: rope_parameters differ between layer types; mlx-lm's "
                             f"{config.get('model_type')} has one RoPE for every layer")
        params = dict(nested[0])
    params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_THETA))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.pop("type", None)
    if "partial_rotary_factor" in config:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in NEEDS_ORIGINAL_MAX:
        if "original_max_position_embeddings" in config:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        elif "max_position_embeddings" in config:
            params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return params


class _Unsupported(Exception):
    pass


def _default(params: dict, config: dict) -> None:
    return None


def _linear(params: dict, config: dict) -> dict:
    return {"rope_type": "linear", "factor": float(params["factor"])}


def _dynamic(params: dict, config: dict) -> dict:
    if not config.get("max_position_embeddings"):
        raise _Unsupported("dynamic NTK scaling needs max_position_embeddings in config.json")
    return {"rope_type": "dynamic", "factor": float(params["factor"])}


def _llama3(params: dict, config: dict) -> dict:
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"rope_type": "llama3", **{k: params[k] for k in keys}}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(params: dict, config: dict) -> dict:
    """transformers' YaRN attention factor, expressed through mlx-lm's `mscale` (whose ratio
    mscale/mscale_all_dim differs from transformers' rules when only one of them is set)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or config["max_position_embeddings"] / original
    if not params.get("truncate", True):
        raise _Unsupported("truncate: false (mlx-lm always rounds the correction range)")
    attention = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None:
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    if factor <= 1 and attention != 1.0:
        raise _Unsupported(f"attention_factor {attention} with factor {factor} <= 1")
    # mlx-lm scales q and k by 0.1 * mscale * ln(factor) + 1 when mscale_all_dim is 0.
    mlx_mscale = (attention - 1.0) / (0.1 * math.log(factor)) if factor > 1 else 1.0
    return {"rope_type": "yarn", "factor": float(factor),
            "original_max_position_embeddings": original,
            "beta_fast": params.get("beta_fast") or 32, "beta_slow": params.get("beta_slow") or 1,
            "mscale": mlx_mscale, "mscale_all_dim": 0.0}


def _longrope(params: dict, config: dict) -> dict:
    """mlx-lm applies `long_factor` at every length and derives the attention factor from
    max_position_embeddings; transformers uses `short_factor` up to the original length."""
    original = params["original_max_position_embeddings"]
    if list(params["short_factor"]) != list(params["long_factor"]):
        raise _Unsupported("short_factor differs from long_factor (mlx-lm uses long_factor at "
                           "every length, transformers short_factor up to "
                           f"original_max_position_embeddings {original})")

    def attention_of(factor):
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))

    mlx_attention = attention_of(config["max_position_embeddings"] / original)
    attention = params.get("attention_factor") or attention_of(
        params.get("factor") or config["max_position_embeddings"] / original)
    if not math.isclose(attention, mlx_attention, rel_tol=1e-9):
        raise _Unsupported(f"attention_factor {attention} differs from the {mlx_attention} "
                           "mlx-lm derives from max_position_embeddings")
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "short_factor": params["short_factor"], "long_factor": params["long_factor"]}


def _proportional(params: dict, config: dict) -> dict:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = params.get("partial_rotary_factor", 1.0)
    # transformers rotates int(partial * head_dim // 2) pairs,
    # mlx-lm ceil(int(head_dim * partial) / 2)
    if 2 * int(partial * head_dim // 2) != int(head_dim * partial):
        raise _Unsupported(f"partial_rotary_factor {partial} of head_dim {head_dim} rotates a "
                           "different number of dimensions in mlx-lm")
    return {"rope_type": "proportional", "factor": float(params.get("factor", 1.0)),
            "partial_rotary_factor": partial}


_TRANSLATIONS = {"default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3,
                 "yarn": _yarn, "longrope": _longrope, "proportional": _proportional}


def _refuse_sliding_window(config: dict, where: str) -> None:
    layer_types = config.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if not layer_types and config.get("use_sliding_window") and config.get("sliding_window"):
        sliding = list(range(config.get("max_window_layers", 0), config["num_hidden_layers"]))
    if sliding and config.get("sliding_window"):
        raise ModelError(
            f"{where}: layers {sliding[0]}..{sliding[-1]} use sliding-window attention (window "
            f"{config['sliding_window']}), which mlx-lm's {config['model_type']} does not "
            f"implement; if no sequence exceeds the window, set use_sliding_window: false and "
            f"every layer_types entry to full_attention")


def _weight_names(path: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in glob.glob(str(path / "model*.safetensors")):
        with safe_open(file, "np") as f:
            names.update(f.keys())
    return names
