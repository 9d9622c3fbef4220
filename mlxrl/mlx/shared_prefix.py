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

Packed suffixes (`pack=True`, `worth_packing`): right padding makes every row as long as the
longest, and on DPO's long pairs 11% of the suffix columns were padding. Packed, the suffixes'
tokens run through the model as one batch of single-token rows `[T, 1]` (T, the real tokens,
rounded up to `TOKEN_BUCKET`), each with its own position (`offset`), so the linear layers and
norms only see real tokens; attention alone unpacks queries, keys and values to the `[N, Ls]`
layout and packs its output back (`PackedSuffixKV.attend`, called by mlxrl's CPU attention,
`cpu_ops`). The tuple gains six arrays (`_packing`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxrl.mlx.trainer import bucket

SAVING = 0.9  # share when the shared rows are at most this fraction of the plain batch's tokens
PACK_SAVING = 0.95  # pack when the packed tokens are at most this fraction of the suffix columns
TOKEN_BUCKET = 32  # packed tokens round up to a multiple of this (few compiled shapes)


def shared_rows(prompts: list[list[int]], suffixes: list[list[int]], row_prefix: list[int],
                suffix_width: int, pack: bool = False) -> tuple:
    """The tuple for rows `prompts[row_prefix[r]] + suffixes[r]`: each prompt without its last
    token, left-padded with 0 to `_prefix_width`; each row's suffix (its prompt's last token,
    then its own tokens), right-padded with 0 to `suffix_width`; with `pack`, the suffixes
    packed as well (`_packing`)."""
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
    rows = mx.array(prefix), mx.array(pad), mx.array(row_prefix, dtype=mx.int32), mx.array(suffix)
    if not pack:
        return rows
    return rows + _packing(suffix, suffixes, [len(heads[i]) for i in row_prefix])


def _packing(suffix: np.ndarray, suffixes: list[list[int]], offsets: list[int]) -> tuple:
    """The suffixes' body tokens (row r's first `len(suffixes[r])` columns: the last is only a
    target) packed: (tokens [T], positions [T], slot of each token [T] in the `[N * Ls']` layout
    (Ls' = Ls - 1), 1.0 on real tokens [T], token of each slot [N * Ls'], 1.0 on real slots
    [N * Ls']). Tokens past the real ones are id 0 at position 0 and read slot 0; empty slots
    read token 0; the 1.0 arrays zero both wherever it matters."""
    rows, width = suffix.shape[0], suffix.shape[1] - 1
    lengths = [len(s) for s in suffixes]
    real, count = sum(lengths), packed_columns(suffixes)
    tokens, positions, slots = (np.zeros(count, dtype=np.int32) for _ in range(3))
    token_of_slot = np.zeros(rows * width, dtype=np.int32)
    slot_real = np.zeros(rows * width, dtype=np.float32)
    t = 0
    for r, (n, offset) in enumerate(zip(lengths, offsets)):
        tokens[t:t + n] = suffix[r, :n]
        positions[t:t + n] = offset + np.arange(n)
        slots[t:t + n] = r * width + np.arange(n)
        token_of_slot[r * width:r * width + n] = t + np.arange(n)
        slot_real[r * width:r * width + n] = 1.0
        t += n
    token_real = (np.arange(count) < real).astype(np.float32)
    return tuple(mx.array(a) for a in (tokens, positions, slots, token_real, token_of_slot, slot_real))


def worth_sharing(model: nn.Module, prompts: list[list[int]], rows: int, plain_width: int,
                  suffix_width: int, suffix_columns: int | None = None) -> bool:
    """Whether `rows` rows over these prompts cost at most `SAVING` of the plain batch's tokens
    shared, on a model that can share (see the module's docstring). `suffix_columns`: what the
    suffixes cost packed (`packed_columns`), where they would be."""
    from mlxrl.mlx.logprobs import body_then_head

    if not body_then_head(model) or not prompts or min(map(len, prompts)) < 1:
        return False
    if any(getattr(layer, "grad_checkpoint", False) for layer in model.layers):
        return False
    if model.training and any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()):
        return False  # chosen and rejected would share the prompt's dropout mask
    if max(map(len, prompts)) < 2:
        return False  # no prompt has a token before its last: nothing to share
    if suffix_columns is None:
        suffix_columns = rows * (suffix_width - 1)  # the body's columns
    shared = len(prompts) * _prefix_width(prompts) + suffix_columns
    return shared <= SAVING * rows * (plain_width - 1)


def layout(model: nn.Module, prompts: list[list[int]], suffixes: list[list[int]], rows: int,
           plain_width: int, suffix_width: int) -> tuple[bool, bool]:
    """(share, pack): whether `rows` rows over `prompts` with these suffixes run with each prompt
    once (`worth_sharing`, judged on what the suffixes cost packed where they would be), and
    whether their suffixes pack (`worth_packing`; read only when they share)."""
    pack = worth_packing(model, suffixes, suffix_width)
    body = packed_columns(suffixes) if pack else None
    return worth_sharing(model, prompts, rows, plain_width, suffix_width, body), pack


def worth_packing(model: nn.Module, suffixes: list[list[int]], suffix_width: int) -> bool:
    """Whether to pack these suffixes (`shared_rows(pack=True)`): mlxrl's attention serves this
    model (`cpu_ops.attends`), only LoRA matrices train (a trained base weight's gradient over
    `[T, 1]` rows would be T outer products), and the packed tokens are at most `PACK_SAVING`
    of the padded suffix columns."""
    from mlx.utils import tree_flatten

    from mlxrl.mlx.cpu_ops import attends

    if packed_columns(suffixes) > PACK_SAVING * len(suffixes) * (suffix_width - 1) or not attends(model):
        return False  # the cheap tests first: flattening the parameters costs ~1 ms a batch
    return all(name.endswith((".lora_a", ".lora_b")) for name, _ in tree_flatten(model.trainable_parameters()))


def packed_columns(suffixes: list[list[int]]) -> int:
    """The tokens packed suffixes run: their body tokens (one per suffix token: the prompt's
    last, then all but the last) rounded up to `TOKEN_BUCKET`."""
    return bucket(sum(map(len, suffixes)), TOKEN_BUCKET)


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


class PackedSuffixKV(SharedPrefixKV):
    """`SharedPrefixKV` whose second call gets the packed suffixes (`[T, heads, 1, D]`): their
    keys and values are unpacked to `[N, heads, Ls - 1, D]` after the prompt's, and `attend`
    does the attention of the packed queries."""

    def __init__(self, pad: mx.array, row_prefix: mx.array, width: int, packing: tuple, rows: int):
        super().__init__(pad, row_prefix, width)
        self.positions, self.slots, self.token_real, self.token_of_slot, self.slot_real = packing[1:]
        self.rows, self.columns = rows, self.token_of_slot.shape[0] // rows

    @property
    def offset(self):
        """The prompt's positions as in `SharedPrefixKV`, then each packed token's own."""
        return -self.pad if self.keys is None else self.positions

    def update_and_fetch(self, keys, values):
        self.packed_call = self.keys is not None
        if not self.packed_call:
            return super().update_and_fetch(keys, values)
        return (mx.concatenate([self.keys, self._unpack(keys)], axis=2),
                mx.concatenate([self.values, self._unpack(values)], axis=2))

    def make_mask(self, n: int, window_size=None, **kwargs):
        """The prompt's mask, then the rows' `[N, 1, Ls - 1, keys]` mask (n is 1: one packed
        token a row)."""
        return super().make_mask(n if self.keys is None else self.columns, window_size=window_size)

    def attend(self, queries, keys, values, scale: float, mask):
        """Attention of packed queries `[T, H, 1, D]` in the rows' layout, packed back (the
        prompts' call: of their rows as they are)."""
        from mlxrl.mlx.cpu_ops import masked_attention

        rows = self._unpack(queries) if self.packed_call else queries
        if rows.dtype == mx.float32 and rows.shape[1] % keys.shape[1] == 0:
            out = masked_attention(rows, keys, values, scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(rows, keys, values, scale=scale, mask=mask)
        if not self.packed_call:
            return out
        heads, dim = out.shape[1], out.shape[3]
        packed = self.to_tokens(out.transpose(0, 2, 1, 3).reshape(-1, heads * dim))
        return packed.reshape(-1, 1, heads, dim).transpose(0, 2, 1, 3)

    def to_slots(self, x):
        """[T, F] packed -> [N * (Ls - 1), F], zeros on padding."""
        return _gather_rows(x, self.token_of_slot, self.slot_real, self.slots, self.token_real)

    def to_tokens(self, y):
        """[N * (Ls - 1), F] -> [T, F] packed, zeros past the real tokens."""
        return _gather_rows(y, self.slots, self.token_real, self.token_of_slot, self.slot_real)

    def _unpack(self, x):
        """[T, heads, 1, D] packed -> [N, heads, Ls - 1, D]."""
        tokens, heads, _, dim = x.shape
        flat = self.to_slots(x.reshape(tokens, heads * dim))
        return flat.reshape(self.rows, self.columns, heads, dim).transpose(0, 2, 1, 3)


@mx.custom_function
def _gather_rows(x, index, keep, back_index, back_keep):
    """`x`'s rows at `index`, zeroed where `keep` is 0: packing (slots -> tokens) and unpacking
    (tokens -> slots). Each is the other's gradient, the same gather the other way round: a real
    token has one slot, and padding tokens and slots get zeros, so nothing flows through them."""
    return mx.take(x, index, axis=0) * keep[:, None]


@_gather_rows.vjp
def _gather_rows_vjp(primals, cotangent, output):
    _, index, keep, back_index, back_keep = primals
    return _gather_rows(cotangent, back_index, back_keep, index, keep), None, None, None, None


def shared_hidden(model: nn.Module, rows: tuple) -> mx.array:
    """The body's last hidden states `[N, Ls - 1, D]` of the rows' suffixes but their last
    column (only a target); zeros on padding when the suffixes are packed."""
    prefix_ids, pad, row_prefix, suffix_ids = rows[:4]
    if len(rows) == 4:
        caches = [SharedPrefixKV(pad, row_prefix, prefix_ids.shape[1]) for _ in model.layers]
        model.model(prefix_ids, cache=caches)  # only its keys and values are used
        return model.model(suffix_ids[:, :-1], cache=caches)
    n = suffix_ids.shape[0]
    caches = [PackedSuffixKV(pad, row_prefix, prefix_ids.shape[1], rows[4:], n) for _ in model.layers]
    model.model(prefix_ids, cache=caches)
    hidden = model.model(rows[4][:, None], cache=caches)[:, 0]  # [T, D]
    return caches[0].to_slots(hidden).reshape(n, caches[0].columns, -1)
