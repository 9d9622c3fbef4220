"""Model ops rewritten so that MLX's CPU JIT can fuse them (CPU device only; GPUs keep mlx-lm's).

mlx-lm's `swiglu` is `nn.silu(gate) * x` under `mx.compile(shapeless=True)`. Inside a compiled
forward + backward its sigmoid is computed once, by MLX's prebuilt one-element-at-a-time kernel,
and shared by the forward and the backward, so neither fused kernel contains it: on the 8 x 128 x
1536 activations of the bench model that forward + backward takes 57 ms. `swiglu` below has the
same forward (bit-identical) and a hand-written backward that recomputes the sigmoid from `exp`
inside its own fused kernel: 7.8 ms (with the vectorizing JIT flags of `mlxrl._jit`).

Attention without a cache (the training forwards) goes through `causal_attention`; attention over
shared-prefix rows and over the sampler's decode caches (caches with `fused_attention` set)
through `masked_attention`. On the CPU, `mx.fast.scaled_dot_product_attention` runs as separate
ops with MLX's prebuilt softmax (13 ns an exp). Here the softmax is fused JIT kernels over
contiguous arrays (a broadcast operand makes MLX emit a strided, unvectorized kernel, so the row
max and sum are materialized at full shape), and the grouped query heads are folded into the rows
of one matmul per KV head instead of broadcasting the keys. Bench model layer (8 x 8 heads x 128
tokens, fp32): forward 19.1 -> 7.9 ms, forward + backward 33.9 -> 21.2 ms; outputs within 3e-7,
gradients within 4e-6. A decode step's 8 layers at 8 rows x 96 columns: 5.8 -> 3.2 ms.
"""

from __future__ import annotations

import functools
import sys
import types
from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def _swiglu_forward(gate, x):
    return gate * mx.sigmoid(gate) * x  # nn.silu(gate) * x, in the same order


@partial(mx.compile, shapeless=True)
def _swiglu_backward(gate, x, cotangent):
    # 1 / (1 + exp(-g)) rather than mx.sigmoid: compile would merge a second mx.sigmoid with the
    # forward's and read it from memory instead of fusing it here
    s = 1 / (1 + mx.exp(-gate))
    silu = gate * s
    return cotangent * x * (s + silu * (1 - s)), cotangent * silu


@mx.custom_function
def swiglu(gate, x):
    return _swiglu_forward(gate, x)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _swiglu_backward(gate, x, cotangent)


def _full(reduced, shape):
    return mx.contiguous(mx.broadcast_to(reduced, shape))


@mx.compile
def _softmax_forward(scores):
    shifted = scores - _full(mx.max(scores, axis=-1, keepdims=True), scores.shape)
    e = mx.exp(shifted)
    return e / _full(mx.sum(e, axis=-1, keepdims=True), scores.shape)


@mx.compile
def _softmax_backward(probs, cotangent):
    return probs * (cotangent - _full(mx.sum(cotangent * probs, axis=-1, keepdims=True), probs.shape))


@mx.custom_function
def softmax(scores):
    """Softmax over the last axis, every fused kernel on contiguous operands (compiled, so that an
    eager forward such as DPO's reference pass fuses them too)."""
    return _softmax_forward(scores)


@softmax.vjp
def _softmax_vjp(primals, cotangent, probs):
    return (_softmax_backward(probs, cotangent),)


def causal_attention(queries, keys, values, scale: float):
    """Causal attention of [B, H, L, D] queries on [B, KV, L, D] keys/values (H a multiple of KV)."""
    batch, heads, length, dim = queries.shape
    groups = heads // keys.shape[1]
    folded = (queries * scale).reshape(batch, keys.shape[1], groups * length, dim)
    position = mx.arange(length)
    bias = mx.where(position[:, None] >= position[None], 0.0, -mx.inf).astype(queries.dtype)
    scores = folded @ keys.swapaxes(-1, -2) + mx.tile(bias, (groups, 1))
    return (softmax(scores) @ values).reshape(batch, heads, length, dim)


def masked_attention(queries, keys, values, scale: float, mask):
    """Attention of [B, H, L, D] queries on [B, KV, S, D] keys/values (H a multiple of KV) where
    the boolean `mask` [B, 1, L, S] is True (every query row must have one True)."""
    batch, heads, length, dim = queries.shape
    groups = heads // keys.shape[1]
    folded = (queries * scale).reshape(batch, keys.shape[1], groups * length, dim)
    bias = mx.where(mask, 0.0, -mx.inf).astype(queries.dtype)
    scores = folded @ keys.swapaxes(-1, -2) + mx.tile(bias, (1, 1, groups, 1))
    return (softmax(scores) @ values).reshape(batch, heads, length, dim)


def _attention_with_fallback(original):
    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        attend = getattr(cache, "attend", None)  # packed rows (shared_prefix.PackedSuffixKV)
        if attend is not None:
            if sinks is not None:  # the fallback below would read packed queries as rows
                raise NotImplementedError("packed rows do not take attention sinks")
            return attend(queries, keys, values, scale, mask)
        fusable = (sinks is None and queries.dtype == mx.float32
                   and queries.shape[1] % keys.shape[1] == 0)
        if (fusable and cache is None and isinstance(mask, str) and mask == "causal"
                and queries.shape[2] == keys.shape[2]):
            return causal_attention(queries, keys, values, scale)
        if fusable and getattr(cache, "fused_attention", False):  # shared-prefix rows
            return masked_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    attention.mlxrl_original = original
    return attention


# ----------------------------------------------------------------------------- small matmuls


def split_matmul(x, w):
    """`x @ w.T` in pieces of w's rows small enough for OpenBLAS's small-matrix kernel, which
    reads the weights once, unpacked, on one core (decode's few rows: see mlxrl/mlx/sampling.py)."""
    rows, k = x.size // x.shape[-1], w.shape[1]
    piece = max(16, min(1200 // rows, 1_000_000 // (rows * k)) // 16 * 16)
    if not piece < w.shape[0] <= 64 * piece:  # nothing to split, or too many pieces
        return x @ w.T
    return mx.concatenate([x @ w[i: i + piece].T for i in range(0, w.shape[0], piece)], axis=-1)


class SplittableLinear(nn.Linear):
    """nn.Linear whose matmul is split (`split_matmul`) while its `split_matmul` flag is set."""

    split_matmul = False

    def __call__(self, x):
        if DECODE_WEIGHT in self:
            return decode_linear(self, x)
        if not self.split_matmul:
            return super().__call__(x)
        y = split_matmul(x, self.weight)
        return y + self.bias if "bias" in self else y


class SplittableEmbedding(nn.Embedding):
    """nn.Embedding whose tied-LM-head matmul (`as_linear`) is split while the flag is set."""

    split_matmul = False

    def as_linear(self, x):
        if DECODE_WEIGHT in self:
            return x @ self[DECODE_WEIGHT]
        return split_matmul(x, self.weight) if self.split_matmul else super().as_linear(x)


_SPLITTABLE = {nn.Linear: SplittableLinear, nn.Embedding: SplittableEmbedding}


# ----------------------------------------------------------------------------- decode weights

DECODE_WEIGHT = "decode_weight"
DECODE_WEIGHTS_MAX_BYTES = 2 << 30  # beyond this a second copy of the weights costs too much


def decode_linear(module: nn.Module, x):
    """`module`'s output from its decode weight: an nn.Linear's, or a LoRA layer's with its
    adapter folded in (`set_decode_weights`)."""
    y = x @ module[DECODE_WEIGHT]
    base = module.linear if "linear" in module else module
    return y + base.bias if "bias" in base else y


def set_decode_weights(model: nn.Module) -> list[nn.Module]:
    """Give the model's matmul layers a decode weight for a no-grad decode: `W.T`, contiguous, with
    a LoRA layer's adapter folded in (`W.T + scale * A @ B`, the layer in eval mode, so no
    dropout). At decode's few rows OpenBLAS multiplies `x @ W.T` by packing W at every call;
    `x @ W_T` reads the weights as they lie, and a folded adapter saves LoRA's two thin
    matmuls a layer. A second copy of the weights while it lasts: none when that would pass
    `DECODE_WEIGHTS_MAX_BYTES`. Returns the layers set (evaluated); `clear_decode_weights` them."""
    layers = _decode_weight_layers(model)
    if sum(_base(m).weight.nbytes for m in layers) > DECODE_WEIGHTS_MAX_BYTES:
        return []
    for m in layers:
        weight = _base(m).weight.T
        if "lora_a" in m and getattr(m, "adapter_enabled", True):
            weight = weight + (m.scale * (m.lora_a @ m.lora_b)).astype(weight.dtype)
        m[DECODE_WEIGHT] = mx.contiguous(weight)
    mx.eval([m[DECODE_WEIGHT] for m in layers])
    return layers


def clear_decode_weights(layers: list[nn.Module]) -> None:
    for m in layers:
        m.pop(DECODE_WEIGHT, None)


def _base(module: nn.Module) -> nn.Module:
    return module.linear if "lora_a" in module else module


def _decode_weight_layers(model: nn.Module) -> list[nn.Module]:
    """mlxrl's LoRA layers over a float linear (not DoRA: its magnitude rescales each output),
    splittable linears outside them, and a tied head's embedding (a model with no `lm_head`)."""
    from mlxrl.mlx.model import AdapterSwitch

    lora = [m for _, m in model.named_modules() if isinstance(m, AdapterSwitch) and "m" not in m
            and type(m.linear) in (nn.Linear, SplittableLinear)]
    inside = {id(m.linear) for _, m in model.named_modules() if "lora_a" in m}
    plain = [m for _, m in model.named_modules() if type(m) is SplittableLinear and id(m) not in inside]
    if "lm_head" not in model:
        plain += [m for _, m in model.named_modules() if type(m) is SplittableEmbedding]
    return [m for m in lora + plain if not m.training or "lora_a" not in m]


# ----------------------------------------------------------------------------- one model instance


def use_cpu_ops(model: nn.Module) -> bool:
    """On the CPU device, give this model instance the ops above; True when it changed anything.

    - Modules whose mlx-lm class calls `swiglu` or `scaled_dot_product_attention` (names that
      mlx-lm's architecture files import) become a subclass whose methods read those names as
      mlxrl's `swiglu` and (float32, no cache: the training forwards) `causal_attention`.
    - On Linux, its nn.Linear / nn.Embedding layers become `SplittableLinear` /
      `SplittableEmbedding`, which split their matmul only while the sampler sets their flag.

    Done once, when mlxrl loads the model (the subclasses are made once per class). mlx-lm's
    modules and every other model in the process are untouched.
    """
    if mx.default_device() != mx.cpu:
        return False
    split = sys.platform.startswith("linux")
    changed = False
    for _, module in model.named_modules():
        cls = type(module)
        new = _SPLITTABLE.get(cls) if split else None
        new = new or _with_cpu_ops(cls)
        if new is not cls:
            module.__class__, changed = new, True
    return changed


def attends(model: nn.Module) -> bool:
    """Whether mlxrl's attention above serves every layer of `model` (`use_cpu_ops` gave its
    attention class mlxrl's `scaled_dot_product_attention`): what packed rows need."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    for layer in layers:
        call = vars(type(getattr(layer, "self_attn", None))).get("__call__")  # a patched class's own
        attention = getattr(call, "__globals__", {}).get("scaled_dot_product_attention")
        if not hasattr(attention, "mlxrl_original"):
            return False
    return True


@functools.cache
def _with_cpu_ops(cls: type) -> type:
    """`cls`, or a subclass whose methods that call the ops read them from a namespace holding
    mlxrl's (their module's globals with the ops replaced)."""
    methods, seen = {}, set()
    for base in cls.__mro__:
        namespace = _cpu_namespace(base.__module__)
        for name, fn in vars(base).items():
            if name in seen:
                continue
            seen.add(name)
            if namespace and isinstance(fn, types.FunctionType) and _calls(fn.__code__, namespace):
                methods[name] = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                                                   fn.__closure__)
                methods[name].__kwdefaults__ = fn.__kwdefaults__
    if not methods:
        return cls
    return type(cls.__name__, (cls,), {**methods, "__module__": __name__,
                                       "__qualname__": f"{cls.__qualname__}WithCPUOps"})


@functools.cache
def _cpu_namespace(module_name: str) -> dict | None:
    """The globals of mlx-lm architecture module `module_name` with mlxrl's ops in place of
    `swiglu` / `scaled_dot_product_attention`; None when it has neither (or is not mlx-lm's)."""
    module = sys.modules.get(module_name)
    if module is None or not module_name.startswith("mlx_lm."):
        return None
    ops = {}
    if "swiglu" in vars(module):
        ops["swiglu"] = swiglu
    if "scaled_dot_product_attention" in vars(module):
        ops["scaled_dot_product_attention"] = _attention_with_fallback(module.scaled_dot_product_attention)
    return {**vars(module), **ops} if ops else None


def _calls(code: types.CodeType, namespace: dict) -> bool:
    """Whether `code` (or a function nested in it) reads `swiglu` or the attention by name."""
    names = {"swiglu", "scaled_dot_product_attention"} & set(namespace)
    return bool(names & set(code.co_names)) or any(
        _calls(c, namespace) for c in code.co_consts if isinstance(c, types.CodeType))
