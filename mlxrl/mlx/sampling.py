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
- Decode: all N = B*G rows step together through one `mx.compile`d step over left-padded KV
  buffers written at a column index held in an array (`cache_utils.py`), so one trace serves
  every step and, per model and settings, later calls. The buffers grow `BUCKET` columns at a
  time (attention cost follows the columns in use; each width is traced once). Steps are queued
  lazily and evaluated every `CHUNK` steps, which is also when the host checks whether all rows
  are done (evaluating every step would also stop MLX from updating the buffers in place).
- Decode matmuls (Linux CPU, OpenBLAS; one place, `_decode_matmuls`): at decode's few rows
  OpenBLAS's threaded GEMM spends most of its time packing the weights and handing work between
  threads. Two remedies, by a fixed rule:
  - on a CPU with AVX-512 and <= 8 rows, matmuls are split into pieces of at most ~1200 rows x
    outputs and 1e6 multiply-adds: each piece takes OpenBLAS's small-matrix kernel, which reads
    the weights once, unpacked, on one core (8 x 512 x 1536: 0.22 ms instead of 0.30 on an idle
    2-core AVX-512 Xeon). That kernel is hand-written for AVX-512 only (`split_matmuls_at`).
  - otherwise, decode weights (`cpu_ops.set_decode_weights`): each linear's weight transposed
    once per call, `x @ W_T` instead of `x @ W.T`, with a LoRA adapter folded in, so a layer is
    one matmul instead of three (a second copy of the weights while sampling; see
    `set_decode_weights`). At <= 8 rows on one OpenBLAS thread (`_blas.threads`): a second
    thread costs more in hand-offs than it computes there, and takes a core from MLX's own
    thread (2-core EPYC, one process, interleaved: 8 rows 24.2 vs 27.5 ms a token on the 25M
    model, 118 vs 130 on SmolLM2; at 16 rows two threads win, 37.6 vs 42.0).
- Decode attention (CPU): `cpu_ops.masked_attention` over the decode caches, one fused softmax
  instead of MLX's SDPA fallback with its prebuilt one (`DecodeKVCache.fused_attention`).
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

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlxrl import _blas
from mlxrl._jit import cpu_flags
from mlxrl.mlx.cache_utils import CacheLayout, left_padding, repeat_rows
from mlxrl.mlx.cpu_ops import (
    DECODE_WEIGHT,
    SplittableEmbedding,
    SplittableLinear,
    clear_decode_weights,
    set_decode_weights,
)

CHUNK = 8  # decode steps queued between host syncs
BUCKET = 32  # KV buffers grow by this many columns
PAD_ID = 0
_MAX_TRACES = 8
SPLIT_MAX_ROWS = 8  # decode matmuls split up to this many rows (split_matmuls_at)
SPLITTABLE = (SplittableLinear, SplittableEmbedding)


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
    repetition_penalty: float = 1.0


def sample(model: nn.Module, prompts: list[list[int]], *, num_generations: int = 1,
           max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           min_p: float = 0.0, eos_token_ids, seed: int | None = None,
           repetition_penalty: float = 1.0) -> Rollout:
    """Sample `num_generations` completions of each prompt (token ids) with `model`.

    `repetition_penalty` (transformers' rule, applied before temperature): the logit of every
    token already in the row (prompt or completion) is divided by it when positive, multiplied
    when negative. It changes what is sampled, not the returned log-probs (still those of
    softmax(logits / T), which GRPO recomputes)."""
    eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
    cfg = _Settings(float(temperature), float(top_p), int(top_k), float(min_p), eos,
                    float(repetition_penalty))
    _validate(prompts, num_generations, max_tokens, cfg)
    start = time.perf_counter()
    G, N = num_generations, len(prompts) * num_generations
    caches, width = _prefill(model, prompts)
    first = mx.array([p[-1] for p in prompts for _ in range(G)], dtype=mx.int32)
    history = _history(prompts, G, max_tokens, cfg)
    with _decode_matmuls(model, N):
        tokens, logprobs, alive, done = _decode(
            model, cfg, [repeat_rows(c, G) for c in caches], first,
            mx.repeat(left_padding(caches, len(prompts)), G), width,
            mx.array(_uniforms(seed, N, max_tokens)), max_tokens, history)
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
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0 or not 0 <= cfg.min_p < 1 \
            or cfg.repetition_penalty <= 0:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                         f"0 <= min_p < 1 and repetition_penalty > 0, got {cfg}")


def _history(prompts, G: int, max_tokens: int, cfg: _Settings) -> tuple[mx.array, int] | None:
    """For a repetition penalty: [N, P + max_tokens] token ids of each row, the prompt first and
    the completion written at column P + t; unused columns repeat the row's first token (a
    duplicate index changes nothing). None without a penalty."""
    if cfg.repetition_penalty == 1.0:
        return None
    width = max(map(len, prompts))
    rows = np.empty((len(prompts) * G, width + max_tokens), dtype=np.int32)
    for i, p in enumerate(prompts):
        rows[i * G:(i + 1) * G] = p[0]
        rows[i * G:(i + 1) * G, :len(p)] = p
    return mx.array(rows), width


def _uniforms(seed: int | None, rows: int, steps: int) -> np.ndarray:
    """[steps, rows] float32 in (0, 1]; row r's stream depends on (seed, r) only."""
    seed = np.random.SeedSequence().entropy if seed is None else int(seed) % 2**64
    u = [1.0 - np.random.default_rng([seed, r]).random(steps) for r in range(rows)]
    return np.stack(u, axis=1).astype(np.float32)


def _prefill(model: nn.Module, prompts: list[list[int]]):
    """mlx-lm batch caches holding `prompt[:-1]` of every prompt, left-padded; and their width."""
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


# ----------------------------------------------------------------------------- decode


def _decode(model, cfg, caches, first, left_pad, width, uniforms, max_tokens, history=None):
    """Run up to `max_tokens` steps; numpy tokens, log-probs, alive flags [N, steps], done [N]."""
    layout = CacheLayout.of(caches)
    state = layout.flatten(caches)
    token, done = first, mx.zeros(first.shape, dtype=mx.bool_)
    compiled = _compiled_step(model, layout, cfg)
    size, out = width, []
    seen, prompt_width = history if history is not None else (mx.zeros((first.shape[0], 1), mx.int32), 0)
    for t in range(max_tokens):
        column = width + t
        if column >= size:
            size = -(-(column + 1) // BUCKET) * BUCKET
            state = layout.grow(state, size)
        step = compiled
        if any(a is None for a in state):  # empty prefill: the eager step allocates the state
            step = partial(_step, model, layout, cfg, size=size)
        idx = mx.array(column, dtype=mx.int32)
        token, logp, alive, done, state = step(token, state, left_pad, idx, uniforms[t], done, seen)
        if history is not None:  # the sampled token joins the row's history
            seen = mx.where(mx.arange(seen.shape[1]) == prompt_width + t, token[:, None], seen)
        out.append((token, logp, alive))
        if (t + 1) % CHUNK == 0 or t + 1 == max_tokens:
            mx.eval(out[-CHUNK:], done, state)
            if done.all().item():
                break
    tokens, logps, alive = (np.array(mx.stack(col, axis=1)) for col in zip(*out))
    return tokens, logps, alive, np.array(done)


def _step(model, layout: CacheLayout, cfg: _Settings, tokens, state, left_pad, idx, u, done,
          seen, size=None):
    """One decode step for all rows, writing column `idx`: returns the sampled tokens, their
    log-probs, which rows were still alive, the new done flags and the new cache arrays."""
    caches = layout.build(state, left_pad, idx, size)
    logits = model(tokens[:, None], cache=caches)[:, -1, :].astype(mx.float32)
    token, logp = _sample_token(logits, u, cfg, _penalized(logits, seen, cfg.repetition_penalty))
    alive = mx.logical_not(done)
    token = mx.where(alive, token, PAD_ID)
    logp = mx.where(alive, logp, 0.0)
    if cfg.eos:
        done = done | (token[:, None] == mx.array(cfg.eos, dtype=token.dtype)).any(axis=1)
    return token, logp, alive, done, layout.flatten(caches)


_TRACES: dict = {}


def _compiled_step(model, layout: CacheLayout, cfg: _Settings):
    """The compiled step for this model, cache layout and settings, traced once and kept.

    A trace bakes in Python values (module classes, `training`, a LoRA `scale`, the layers'
    switches: adapter on/off, split matmuls), so they are part of the key; the weights are
    implicit inputs, so optimizer updates need no retrace.
    """
    modules = tuple((name, type(m), m.training, DECODE_WEIGHT in m,
                     *(_python_scalar(getattr(m, a, None)) for a in _TRACED))
                    for name, m in model.named_modules())
    key = (id(model), layout, cfg, modules)
    if key not in _TRACES:
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = mx.compile(partial(_step, model, layout, cfg), inputs=model.state)
    return _TRACES[key]


_TRACED = ("scale", "adapter_enabled", "split_matmul")


def _python_scalar(value):
    return value if isinstance(value, (int, float)) else None


def _penalized(logits, seen, penalty: float):
    """transformers' RepetitionPenaltyLogitsProcessor over the ids in `seen` ([N, K])."""
    if penalty == 1.0:
        return logits
    old = mx.take_along_axis(logits, seen, axis=-1)
    return mx.put_along_axis(logits, seen, mx.where(old < 0, old * penalty, old / penalty), axis=-1)


def _sample_token(logits, u, cfg: _Settings, sampling_logits=None):
    """Token per row and its log-prob under softmax(logits / T), T = 1 when greedy. The token is
    drawn from `sampling_logits` (the penalized logits) when given."""
    if sampling_logits is not None and sampling_logits is not logits:
        token, _ = _sample_token(sampling_logits, u, cfg)
        z = logits / cfg.temperature if cfg.temperature not in (0.0, 1.0) else logits
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
        return token, (mx.take_along_axis(z, token[:, None], axis=-1) - lse).squeeze(-1)
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



# ----------------------------------------------------------------------------- small matmuls


def split_matmuls_at(rows: int) -> bool:
    """The rule for splitting decode matmuls: at <= 8 rows, where OpenBLAS has hand-written
    small-matrix kernels (`_small_kernels`). 8 x 512 x 1536 took 0.22 ms split vs 0.30 ms on an
    idle 2-core AVX-512 Xeon (0.24 vs ~1 ms under load), but 0.94 vs 0.70 ms on a 2-core AVX2
    EPYC; above 8 rows the small-matrix kernel (one core) loses its edge over the threaded GEMM
    on a quiet machine."""
    return rows <= SPLIT_MAX_ROWS and _small_kernels()


@functools.cache
def _small_kernels() -> bool:
    """OpenBLAS's small-matrix sgemm kernels are hand-written for AVX-512 (SkylakeX:
    kernel/x86_64/sgemm_small_kernel_*_skylakex.c, permitted up to 1e6 multiply-adds); on other
    x86 targets its small-matrix path is generic C, slower than its threaded GEMM. So: the Linux
    CPU device (OpenBLAS bound) on a CPU with AVX-512."""
    avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"}
    return _openblas_cpu() and avx512 <= cpu_flags()


@contextlib.contextmanager
def _decode_matmuls(model: nn.Module, rows: int):
    """Within the block, the decode's matmuls on the Linux CPU (OpenBLAS): split when
    `split_matmuls_at(rows)`, else from decode weights (`cpu_ops.set_decode_weights`), on one
    OpenBLAS thread at <= 8 rows. Elsewhere (a GPU, macOS) nothing changes."""
    if not _openblas_cpu():
        yield
        return
    if split_matmuls_at(rows):
        layers = [m for _, m in model.named_modules() if isinstance(m, SPLITTABLE)]
        for m in layers:
            m.split_matmul = True
        try:
            yield
        finally:
            for m in layers:
                m.split_matmul = False
        return
    layers = set_decode_weights(model)
    try:
        with _blas.threads(1) if layers and rows <= SPLIT_MAX_ROWS else contextlib.nullcontext():
            yield
    finally:
        clear_decode_weights(layers)


def _openblas_cpu() -> bool:
    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu
