"""Rows that share a prompt, forwarded with the prompt once: DPO's chosen and rejected answers,
GRPO's G completions of one prompt.

A plain batch runs every row's prompt through the model again. Here the rows of one prompt
share it: the prompts without their last token (the prefix) run once, left-padded, filling each
layer's keys and values; every row then runs only its suffix (its prompt's last token and its
completion), attending to its prompt's keys and values and to its own suffix. The suffix's
logits are the log-probs of the completion, the same as the plain batch's up to float rounding,
and the gradient reaches the prefix through the keys and values of every row that reads them.
On short-row DPO, mostly prompt, that is most of the repeated work.

Rows are a tuple `(prefix_ids [P, Lp], prefix_pad [P], row_prefix [N], suffix_ids [N, Ls])`
(`shared_rows`), which `mlxrl.mlx.logprobs` takes wherever it takes a token array; the masks
that go with them are `[N, Ls]`, column 0 (the prompt's last token) off, so `scored_from` is 0.
It needs an architecture whose body and head run apart (`logprobs.BODY_THEN_HEAD`: attention
layers with a KV cache), no gradient checkpointing, and no dropout while training (the rows of
a prompt would share its dropout mask); `worth_sharing` says when to use it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxrl.mlx.trainer import bucket

SAVING = 0.9  # share when the shared rows are at most this fraction of the plain batch's tokens


def shared_rows(prompts: list[list[int]], suffixes: list[list[int]], row_prefix: list[int],
                suffix_width: int) -> tuple:
    """The tuple for rows `prompts[row_prefix[r]] + suffixes[r]`: each prompt without its last
    token, left-padded with 0 to `_prefix_width`; each row's suffix (its prompt's last token,
    then its own tokens), right-padded with 0 to `suffix_width`."""
    heads = [p[:-1] for p in prompts]
    width = _prefix_width(prompts)
    prefix = np.zeros((len(heads), width), dtype=np.int32)
    for i, h in enumerate(heads):
        prefix[i, width - len(h):] = h
    suffix = np.zeros((len(suffixes), suffix_width), dtype=np.int32)
    for r, s in enumerate(suffixes):
        suffix[r, 0] = prompts[row_prefix[r]][-1]
        suffix[r, 1:1 + len(s)] = s
    pad = np.array([width - len(h) for h in heads], dtype=np.int32)
    return mx.array(prefix), mx.array(pad), mx.array(row_prefix, dtype=mx.int32), mx.array(suffix)


def worth_sharing(model: nn.Module, prompts: list[list[int]], rows: int, plain_width: int,
                  suffix_width: int) -> bool:
    """Whether `rows` rows over these prompts cost at most `SAVING` of the plain batch's tokens
    shared, on a model that can share (see the module's docstring)."""
    from mlxrl.mlx.logprobs import body_then_head

    if not body_then_head(model) or not prompts or min(map(len, prompts)) < 1:
        return False
    if any(getattr(layer, "grad_checkpoint", False) for layer in model.layers):
        return False
    if model.training and any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()):
        return False  # chosen and rejected would share the prompt's dropout mask
    if max(map(len, prompts)) < 2:
        return False  # no prompt has a token before its last: nothing to share
    shared = len(prompts) * _prefix_width(prompts) + rows * (suffix_width - 1)  # the body's columns
    return shared <= SAVING * rows * (plain_width - 1)


def _prefix_width(prompts: list[list[int]]) -> int:
    """The prefix columns: the longest prompt less its last token, bucketed (few compiled shapes)."""
    return bucket(max(map(len, prompts)) - 1)


class SharedPrefixKV:
    """One layer's keys and values: the prefix's (first call, P rows), then each row's suffix
    appended to its prompt's (later call, N rows). `fused_attention` lets mlxrl's CPU attention
    take it (`cpu_ops`)."""

    fused_attention = True

    def __init__(self, pad: mx.array, row_prefix: mx.array, width: int):
        self.pad, self.row_prefix, self.width = pad, row_prefix, width
        self.keys = self.values = None

    @property
    def offset(self):
        """Each row's position at its first column: a prompt's first token is at 0."""
        if self.keys is None:
            return -self.pad
        return self.width - self.pad[self.row_prefix]

    def update_and_fetch(self, keys, values):
        if self.keys is None:  # the prefix: kept, one row per prompt, then given to its rows
            self.keys = mx.take(keys, self.row_prefix, axis=0)
            self.values = mx.take(values, self.row_prefix, axis=0)
            return keys, values
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))

    def make_mask(self, n: int, window_size=None, **kwargs):
        """[rows, 1, n, keys] True where a query may attend: not the left padding of its prompt,
        not a later column. A padding query also sees itself, so that no row of the softmax is
        empty (its output is never read)."""
        if window_size is not None:
            raise NotImplementedError("shared-prefix rows do not take a sliding window")
        column = mx.arange(n)
        causal = column[None, :] <= column[:, None]
        if self.keys is None:
            real = column[None, :] >= self.pad[:, None]  # [P, n] keys that are not padding
            visible = (causal[None] & real[:, None, :]) | (column[None, :] == column[:, None])[None]
            return visible[:, None]
        rows = self.row_prefix.shape[0]
        prompt = mx.arange(self.width)[None, :] >= self.pad[self.row_prefix][:, None]  # [N, Lp]
        prompt = mx.broadcast_to(prompt[:, None, :], (rows, n, self.width))
        own = mx.broadcast_to(causal[None], (rows, n, n))
        return mx.concatenate([prompt, own], axis=-1)[:, None]


def shared_hidden(model: nn.Module, rows: tuple) -> mx.array:
    """The body's last hidden states `[N, Ls - 1, D]` of the rows' suffixes but their last
    column (only a target)."""
    prefix_ids, pad, row_prefix, suffix_ids = rows
    caches = [SharedPrefixKV(pad, row_prefix, prefix_ids.shape[1]) for _ in model.layers]
    model.model(prefix_ids, cache=caches)  # only its keys and values are used
    return model.model(suffix_ids[:, :-1], cache=caches)
