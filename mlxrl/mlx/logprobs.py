"""Per-token log-probabilities of a causal LM, as TRL computes them.

Entry `[b, t]` of `per_token_logps` is the log-probability the model gives token `t + 1` after
seeing tokens `0..t`: `log softmax(logits[b, t] / T)[input_ids[b, t + 1]]`. It is computed as
`logit[target] - logsumexp(logits)` in float32 (TRL's `selective_log_softmax` for fp32), so no
full-vocabulary log-softmax array is built on top of the logits.

Rows are right-padded. mlx-lm models apply a causal mask only, so padding after a row's last real
token cannot change the log-probs of its real tokens; callers mask padding and prompt tokens out
with `completion_mask[:, 1:]`.
"""

import mlx.core as mx
import mlx.nn as nn


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
    if isinstance(input_ids, tuple):
        from mlxrl.mlx.shared_prefix import shared_hidden

        return _head(model, shared_hidden(model, input_ids)[:, start:])
    if body_then_head(model):
        return _head(model, model.model(input_ids[:, :-1])[:, start:])
    return model(input_ids[:, :-1])[:, start:, :]


def _head(model: nn.Module, hidden: mx.array) -> mx.array:
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


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
    `model`, from position `start` on (entry `[b, t]` scores token `start + t + 1`)."""
    logits = next_token_logits(model, input_ids, start)
    return token_logps_from_logits(logits, targets(input_ids, start), temperature)


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
