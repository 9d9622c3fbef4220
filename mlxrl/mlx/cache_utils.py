"""Decode caches for batched sampling, made from mlx-lm's batch caches.

mlx-lm's `BatchKVCache` grows its buffers and keeps its write position as a Python int, so a
compiled step would be retraced at every token. `DecodeKVCache` is a left-padded buffer of fixed
width written at a column held in an array; `CacheLayout` flattens a model's decode caches
(`DecodeKVCache`, mlx-lm's `ArraysCache` for SSM state, `CacheList` for hybrids such as
falcon_h1) to a list of arrays and back, which is what a compiled function can take and return.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList


class DecodeKVCache:
    """Left-padded KV buffer `[N, H, size, D]` written at column `idx` (an array, not an int).

    Row r's token in column c sits at position `c - left_padding[r]`. The attention mask hides the
    left padding and the columns not written yet, so the buffer keeps its shape from step to step.
    `fused_attention`: on the CPU, mlxrl's attention (`cpu_ops.masked_attention`, one fused
    softmax) serves the decode instead of `mx.fast.scaled_dot_product_attention`, which runs there
    as separate ops with MLX's prebuilt softmax (the bench model's 8 layers at 8 rows x 96
    columns: 3.2 vs 5.8 ms a step). The column being written is always visible, so no row is
    all masked.
    """

    fused_attention = True

    def __init__(self, keys, values, left_padding, idx, size):
        self.keys, self.values, self.size = keys, values, size
        self.left_padding, self.idx = left_padding, idx

    @property
    def offset(self):
        return self.idx - self.left_padding

    def update_and_fetch(self, keys, values):
        if self.keys is None:  # nothing was prefilled: allocate on the first step
            shape = keys.shape[:2] + (self.size,)
            self.keys = mx.zeros(shape + keys.shape[3:], keys.dtype)
            self.values = mx.zeros(shape + values.shape[3:], values.dtype)
        self.keys = mx.slice_update(self.keys, keys, self.idx[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.idx[None], axes=(2,))
        return self.keys, self.values

    def make_mask(self, n, window_size=None, **kwargs):
        if n != 1 or window_size is not None:
            raise NotImplementedError("decode caches take one token per step, no sliding window")
        col = mx.arange(self.size)
        visible = (col >= self.left_padding[:, None]) & (col <= self.idx)
        return visible[:, None, None, :]


def repeat_rows(cache, G: int):
    """One layer's prefilled batch cache as a decode cache, each row repeated G times (new
    arrays, so no two rows share state)."""
    if isinstance(cache, CacheList):
        return CacheList(*(repeat_rows(c, G) for c in cache.caches))
    if isinstance(cache, ArraysCache):
        out = ArraysCache(len(cache.cache))
        out.cache = [None if a is None else mx.repeat(a, G, axis=0) for a in cache.cache]
        return out
    if isinstance(cache, BatchKVCache):
        if cache.keys is None:
            return DecodeKVCache(None, None, None, None, 0)
        kv = [mx.repeat(a[..., : cache.size(), :], G, axis=0) for a in (cache.keys, cache.values)]
        return DecodeKVCache(*kv, None, None, cache.size())
    raise NotImplementedError(f"batched sampling does not support {type(cache).__name__} yet")


def left_padding(caches, batch: int) -> mx.array:
    """[batch] int32 left padding of prefilled batch caches (zeros for a pure SSM)."""
    for c in caches:
        for leaf in c.caches if isinstance(c, CacheList) else (c,):
            if isinstance(leaf, BatchKVCache):
                return leaf.left_padding.astype(mx.int32)
    return mx.zeros((batch,), dtype=mx.int32)


def _spec(cache):
    if isinstance(cache, CacheList):
        return ("list", tuple(_spec(c) for c in cache.caches))
    if isinstance(cache, ArraysCache):
        return ("arrays", len(cache.cache))
    return ("kv",)


def _leaves(spec) -> list[str]:
    if spec[0] == "list":
        return [kind for s in spec[1] for kind in _leaves(s)]
    return ["state"] * spec[1] if spec[0] == "arrays" else ["kv", "kv"]


@dataclass(frozen=True)
class CacheLayout:
    """The structure of a model's decode caches (hashable: part of a compiled step's key)."""

    specs: tuple

    @classmethod
    def of(cls, caches) -> CacheLayout:
        return cls(tuple(_spec(c) for c in caches))

    def flatten(self, caches) -> list:
        return [a for c in caches for a in _arrays(c)]

    def build(self, arrays: list, left_padding, idx, size=None) -> list:
        """Decode caches over `arrays` (as `flatten` gives them) writing column `idx`."""
        it = iter(arrays)
        return [_build(s, it, left_padding, idx, size) for s in self.specs]

    def grow(self, arrays: list, size: int) -> list:
        """`arrays` with every KV buffer padded on the right to `size` columns."""
        kinds = [kind for s in self.specs for kind in _leaves(s)]
        return [_pad_columns(a, size) if kind == "kv" and a is not None else a
                for a, kind in zip(arrays, kinds)]


def _arrays(cache) -> list:
    if isinstance(cache, CacheList):
        return [a for c in cache.caches for a in _arrays(c)]
    if isinstance(cache, ArraysCache):
        return list(cache.cache)
    return [cache.keys, cache.values]


def _build(spec, arrays, left_padding, idx, size):
    if spec[0] == "list":
        return CacheList(*(_build(s, arrays, left_padding, idx, size) for s in spec[1]))
    if spec[0] == "arrays":
        out = ArraysCache(spec[1])
        out.cache = [next(arrays) for _ in range(spec[1])]
        return out
    keys, values = next(arrays), next(arrays)
    return DecodeKVCache(keys, values, left_padding, idx, size if keys is None else keys.shape[2])


def _pad_columns(a, size):
    return mx.pad(a, [(0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)])
