"""Model ops rewritten so that MLX's CPU JIT can fuse them (CPU device only; GPUs keep mlx-lm's).

mlx-lm's `swiglu` is `nn.silu(gate) * x` under `mx.compile(shapeless=True)`. Inside a compiled
forward + backward its sigmoid is computed once, by MLX's prebuilt one-element-at-a-time kernel,
and shared by the forward and the backward, so neither fused kernel contains it: on the 8 x 128 x
1536 activations of the bench model that forward + backward takes 57 ms. `swiglu` below has the
same forward (bit-identical) and a hand-written backward that recomputes the sigmoid from `exp`
inside its own fused kernel: 7.8 ms (with the vectorizing JIT flags of `mlxrl._jit`).

Attention without a cache (the training forwards) goes through `causal_attention`: on the CPU,
`mx.fast.scaled_dot_product_attention` runs as separate ops with MLX's prebuilt softmax (13 ns an
exp). Here the softmax is fused JIT kernels over contiguous arrays (a broadcast operand makes MLX
emit a strided, unvectorized kernel, so the row max and sum are materialized at full shape), and
the grouped query heads are folded into the rows of one matmul per KV head instead of broadcasting
the keys. Bench model layer (8 x 8 heads x 128 tokens, fp32): forward 19.1 -> 7.9 ms, forward +
backward 33.9 -> 21.2 ms; outputs within 3e-7, gradients within 4e-6.
"""

from __future__ import annotations

import sys
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


def _attention_with_fallback(original):
    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        if (cache is None and sinks is None and queries.dtype == mx.float32
                and isinstance(mask, str) and mask == "causal"
                and queries.shape[2] == keys.shape[2] and queries.shape[1] % keys.shape[1] == 0):
            return causal_attention(queries, keys, values, scale)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    attention.mlxrl_original = original
    return attention


def use_cpu_ops(model: nn.Module) -> bool:
    """On the CPU device, make the model's mlx-lm module use `swiglu` and, for float32 training
    forwards, `causal_attention` above; True when it swapped anything.

    mlx-lm model files import both by name, so the swap is per architecture module (every model
    of that architecture in this process).
    """
    if mx.default_device() != mx.cpu:
        return False
    module = sys.modules.get(type(model).__module__)
    if module is None:
        return False
    swapped = False
    if hasattr(module, "swiglu"):
        module.swiglu, swapped = swiglu, True
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is not None and not hasattr(original, "mlxrl_original"):
        module.scaled_dot_product_attention, swapped = _attention_with_fallback(original), True
    return swapped
