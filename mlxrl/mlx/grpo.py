"""GRPO: advantages and the loss (this section), and its training loop (below).

Objective, as TRL's `GRPOTrainer` computes it. Each prompt gets G sampled completions (rows
`i*G .. i*G+G-1`). Their summed rewards become advantages within the group:
`A = (r - mean_group) / (std_group + 1e-4)` with the unbiased (n-1) std, NaN rewards skipped and
NaN advantages set to 0. Per completion token, with `ratio = exp(logp - logp_old)` against the
policy that sampled (not the reference):

    loss_token = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
                 + beta * (exp(ref - logp) - (ref - logp) - 1)        # k3 KL, only if beta != 0

`importance_sampling_level="sequence"` (GSPO) replaces the per-token ratio by the exp of the
masked mean log-ratio of the row. The per-token losses are then aggregated over the completion
mask by `loss_type` (see `GRPO_AGGREGATIONS`); TRL's default `dapo` divides the masked sum by the
number of loss tokens in the whole accumulation window, so gradient accumulation needs no extra
division.

Where TRL departs from the GRPO paper (and so do we): `beta = 0` by default (no reference
forward at all); the ratio is clipped PPO-style with an optional asymmetric `epsilon_high` (DAPO);
the default aggregation is `dapo` (token mean over the window) rather than the paper's
per-sequence mean (`grpo`); `scale_rewards="none"` drops the std division (Dr. GRPO).
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlxrl.data.formats import encode_prompt, unwrap
from mlxrl.errors import ConfigError
from mlxrl.mlx.grpo_reuse import RolloutReuse
from mlxrl.mlx.logprobs import per_token_logps
from mlxrl.mlx.model import adapters_disabled
from mlxrl.mlx.trainer import IndexStream, StepBatch, StreamPosition, bucket, pad_rows
from mlxrl.rewards import load_rewards

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


class Normalisers(NamedTuple):
    """What the aggregations divide by, besides the mask."""

    grad_accum: int
    max_completion_length: int | None
    num_items_in_batch: mx.array | float | None


Aggregation = Callable[[mx.array, mx.array, Normalisers], mx.array]


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


# loss_type -> aggregation of the masked per-token losses of one micro-batch into its loss.
GRPO_AGGREGATIONS: dict[str, Aggregation] = {
    "grpo": _sequence_mean,
    "bnpo": _micro_batch_token_mean,
    "dr_grpo": _fixed_length_mean,
    "dapo": _window_token_mean,
}


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


def _clipped_surrogate(
    ratio: mx.array,
    advantages: mx.array,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
) -> tuple[mx.array, mx.array]:
    """PPO's pessimistic clipped term per token, and the ratio it used (capped at `delta`)."""
    clipped = mx.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else mx.minimum(ratio, delta)
    return -mx.minimum(capped * advantages, clipped * advantages), capped


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
) -> tuple[mx.array, dict[str, mx.array]]:
    """GRPO loss of one micro-batch of `N` completions and TRL's metrics.

    `logps`, `old_logps`, `ref_logps` and `mask` are `[N, T]` over completion tokens (`old_logps`
    = `mx.stop_gradient(logps)` when each batch gets one update; `ref_logps` only read when
    `beta != 0`); `advantages` is `[N]`. `num_items_in_batch` (dapo) is the number of loss tokens
    of the whole accumulation window, default this micro-batch's (TRL: the generation batch's
    count times grad_accum / steps_per_generation, equal when those two are equal, its default). `delta` is TRL's two-sided
    clip (ratio capped at `delta`); `use_bias_correction_kl` multiplies the k3 term by the ratio
    (TRL's DeepSeek-V3.2 option). Returns `(scalar loss, metrics)`.
    """
    aggregate = _lookup(GRPO_AGGREGATIONS, loss_type, "loss_type")
    log_weights_of = _lookup(
        IMPORTANCE_SAMPLING_LEVELS, importance_sampling_level, "importance_sampling_level"
    )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("GRPO with beta != 0 needs ref_logps")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.astype(mx.float32)
    advantages = advantages.astype(mx.float32)[:, None]

    # zero outside the mask, so junk log-probs at padding cannot turn into inf * 0 = NaN
    in_mask = mask > 0
    log_ratio = mx.where(in_mask, logps - old_logps, 0.0)
    ratio = mx.exp(log_weights_of(log_ratio, mask))
    token_loss, capped_ratio = _clipped_surrogate(ratio, advantages, epsilon, epsilon_high, delta)

    metrics = {}
    if beta != 0.0:
        kl = per_token_kl(logps, mx.where(in_mask, ref_logps, logps))
        if use_bias_correction_kl:
            kl = kl * ratio  # the ratio before the `delta` cap, as in TRL
        token_loss = token_loss + beta * kl
        metrics["kl"] = mx.stop_gradient(_masked_mean(kl, mask))

    norm = Normalisers(grad_accum, max_completion_length, num_items_in_batch)
    loss = aggregate(token_loss, mask, norm)
    capped_ratio = mx.stop_gradient(capped_ratio)
    metrics.update(clip_metrics(capped_ratio, advantages, mask, epsilon, epsilon_high))
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Training. Each optimizer step samples `batch x grad_accum / G` prompts, G completions each, with
# the prefix-shared batched sampler; scores them with the reward functions; turns the group
# advantages into `grad_accum` micro-batches of `per_device_train_batch_size` completions. One
# update per rollout batch, so the sampling policy's log-probs are `stop_gradient(logps)` (the
# ratio is 1 in value, its gradient is the policy gradient), as TRL does without vLLM; with
# `num_iterations` > 1 the batch serves several updates against stored old log-probs
# (grpo_reuse.py).


def _completion_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def reward_metrics(names: list[str], scores: np.ndarray, total: np.ndarray, num_generations: int) -> dict:
    """TRL's reward metrics: per function mean/std, the summed reward, zero-std group fraction."""
    out = {}
    for j, name in enumerate(names):
        column = scores[:, j]
        out[f"rewards/{name}/mean"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
        out[f"rewards/{name}/std"] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else 0.0
    out["reward"] = float(np.nanmean(total))
    out["reward_std"] = float(np.nanstd(total, ddof=1)) if len(total) > 1 else 0.0
    group_std = np.nanstd(total.reshape(-1, num_generations), axis=1, ddof=1)
    out["frac_reward_zero_std"] = float(np.mean(np.isclose(group_std, 0.0)))
    return out


def completion_metrics(lengths: np.ndarray, finished: np.ndarray) -> dict:
    terminated = lengths[finished]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(1.0 - finished.mean()),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
    }


class GRPOMethod(StreamPosition):
    name = "grpo"

    def __init__(self, cfg, loaded, dataset, log=print):
        self.model, self.training = loaded.model, cfg.training
        self.settings = s = cfg.grpo_settings()
        if not self.training.reward_functions:
            raise ConfigError("GRPO needs training.reward_functions (e.g. [count_letters])")
        self.rewards = load_rewards(self.training.reward_functions, self.training.reward_function_kwargs,
                                    weights=s.reward_weights)
        self.tokenizer = unwrap(loaded.tokenizer)
        self.eos_ids = sorted(loaded.tokenizer.eos_token_ids)
        self.rows = [dict(row) for row in dataset]
        self.prompt_ids = [encode_prompt(row, loaded.tokenizer, i) for i, row in enumerate(self.rows)]
        self.accum = self.training.gradient_accumulation_steps
        completions = self.training.per_device_train_batch_size * self.accum
        self.prompts_per_step = completions // s.num_generations
        self.stream = IndexStream(len(self.rows), self.training.seed)
        self.step_count = 0
        self.completions_log = Path(self.training.output_dir) / "completions.jsonl" if s.log_completions else None
        self.reuse = RolloutReuse(self, s.num_iterations) if s.num_iterations > 1 else None

    # with num_iterations (TRL's mu) a rollout batch serves mu optimizer steps (grpo_reuse.py)
    examples_per_step = property(lambda self: self.prompts_per_step / self.settings.num_iterations)
    dataset_size = property(lambda self: len(self.rows))

    def state(self) -> dict:
        reuse = {"reuse": self.reuse.state()} if self.reuse is not None else {}
        return {"position": self.stream.position, "step_count": self.step_count, **reuse}

    def restore(self, state: dict) -> None:
        self.stream.position, self.step_count = state["position"], state["step_count"]
        if self.reuse is not None:
            self.reuse.restore(state["reuse"])

    def loss(self, input_ids, mask, advantages, ref_logps, num_items, old_logps=None):
        s = self.settings
        logps = per_token_logps(self.model, input_ids, s.temperature)
        ref = ref_logps if s.beta != 0.0 else None
        old = mx.stop_gradient(logps) if old_logps is None else old_logps
        return grpo_loss(logps, old, ref, advantages, mask[:, 1:],
                         beta=s.beta, epsilon=s.epsilon, epsilon_high=s.epsilon_high,
                         loss_type=s.loss_type, importance_sampling_level=s.importance_sampling_level,
                         max_completion_length=s.max_completion_length, num_items_in_batch=num_items,
                         grad_accum=self.accum, delta=s.delta, use_bias_correction_kl=s.use_bias_correction_kl)

    def _rollout(self, indices: list[int]):
        from mlxrl.mlx.sampling import sample

        s = self.settings
        self.model.eval()
        try:
            rollout = sample(self.model, [self.prompt_ids[i] for i in indices], num_generations=s.num_generations,
                             max_tokens=s.max_completion_length, temperature=s.temperature, top_p=s.top_p,
                             top_k=s.top_k, min_p=s.min_p, eos_token_ids=self.eos_ids,
                             seed=self.training.seed * 100_003 + self.step_count,
                             repetition_penalty=self.training.grpo.repetition_penalty or 1.0)
        finally:
            self.model.train()
        return rollout

    def _score(self, indices: list[int], completion_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        G = self.settings.num_generations
        rows = [self.rows[i] for i in indices for _ in range(G)]
        texts = [_completion_text(self.tokenizer, ids) for ids in completion_ids]
        conversational = isinstance(rows[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        scores = self.rewards.score([r["prompt"] for r in rows], completions, completion_ids, columns)
        if self.completions_log is not None:
            self._log_completions(rows, texts, scores)
        return scores, self.rewards.total(scores)

    def _log_completions(self, rows, texts, scores) -> None:
        with open(self.completions_log, "a") as f:
            for row, text, score in zip(rows, texts, scores):
                record = {"step": self.step_count, "prompt": row["prompt"], "completion": text,
                          "rewards": dict(zip(self.rewards.names, map(float, score)))}
                f.write(json.dumps(record) + "\n")

    def next_step(self) -> StepBatch:
        return self.rollout_step() if self.reuse is None else self.reuse.next_step()

    def rollout_step(self) -> StepBatch:
        """Sample, score and batch one rollout: the micro-batches of one optimizer step."""
        s = self.settings
        indices = self.stream.take(self.prompts_per_step)
        rollout = self._rollout(indices)
        self.step_count += 1
        lengths, finished = np.asarray(rollout.lengths), np.asarray(rollout.finished)
        completion_ids = [rollout.tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]
        scores, total = self._score(indices, completion_ids)
        advantages = group_advantages(total, s.num_generations, s.scale_rewards)
        prompts = [self.prompt_ids[indices[int(p)]] for p in rollout.prompt_index]
        rows = [p + c for p, c in zip(prompts, completion_ids)]
        masks = [[0] * len(p) + [int(finished[i] or not s.mask_truncated_completions)] * len(c)
                 for i, (p, c) in enumerate(zip(prompts, completion_ids))]
        num_items = mx.array(float(sum(map(sum, masks))))
        micro = self._micro_batches(rows, masks, advantages, num_items)
        metrics = reward_metrics(self.rewards.names, scores, total, s.num_generations)
        metrics.update(completion_metrics(lengths, finished))
        metrics["rollout_tokens_per_second"] = float(rollout.tokens_per_second)
        return StepBatch(micro, metrics, num_tokens=sum(map(len, rows)))

    def _micro_batches(self, rows, masks, advantages, num_items) -> list[tuple]:
        bs = self.training.per_device_train_batch_size
        width = bucket(max(map(len, rows)))
        micro = []
        for start in range(0, len(rows), bs):
            ids = pad_rows(rows[start:start + bs], width)
            mask = pad_rows(masks[start:start + bs], width)
            if self.settings.beta != 0.0:
                with adapters_disabled(self.model):
                    ref = per_token_logps(self.model, ids, self.settings.temperature)
                mx.eval(ref)
            else:
                ref = mx.zeros((ids.shape[0], width - 1))
            micro.append((ids, mask, mx.array(advantages[start:start + bs]), ref, num_items))
        return micro
