"""GRPO's advantages and per-micro-batch loss, as TRL 1.16's `GRPOTrainer` computes them.

Each prompt gets G sampled completions (rows `i*G .. i*G+G-1`). Their summed rewards become
advantages within the group: `A = (r - mean_group) / (std_group + 1e-4)` with the unbiased (n-1)
std, NaN rewards skipped and NaN advantages set to 0. Per completion token, with the importance
weight `ratio = exp(logp - logp_old)` against the policy that sampled (not the reference), a
`loss_type` (`GRPO_LOSS_TYPES`) picks three things:

- the policy term per token (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`: PPO's clipped surrogate
  `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`, the ratio capped at `delta` when set;
  `cispo`: `-sg(min(ratio, eps_high)) * A * logp`; `sapo`: the soft gate
  `-sigmoid(tau * (ratio - 1)) * 4 / tau * A`, tau by the sign of A; `vespo`:
  `-sg(phi(w)) * A * logp` with VESPO's gamma weight of the sequence ratio `w`);
- how the masked per-token losses become the micro-batch's loss (`grpo`, `sapo`: mean over each
  row's tokens, then over rows; `bnpo`: mean over the micro-batch's tokens; `dr_grpo`: sum over
  rows x max_completion_length; `dapo`, `cispo`, `vespo`: sum over the loss tokens of the whole
  accumulation window, so accumulation needs no extra division; `luspo`: sum per row, mean over
  rows); all but the window ones divide by the accumulation steps;
- its metrics (`clip_ratio/*`, `cispo_clip_ratio`, `vespo/phi_seq_mean`), named as TRL's.

With `beta != 0` the k3 KL `exp(ref - logp) - (ref - logp) - 1` is added per token, multiplied by
the ratio when `use_bias_correction_kl` (TRL's default). `importance_sampling_level="sequence"`
(GSPO) replaces the per-token ratio by the exp of the row's masked mean log-ratio.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

ADVANTAGE_EPS = 1e-4


def _scale_mode(scale_rewards: str | bool) -> str:
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return scale_rewards


def group_advantages(
    rewards: np.ndarray, num_generations: int, scale_rewards: str | bool = "group"
) -> np.ndarray:
    """`[N]` float32 advantages of `[N]` rewards, groups of `num_generations` consecutive rows.

    The mean is always per group (nanmean). `scale_rewards`: "group" (or True) divides by the
    group's n-1 nanstd + 1e-4, "batch" by the n-1 nanstd of all rewards + 1e-4, "none" (or False)
    does not divide. NaN rewards are skipped; a NaN advantage (all-NaN group, or a lone reward
    under n-1) becomes 0, as in TRL.
    """
    mode = _scale_mode(scale_rewards)
    flat = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if num_generations < 1 or flat.size % num_generations:
        raise ValueError(f"{flat.size} rewards do not split into groups of {num_generations}")
    grouped = flat.reshape(-1, num_generations)
    with warnings.catch_warnings():  # all-NaN groups and n-1 = 0 are expected: they give NaN -> 0
        warnings.simplefilter("ignore", RuntimeWarning)
        advantages = grouped - np.nanmean(grouped, axis=1, keepdims=True)
        if mode == "group":
            advantages /= np.nanstd(grouped, axis=1, ddof=1, keepdims=True) + ADVANTAGE_EPS
        elif mode == "batch":
            advantages /= np.nanstd(flat, ddof=1) + ADVANTAGE_EPS
    return np.nan_to_num(advantages.reshape(-1), nan=0.0).astype(np.float32)


def per_token_kl(logps: mx.array, ref_logps: mx.array) -> mx.array:
    """k3 estimator of KL(policy || reference) per token: `exp(d) - d - 1`, `d = ref - logp`.

    Non-negative, zero with zero gradient where policy == reference.
    """
    diff = ref_logps - logps
    return mx.exp(diff) - diff - 1.0


class Inputs(NamedTuple):
    """What a policy term may read. `[N, T]` unless noted; `ratio` is `[N, T]` or `[N, 1]`."""

    logps: mx.array
    log_ratio: mx.array  # per token, 0 outside the mask
    ratio: mx.array  # the importance weight at `importance_sampling_level`
    advantages: mx.array  # [N, 1]
    mask: mx.array


class Options(NamedTuple):
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    sapo_temperature_neg: float
    sapo_temperature_pos: float
    vespo: tuple[float, float, float, float]  # k_pos, lambda_pos, k_neg, lambda_neg


# ---------------------------------------------------------------- per-token policy terms
# Each returns (per-token loss, metrics).


def _masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """TRL's `global_masked_mean`: token-weighted, or a plain row mean for `[N, 1]` values."""
    if values.shape[-1] == 1 and mask.shape[-1] != 1:
        return values.mean()
    return (values * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _row_fractions(flags: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Per-row fraction of flagged tokens, and which rows have one (TRL's `masked_seq_mean`)."""
    if flags.shape[-1] == 1 and mask.shape[-1] != 1:
        return flags[:, 0], mx.ones(flags.shape[0], dtype=mx.bool_)
    tokens = mask.sum(-1)
    return (flags * mask).sum(-1) / mx.maximum(tokens, 1.0), tokens > 0


def clip_metrics(
    ratio: mx.array, advantages: mx.array, mask: mx.array, epsilon_low: float, epsilon_high: float
) -> dict[str, mx.array]:
    """TRL's `clip_ratio/*` metrics: how often the clipped term was the one in effect.

    Low: `ratio < 1 - epsilon` with `A < 0`; high: `ratio > 1 + epsilon_high` with `A > 0`. The
    `_mean`s are token-weighted; `low_min` / `high_max` are the min / max over rows of the per-row
    fraction (rows without tokens skipped, NaN when there are none).
    """
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).astype(mx.float32)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).astype(mx.float32)
    region = mx.maximum(low, high)
    low_rows, has_tokens = _row_fractions(low, mask)
    high_rows, _ = _row_fractions(high, mask)
    nan = mx.array(float("nan"))
    any_row = has_tokens.any()
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
        "clip_ratio/low_min": mx.where(any_row, mx.where(has_tokens, low_rows, mx.inf).min(), nan),
        "clip_ratio/high_max": mx.where(
            any_row, mx.where(has_tokens, high_rows, -mx.inf).max(), nan
        ),
    }


def _clipped_surrogate(x: Inputs, o: Options):
    """PPO's pessimistic clipped term; `delta` caps the unclipped ratio (two-sided clip)."""
    clipped = mx.clip(x.ratio, 1 - o.epsilon_low, 1 + o.epsilon_high)
    capped = x.ratio if o.delta is None else mx.minimum(x.ratio, o.delta)
    loss = -mx.minimum(capped * x.advantages, clipped * x.advantages)
    capped = mx.stop_gradient(capped)
    return loss, clip_metrics(capped, x.advantages, x.mask, o.epsilon_low, o.epsilon_high)


def _cispo(x: Inputs, o: Options):
    """CISPO (MiniMax-M1): the clipped ratio, without gradient, weighs the policy gradient."""
    weight = mx.stop_gradient(mx.minimum(x.ratio, o.epsilon_high))
    clipped = ((x.ratio > o.epsilon_high) & (x.advantages > 0)).astype(mx.float32)
    return -weight * x.advantages * x.logps, {"cispo_clip_ratio": _masked_mean(clipped, x.mask)}


def _sapo(x: Inputs, o: Options):
    """SAPO: a sigmoid gate around ratio 1 instead of a hard clip, sharper for A <= 0."""
    tau = mx.where(x.advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
    return -mx.sigmoid(tau * (x.ratio - 1)) * 4 / tau * x.advantages, {}


def vespo_weights(log_ratio: mx.array, mask: mx.array, advantages: mx.array,
                  vespo: tuple[float, float, float, float]) -> mx.array:
    """VESPO's `phi(w) = exp(lambda + k log w - lambda w)` of the sequence ratio `w` `[N, 1]`,
    with (k, lambda) by the sign of A, clamped as TRL's `get_gamma_weights`; no gradient."""
    k_pos, lambda_pos, k_neg, lambda_neg = vespo
    floor = math.log(1e-8)
    seq = (mx.clip(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdims=True)
    log_w = mx.clip(seq, floor, 20.0)
    nonneg = advantages >= 0
    k = mx.where(nonneg, k_pos, k_neg)
    lam = mx.maximum(mx.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))
    return mx.stop_gradient(mx.where(mx.isfinite(phi), phi, 0.0))


def _vespo(x: Inputs, o: Options):
    phi = vespo_weights(x.log_ratio, x.mask, x.advantages, o.vespo)
    return -phi * x.advantages * x.logps, {"vespo/phi_seq_mean": phi.mean()}


# ---------------------------------------------------------------- aggregations


class Normalisers(NamedTuple):
    """What the aggregations divide by, besides the mask."""

    grad_accum: int
    max_completion_length: int | None
    num_items_in_batch: mx.array | float | None


def _sequence_mean(token_loss: mx.array, mask: mx.array, norm: Normalisers) -> mx.array:
    per_row = (token_loss * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    return per_row.mean() / norm.grad_accum


def _micro_batch_token_mean(token_loss: mx.array, mask: mx.array, norm: Normalisers) -> mx.array:
    return (token_loss * mask).sum() / mx.maximum(mask.sum(), 1.0) / norm.grad_accum


def _fixed_length_mean(token_loss: mx.array, mask: mx.array, norm: Normalisers) -> mx.array:
    if norm.max_completion_length is None:
        raise ValueError("GRPO loss_type 'dr_grpo' needs max_completion_length")
    num_rows = mask.shape[0]
    return (token_loss * mask).sum() / (num_rows * norm.max_completion_length) / norm.grad_accum


def _window_token_mean(token_loss: mx.array, mask: mx.array, norm: Normalisers) -> mx.array:
    num_items = mask.sum() if norm.num_items_in_batch is None else norm.num_items_in_batch
    return (token_loss * mask).sum() / mx.maximum(num_items, 1.0)


def _row_sum_mean(token_loss: mx.array, mask: mx.array, norm: Normalisers) -> mx.array:
    """LUSPO: each row's loss scaled by its length (the sum over its tokens), mean over rows."""
    return (token_loss * mask).sum(-1).mean() / norm.grad_accum


# ---------------------------------------------------------------- the table


class LossType(NamedTuple):
    policy_term: Callable[[Inputs, Options], tuple[mx.array, dict]]
    aggregate: Callable[[mx.array, mx.array, Normalisers], mx.array]


GRPO_LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(_clipped_surrogate, _sequence_mean),
    "bnpo": LossType(_clipped_surrogate, _micro_batch_token_mean),
    "dr_grpo": LossType(_clipped_surrogate, _fixed_length_mean),
    "dapo": LossType(_clipped_surrogate, _window_token_mean),
    "luspo": LossType(_clipped_surrogate, _row_sum_mean),
    "cispo": LossType(_cispo, _window_token_mean),
    "sapo": LossType(_sapo, _sequence_mean),
    "vespo": LossType(_vespo, _window_token_mean),
}
# loss_type -> its aggregation (the PPO-clipped family and the others alike)
GRPO_AGGREGATIONS = {name: kind.aggregate for name, kind in GRPO_LOSS_TYPES.items()}


def _token_log_weights(log_ratio: mx.array, mask: mx.array) -> mx.array:
    return log_ratio


def _sequence_log_weights(log_ratio: mx.array, mask: mx.array) -> mx.array:
    row_mean = (log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    return row_mean[:, None]


# importance_sampling_level -> log importance weights, [N, T] (token) or [N, 1] (sequence, GSPO).
IMPORTANCE_SAMPLING_LEVELS: dict[str, Callable[[mx.array, mx.array], mx.array]] = {
    "token": _token_log_weights,
    "sequence": _sequence_log_weights,
}


def _lookup(table: dict, key: str, what: str):
    if key not in table:
        raise ValueError(f"unknown GRPO {what} {key!r}; valid: {', '.join(table)}")
    return table[key]


def grpo_loss(
    logps: mx.array,
    old_logps: mx.array,
    ref_logps: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: mx.array | float | None = None,
    grad_accum: int = 1,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    sapo_temperature_neg: float = 1.05,
    sapo_temperature_pos: float = 1.0,
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
) -> tuple[mx.array, dict[str, mx.array]]:
    """GRPO loss of one micro-batch of `N` completions and TRL's metrics.

    `logps`, `old_logps`, `ref_logps` and `mask` are `[N, T]` over completion tokens (`old_logps`
    = `mx.stop_gradient(logps)` when each batch gets one update; `ref_logps` only read when
    `beta != 0`); `advantages` is `[N]`. `num_items_in_batch` (dapo, cispo, vespo) is the number
    of loss tokens of the whole accumulation window, default this micro-batch's (TRL: the
    generation batch's count times grad_accum / steps_per_generation, equal when those two are
    equal, its default). `vespo` is (k_pos, lambda_pos, k_neg, lambda_neg). Returns
    `(scalar loss, metrics)`.
    """
    kind = _lookup(GRPO_LOSS_TYPES, loss_type, "loss_type")
    log_weights_of = _lookup(
        IMPORTANCE_SAMPLING_LEVELS, importance_sampling_level, "importance_sampling_level"
    )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("GRPO with beta != 0 needs ref_logps")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.astype(mx.float32)
    in_mask = mask > 0
    # zero outside the mask, so junk log-probs at padding cannot turn into inf * 0 = NaN
    log_ratio = mx.where(in_mask, logps - old_logps, 0.0)
    ratio = mx.exp(log_weights_of(log_ratio, mask))
    inputs = Inputs(mx.where(in_mask, logps, 0.0), log_ratio, ratio,
                    advantages.astype(mx.float32)[:, None], mask)
    options = Options(epsilon, epsilon_high, delta, sapo_temperature_neg, sapo_temperature_pos,
                      tuple(vespo))
    token_loss, metrics = kind.policy_term(inputs, options)

    if beta != 0.0:
        kl = per_token_kl(logps, mx.where(in_mask, ref_logps, logps))
        if use_bias_correction_kl:
            kl = kl * ratio  # the ratio before any `delta` cap, as in TRL
        token_loss = token_loss + beta * kl
        metrics["kl"] = mx.stop_gradient(_masked_mean(kl, mask))

    norm = Normalisers(grad_accum, max_completion_length, num_items_in_batch)
    loss = kind.aggregate(token_loss, mask, norm)
    return loss, {k: mx.stop_gradient(v) for k, v in metrics.items()}
