"""Per-token log-probabilities of a causal LM, as TRL computes them.

Entry `[b, t]` of `per_token_logps` is the log-probability the model gives token `t + 1` after
seeing tokens `0..t`: `log softmax(logits[b, t] / T)[input_ids[b, t + 1]]`. It is computed as
`logit[target] - logsumexp(logits)` in float32 (TRL's `selective_log_softmax` for fp32), so no
full-vocabulary log-softmax array is built on top of the logits.

Rows are right-padded. mlx-lm models apply a causal mask only, so padding after a row's last real
token cannot change the log-probs of its real tokens; callers mask padding and prompt tokens out
with `completion_mask[:, 1:]`.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# Above HEAD_CHUNKED_ABOVE bytes of float32 logits, the LM head's log-probs run in chunks of
# positions (`head_logps`) whose logits take about HEAD_CHUNK_BYTES, and of at least
# HEAD_CHUNK_MIN_ROWS positions (each chunk reads the whole head again, so it must do enough work
# per weight read). A plain log-softmax keeps the [positions, vocabulary] logits for its backward,
# and its peak is about twice them: 2.5 GB for 2,048 positions of Qwen's 151,936-token vocabulary.
# A chunk's peak is ~5-7 times its logits, whatever the positions. The backward computes each
# chunk's logits again: on SmolLM2, 1,024 positions took 12% longer for 20% less peak memory,
# so below the threshold the plain log-softmax runs.
HEAD_CHUNKED_ABOVE = 512 * 2**20
HEAD_CHUNK_BYTES = 64 * 2**20
HEAD_CHUNK_MIN_ROWS = 128


def token_logps_from_logits(
    logits: mx.array, targets: mx.array, temperature: float = 1.0
) -> mx.array:
    """Log-probability of `targets` under `softmax(logits / temperature)`, in float32.

    `logits` is `[..., V]` and `targets` the integer ids `[...]` (same leading shape). Used by
    `per_token_logps` for teacher-forced scoring and by the sampler for the token it just drew.
    """
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1)
    return picked.squeeze(-1) - mx.logsumexp(logits, axis=-1)


# Architectures whose mlx-lm Model is `head(self.model(ids))`: their body and head can run
# apart, so the head (the [tokens, vocabulary] matmul and its log-softmax) runs only on the
# positions that are scored. Others compute every position's logits and slice them.
BODY_THEN_HEAD = ("qwen2", "qwen3", "llama")


def body_then_head(model: nn.Module) -> bool:
    """Whether `model`'s architecture is one of `BODY_THEN_HEAD`."""
    return type(model).__module__.rsplit(".", 1)[-1] in BODY_THEN_HEAD


def next_token_logits(model: nn.Module, input_ids, start: int = 0) -> mx.array:
    """Logits `[B, L-1-start, V]` at positions `start..L-2` (those predicting tokens
    `start+1..L-1`). DPO's prompts are most of a short row, and a real model's vocabulary makes
    the head the largest matmul: `start` skips the head on prompt positions that are never scored
    (TRL's `use_logits_to_keep`). The last column is only a target: the model never reads it
    (`trainer.row_width`). `input_ids` may be rows that share prompts (`mlxrl.mlx.shared_prefix`,
    a tuple): then the positions are their suffixes'."""
    hidden = next_token_hidden(model, input_ids, start)
    if hidden is None:
        return model(input_ids[:, :-1])[:, start:, :]
    return _head(model, hidden)


def next_token_hidden(model: nn.Module, input_ids, start: int = 0) -> mx.array | None:
    """The body's output `[B, L-1-start, D]` that `next_token_logits` puts through the head;
    None for architectures whose body and head do not run apart (not `BODY_THEN_HEAD`)."""
    if isinstance(input_ids, tuple):
        from mlxrl.mlx.shared_prefix import shared_hidden

        return shared_hidden(model, input_ids)[:, start:]
    if body_then_head(model):
        return model.model(input_ids[:, :-1])[:, start:]
    return None


def _head(model: nn.Module, hidden: mx.array) -> mx.array:
    module, call = _head_parts(model)
    return call(module)(hidden)


def _head_parts(model: nn.Module):
    """The module holding the head's weights, and how to call it on hidden states."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens, lambda module: module.as_linear
    return model.lm_head, lambda module: module


def head_logps(model: nn.Module, hidden: mx.array, targets: mx.array,
               temperature: float = 1.0) -> mx.array:
    """`token_logps_from_logits(head(hidden), targets, temperature)`, `[B, L]`, without keeping
    `[B, L, V]` logits: when they would take more than `HEAD_CHUNKED_ABOVE` bytes, the head and
    its log-softmax run chunk by chunk (`HEAD_CHUNK_BYTES`, `HEAD_CHUNK_MIN_ROWS`), forward and
    (recomputed) backward, in a custom VJP: the fused linear cross-entropy idea. Where the head
    itself trains (a full fine-tune, an adapter on the head), the plain computation runs: the
    custom VJP gives the head's weights no gradient."""
    module, call = _head_parts(model)
    vocab = model.args.vocab_size
    rows = max(HEAD_CHUNK_BYTES // (4 * vocab), HEAD_CHUNK_MIN_ROWS)
    B, L, D = hidden.shape
    if B * L * vocab * 4 <= HEAD_CHUNKED_ABOVE or B * L <= rows \
            or tree_flatten(module.trainable_parameters()):
        return token_logps_from_logits(call(module)(hidden), targets, temperature)
    names, weights = zip(*tree_flatten(module.parameters()))
    head = partial(_head_with, module, call, names)
    chunked = _chunked_logps(head, rows, temperature)
    return chunked(hidden.reshape(B * L, D), targets.reshape(B * L), *weights).reshape(B, L)


def _head_with(module: nn.Module, call, names, weights, hidden: mx.array) -> mx.array:
    """The head's float32 logits with `weights` (arrays named `names`) as its parameters: a
    custom function must take every array it reads as an input, or a compiled trace would hold
    a stale one."""
    saved = module.parameters()
    module.update(tree_unflatten(list(zip(names, weights))))
    try:
        return call(module)(hidden).astype(mx.float32)
    finally:
        module.update(saved)


def _chunked_logps(head, rows: int, temperature: float):
    """A custom function `(hidden [N, D], targets [N], *head weights) -> log-probs [N]` that
    runs `head(weights, hidden)` on chunks of `rows` positions, one after the other."""

    def logits(weights, h):
        z = head(weights, h)
        return z / temperature if temperature != 1.0 else z

    def chunks(n: int):
        return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]

    @mx.custom_function
    def logps(hidden, targets, *weights):
        out = []
        for c in chunks(hidden.shape[0]):
            out.append(token_logps_from_logits(logits(weights, _after(hidden[c], out)), targets[c]))
        return mx.concatenate(out)

    @logps.vjp
    def logps_vjp(primals, cotangent, output):
        hidden, targets, *weights = primals
        grads = []
        for c in chunks(hidden.shape[0]):
            h = _after(hidden[c], grads)
            z = logits(weights, h)
            onehot = mx.arange(z.shape[-1])[None, :] == targets[c][:, None]
            dz = cotangent[c][:, None] * (onehot - mx.softmax(z, axis=-1))
            if temperature != 1.0:
                dz = dz / temperature
            grads.append(mx.vjp(partial(head, weights), [h], [dz])[1][0])
        return (mx.concatenate(grads), mx.zeros_like(targets), *map(mx.zeros_like, weights))

    return logps


def _after(chunk: mx.array, done: list) -> mx.array:
    """`chunk`, computed only after the last of `done`: MLX would otherwise be free to run every
    chunk's head at once, and their logits would all be alive together."""
    return mx.depends(chunk, done[-1]) if done else chunk


def targets(input_ids, start: int = 0) -> mx.array:
    """The tokens `next_token_logits(model, input_ids, start)` predicts."""
    return _row_tokens(input_ids)[:, start + 1:]


def _row_tokens(input_ids) -> mx.array:
    """The token array whose positions the log-probs follow: shared rows' suffixes."""
    return input_ids[3] if isinstance(input_ids, tuple) else input_ids


def first_scored_position(masks: list[list[int]], multiple: int = 8) -> int:
    """The first position whose next-token log-prob a loss reads, for rows whose completion
    masks are `masks` (position t scores token t + 1), rounded down to a multiple of 8 so that a
    compiled step sees few shapes. Callers drop the mask's columns before it; `scored_from`
    recovers it from the shapes."""
    first = min((m.index(1) for m in masks if 1 in m), default=0)  # the earliest completion token
    return multiple * (max(first - 1, 0) // multiple)


def scored_from(input_ids, mask: mx.array) -> int:
    """The start position of a mask trimmed by `first_scored_position` (0 for shared rows)."""
    return _row_tokens(input_ids).shape[1] - mask.shape[1]


def per_token_logps(model: nn.Module, input_ids: mx.array, temperature: float = 1.0,
                    start: int = 0) -> mx.array:
    """`[B, L-1-start]` float32 log-probs of each next token of `input_ids` `[B, L]` under
    `model`, from position `start` on (entry `[b, t]` scores token `start + t + 1`). Where body
    and head run apart, the head's log-softmax runs in chunks when its logits would be large
    (`head_logps`)."""
    hidden = next_token_hidden(model, input_ids, start)
    if hidden is None:  # the whole model's logits
        return token_logps_from_logits(next_token_logits(model, input_ids, start),
                                       targets(input_ids, start), temperature)
    return head_logps(model, hidden, targets(input_ids, start), temperature)


def per_token_logps_and_log_sum_sq(model: nn.Module, input_ids: mx.array,
                                   start: int = 0) -> tuple[mx.array, mx.array]:
    """`per_token_logps` and, at the same positions, `log sum_v p_v^2` of the next-token
    distribution without gradient (what TRL's fused LM head gives WPO's `use_weighting`)."""
    logits = next_token_logits(model, input_ids, start).astype(mx.float32)
    log_z = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets(input_ids, start)[..., None].astype(mx.int32), axis=-1)
    log_sum_sq = mx.logsumexp(2.0 * logits, axis=-1) - 2.0 * log_z
    return picked.squeeze(-1) - log_z, mx.stop_gradient(log_sum_sq)


def sequence_logps(model: nn.Module, input_ids: mx.array, completion_mask: mx.array) -> mx.array:
    """`[B]` summed log-probs of the completion tokens (DPO's sequence score, no temperature).

    `completion_mask` `[B, L]` marks completion tokens of `input_ids` (or `[B, L - s]` without its
    first `s` columns, `first_scored_position`); token `t + 1` is scored by position `t`, hence
    the shift.
    """
    token_logps = per_token_logps(model, input_ids, start=scored_from(input_ids, completion_mask))
    return (token_logps * completion_mask[:, 1:].astype(mx.float32)).sum(axis=-1)
