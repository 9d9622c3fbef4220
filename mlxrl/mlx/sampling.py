"""Rollouts for GRPO (and batch inference): prefix-shared, batched, compiled decoding.

`sample(model, prompts, num_generations=G, ...)` returns G completions of each prompt as exact
token ids with the log-prob of each sampled token under `softmax(logits / T)` (before top-k/p and
min-p filtering: what a teacher-forced recompute with logits/T gives, as TRL scores them).

How it runs:
- Prefill: `prompt[:-1]` of all B prompts in one right-padded forward through mlx-lm's batch
  caches (`BatchKVCache`, `ArraysCache`, `CacheList`, as `BatchGenerator` does; `finalize()` turns
  right padding into left padding, and the SSM state is taken at each row's own length). Logits
  are never evaluated here, so the LM head does not run over the prompt.
- Prefix sharing: each prompt's cache is computed once and repeated to its G rows (fresh arrays:
  rows never share a mutable cache, and a Mamba state is per row from then on).
- Decode: all N = B*G rows step together through one `mx.compile`d step over fixed-size,
  left-padded KV buffers written at a column index held in an array, so the trace is reused for
  every step and, per model and settings, across calls. Steps are queued lazily and evaluated
  every `CHUNK` steps, which is also when the host checks whether every row is done.
- Sampling on the device: temperature, then top-k, top-p, min-p as one logit threshold per row
  (the Hugging Face order), then inverse-CDF sampling with one uniform per row and step. T = 0 is
  greedy (log-probs then use T = 1).
- Stopping: a row that samples an EOS keeps it and then emits pad (0) with log-prob 0; `lengths`
  counts its tokens, EOS included. Rows end at `max_tokens` otherwise (`finished` False).
- RNG: row r = i*G + g draws its uniforms from numpy's PCG64 seeded with (seed, r), one per step,
  so its tokens depend on the seed, its row index and its own logits only: a prefix-shared run
  gives the same tokens as the G-times-repeated prompts sampled with G = 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList, make_prompt_cache

CHUNK = 8  # decode steps queued between host syncs
BUCKET = 64  # KV buffers are rounded up to this many columns, so calls reuse the trace
PAD_ID = 0
_MAX_TRACES = 8


@dataclass
class Rollout:
    tokens: np.ndarray  # [N, W] int32, row i*G+g = completion g of prompt i, right-padded with 0
    logprobs: np.ndarray  # [N, W] float32, log softmax(logits / T) at the sampled token, 0 on pad
    lengths: np.ndarray  # [N] int, tokens per row, EOS included
    finished: np.ndarray  # [N] bool, ended by an EOS (False: cut at max_tokens)
    prompt_index: np.ndarray  # [N] int, i for row i*G+g
    seconds: float
    tokens_per_second: float

    @property
    def mask(self) -> np.ndarray:
        """[N, W] bool, True on each row's completion tokens."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


@dataclass(frozen=True)
class _Settings:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    eos: tuple[int, ...]


def sample(model: nn.Module, prompts: list[list[int]], *, num_generations: int = 1,
           max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           min_p: float = 0.0, eos_token_ids, seed: int | None = None) -> Rollout:
    """Sample `num_generations` completions of each prompt (token ids) with `model`."""
    eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
    cfg = _Settings(float(temperature), float(top_p), int(top_k), float(min_p), eos)
    _validate(prompts, num_generations, max_tokens, cfg)
    start = time.perf_counter()
    G, N = num_generations, len(prompts) * num_generations
    caches, width = _prefill(model, prompts)
    state = [_decode_cache(c, G) for c in caches]
    left_padding = mx.repeat(_left_padding(caches, len(prompts)), G)
    first = mx.array([p[-1] for p in prompts for _ in range(G)], dtype=mx.int32)
    uniforms = mx.array(_uniforms(seed, N, max_tokens))
    tokens, logprobs, alive, done = _decode(model, cfg, state, first, left_padding, width,
                                            uniforms, max_tokens)
    lengths = alive.sum(axis=1)
    width_out = int(lengths.max())
    seconds = time.perf_counter() - start
    return Rollout(tokens=tokens[:, :width_out], logprobs=logprobs[:, :width_out],
                   lengths=lengths, finished=done, prompt_index=np.repeat(np.arange(len(prompts)), G),
                   seconds=seconds, tokens_per_second=float(lengths.sum()) / seconds)


def _validate(prompts, num_generations, max_tokens, cfg: _Settings) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    if num_generations < 1 or max_tokens < 1:
        raise ValueError(f"sample: num_generations ({num_generations}) and max_tokens "
                         f"({max_tokens}) must be >= 1")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0 or not 0 <= cfg.min_p < 1:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and "
                         f"0 <= min_p < 1, got {cfg}")


def _uniforms(seed: int | None, rows: int, steps: int) -> np.ndarray:
    """[steps, rows] float32 in (0, 1]; row r's stream depends on (seed, r) only."""
    seed = np.random.SeedSequence().entropy if seed is None else seed
    u = [1.0 - np.random.default_rng([seed, r]).random(steps) for r in range(rows)]
    return np.stack(u, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- prefill


def _prefill(model: nn.Module, prompts: list[list[int]]):
    """Batch caches holding `prompt[:-1]` of every prompt, left-padded; and their width."""
    heads = [p[:-1] for p in prompts]
    lengths = [len(h) for h in heads]
    width = max(lengths)
    singles = [make_prompt_cache(model) for _ in prompts]
    caches = [c.merge([s[layer] for s in singles]) for layer, c in enumerate(singles[0])]
    if width == 0:
        return caches, 0
    padding = [width - n for n in lengths]
    if max(padding) > 0:  # right-pad, then finalize() rolls the padding to the left
        for c in caches:
            c.prepare(lengths=lengths, right_padding=padding)
    model(mx.array([h + [PAD_ID] * (width - len(h)) for h in heads], dtype=mx.int32), cache=caches)
    if max(padding) > 0:
        for c in caches:
            c.finalize()
    mx.eval([c.state for c in caches])
    return caches, width


def _left_padding(caches, batch: int) -> mx.array:
    for c in caches:
        for leaf in c.caches if isinstance(c, CacheList) else (c,):
            if isinstance(leaf, BatchKVCache):
                return leaf.left_padding.astype(mx.int32)
    return mx.zeros((batch,), dtype=mx.int32)  # no attention layers (pure SSM)


# ----------------------------------------------------------------------------- decode caches


class _DecodeKVCache:
    """Left-padded KV buffer `[N, H, size, D]` written at column `idx` (an array, not an int).

    Row r's token in column c sits at position `c - left_padding[r]`. The attention mask hides the
    left padding and the columns not written yet, so the buffer never changes shape.
    """

    def __init__(self, keys, values, left_padding, idx, size):
        self.keys, self.values, self.size = keys, values, size
        self.left_padding, self.idx = left_padding, idx

    @property
    def offset(self):
        return self.idx - self.left_padding

    def update_and_fetch(self, keys, values):
        if self.keys is None:  # first step after an empty prefill: allocate
            shape = keys.shape[:2] + (self.size,)
            self.keys = mx.zeros(shape + keys.shape[3:], keys.dtype)
            self.values = mx.zeros(shape + values.shape[3:], values.dtype)
        self.keys = mx.slice_update(self.keys, keys, self.idx[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.idx[None], axes=(2,))
        return self.keys, self.values

    def make_mask(self, n, window_size=None, **kwargs):
        if n != 1 or window_size is not None:
            raise NotImplementedError("sampling decodes one token per step without windows")
        col = mx.arange(self.size)
        visible = (col >= self.left_padding[:, None]) & (col <= self.idx)
        return visible[:, None, None, :]


def _decode_cache(cache, G: int):
    """One layer's batch cache, each row repeated G times, as a decode cache."""
    if isinstance(cache, CacheList):
        return CacheList(*(_decode_cache(c, G) for c in cache.caches))
    if isinstance(cache, ArraysCache):
        out = ArraysCache(len(cache.cache))
        out.cache = [None if a is None else mx.repeat(a, G, axis=0) for a in cache.cache]
        return out
    if isinstance(cache, BatchKVCache):
        if cache.keys is None:
            return _DecodeKVCache(None, None, None, None, 0)
        kv = [mx.repeat(a[..., : cache.size(), :], G, axis=0) for a in (cache.keys, cache.values)]
        return _DecodeKVCache(*kv, None, None, cache.size())
    raise NotImplementedError(f"sampling does not support {type(cache).__name__} layers yet")


def _spec(cache):
    """The structure of one layer's decode cache (part of the trace key)."""
    if isinstance(cache, CacheList):
        return ("list", tuple(_spec(c) for c in cache.caches))
    if isinstance(cache, ArraysCache):
        return ("arrays", len(cache.cache))
    return ("kv",)


def _arrays(cache) -> list:
    if isinstance(cache, CacheList):
        return [a for c in cache.caches for a in _arrays(c)]
    if isinstance(cache, ArraysCache):
        return list(cache.cache)
    return [cache.keys, cache.values]


def _build(spec, arrays, left_padding, idx, size):
    """A decode cache of structure `spec` over the arrays taken from the iterator `arrays`."""
    if spec[0] == "list":
        return CacheList(*(_build(s, arrays, left_padding, idx, size) for s in spec[1]))
    if spec[0] == "arrays":
        out = ArraysCache(spec[1])
        out.cache = [next(arrays) for _ in range(spec[1])]
        return out
    keys, values = next(arrays), next(arrays)
    return _DecodeKVCache(keys, values, left_padding, idx, size if keys is None else keys.shape[2])


# ----------------------------------------------------------------------------- decode step


def _step(model, specs, cfg: _Settings, tokens, state, left_padding, idx, u, done, size=None):
    """One decode step for all rows, writing column `idx`: returns the sampled tokens, their
    log-probs, which rows were still alive, the new done flags and the new cache arrays."""
    arrays = iter(state)
    caches = [_build(s, arrays, left_padding, idx, size) for s in specs]
    logits = model(tokens[:, None], cache=caches)[:, -1, :].astype(mx.float32)
    token, logp = _sample_token(logits, u, cfg)
    alive = mx.logical_not(done)
    token = mx.where(alive, token, PAD_ID)
    logp = mx.where(alive, logp, 0.0)
    if cfg.eos:
        done = done | (token[:, None] == mx.array(cfg.eos, dtype=token.dtype)).any(axis=1)
    state = [a for c in caches for a in _arrays(c)]
    return token, logp, alive, done, state


def _sample_token(logits, u, cfg: _Settings):
    """Token per row and its log-prob under softmax(logits / T), T = 1 when greedy."""
    z = logits / cfg.temperature if cfg.temperature not in (0.0, 1.0) else logits
    top = z.max(axis=-1, keepdims=True)
    e = mx.exp(z - top)
    lse = top + mx.log(e.sum(axis=-1, keepdims=True))
    if cfg.temperature == 0.0:
        token = mx.argmax(z, axis=-1)
    else:
        threshold = _keep_threshold(z, cfg)
        if threshold is not None:
            e = mx.where(z >= threshold, e, 0.0)
        # Inverse CDF: the first index whose cumulative mass reaches u * total (u in (0, 1]);
        # a token of weight 0 is never the first to reach it.
        cdf = mx.cumsum(e, axis=-1)
        token = (cdf < u[:, None] * cdf[:, -1:]).sum(axis=-1)
        token = mx.minimum(token, z.shape[-1] - 1)
    token = token.astype(mx.int32)
    logp = mx.take_along_axis(z, token[:, None], axis=-1) - lse
    return token, logp.squeeze(-1)


def _keep_threshold(z, cfg: _Settings):
    """[N, 1] logit threshold of the tokens top-k, then top-p, then min-p keep (None: all)."""
    vocab = z.shape[-1]
    threshold = None
    if 0 < cfg.top_k < vocab:
        threshold = mx.topk(z, cfg.top_k, axis=-1).min(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        ranked = -mx.sort(-z, axis=-1)
        p = mx.exp(ranked - ranked[:, :1])
        if threshold is not None:
            p = mx.where(ranked >= threshold, p, 0.0)
        mass_before = mx.cumsum(p, axis=-1) - p
        n_keep = (mass_before < cfg.top_p * p.sum(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True)
        threshold = mx.take_along_axis(ranked, n_keep - 1, axis=-1)
    if cfg.min_p > 0.0:
        floor = z.max(axis=-1, keepdims=True) + float(np.log(cfg.min_p))
        threshold = floor if threshold is None else mx.maximum(threshold, floor)
    return threshold


_TRACES: dict = {}


def _compiled_step(model, specs, cfg: _Settings):
    """The compiled step for this model, cache structure and settings, traced once and kept.

    A trace bakes in Python values (module classes, a LoRA `scale`, `training`), so they are part
    of the key; the weights are implicit inputs, so optimizer updates need no retrace.
    """
    modules = tuple((name, type(m), m.training, getattr(m, "scale", None))
                    for name, m in model.named_modules()
                    if not isinstance(getattr(m, "scale", 0.0), mx.array))
    key = (id(model), specs, cfg, modules)
    if key not in _TRACES:
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = mx.compile(partial(_step, model, specs, cfg), inputs=model.state)
    return _TRACES[key]


def _decode(model, cfg, caches, first, left_padding, width, uniforms, max_tokens):
    """Run up to `max_tokens` steps; numpy tokens, log-probs, alive flags [N, steps], done [N]."""
    specs = tuple(_spec(c) for c in caches)
    is_kv = [kind == "kv" for s in specs for kind in _leaf_kinds(s)]
    state = [a for c in caches for a in _arrays(c)]
    token, done = first, mx.zeros(first.shape, dtype=mx.bool_)
    size, out = width, []
    for t in range(max_tokens):
        column = width + t
        if column >= size:  # grow the KV buffers: attention cost follows the columns in use
            size = -(-(column + 1) // BUCKET) * BUCKET
            state = [_pad_columns(a, size) if kv else a for a, kv in zip(state, is_kv)]
        idx = mx.array(column, dtype=mx.int32)
        if t == 0:  # eager: may allocate buffers (empty prefill) or initialise SSM states
            step = partial(_step, model, specs, cfg, size=size)
        else:
            step = _compiled_step(model, specs, cfg)
        token, logp, alive, done, state = step(token, state, left_padding, idx, uniforms[t], done)
        out.append((token, logp, alive))
        if (t + 1) % CHUNK == 0 or t + 1 == max_tokens:
            mx.eval(out[-CHUNK:], done, state)
            if done.all().item():
                break
    tokens, logps, alive = (np.array(mx.stack(col, axis=1)) for col in zip(*out))
    return tokens, logps, alive, np.array(done)


def _leaf_kinds(spec) -> list[str]:
    if spec[0] == "list":
        return [k for s in spec[1] for k in _leaf_kinds(s)]
    return ["arrays"] * spec[1] if spec[0] == "arrays" else ["kv", "kv"]


def _pad_columns(a, size):
    if a is None:
        return None
    return mx.pad(a, [(0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)])
