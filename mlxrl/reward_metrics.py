"""Reward metrics as TRL 1.16's `GRPOTrainer._generate_and_score_completions` logs them.

One function for GRPO training (MLX backend) and for `mlxrl eval --task reward`, so the same
names mean the same numbers everywhere (the torch backend logs TRL's own):

- `rewards/<name>/mean`: nanmean of the function's rewards; `rewards/<name>/std`: TRL's `nanstd`,
  the unbiased (n-1) std over the non-NaN rewards, NaN when there are fewer than two;
- `reward` / `reward_std`: the same over the weighted sum of the functions, a row that every
  function scored None being left out (NaN);
- `frac_reward_zero_std` (groups of `num_generations` only): the fraction of completions whose
  advantage denominator is 0 (`isclose(std, 0)`, NaN counting as not zero): the std of their
  group for `scale_rewards` "group" and "none", the std of the whole batch for "batch" (so 0 or 1).

NaN stands for "no value": the training log leaves it out of its averages and writes null when
nothing else is left, as TRL's `log` does.
"""

from __future__ import annotations

import warnings

import numpy as np


def nanstd(values: np.ndarray, axis=None) -> np.ndarray:
    """TRL's `nanstd`: the n-1 std over non-NaN values; NaN with fewer than two."""
    values = np.asarray(values, dtype=np.float64)
    count = np.sum(~np.isnan(values), axis=axis)
    with warnings.catch_warnings():  # all-NaN slices and n-1 = 0 are expected: they give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(values, axis=axis, ddof=1)
    return np.where(count > 1, std, np.nan)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def zero_std_fraction(total: np.ndarray, num_generations: int, scale_rewards: str | bool) -> float:
    """TRL's `frac_reward_zero_std` for one generation batch of summed rewards `total` [N]."""
    if scale_rewards == "batch":
        std = np.full(total.shape, nanstd(total) if total.size > 1 else 0.0)
    elif num_generations > 1:
        std = np.repeat(nanstd(total.reshape(-1, num_generations), axis=1), num_generations)
    else:
        std = np.zeros(total.shape)
    return float(np.mean(np.isclose(std, 0.0)))  # NaN is not close to 0


def reward_metrics(names: list[str], scores: np.ndarray, total: np.ndarray,
                   num_generations: int | None = None, scale_rewards: str | bool = "group") -> dict:
    """TRL's reward metrics of `scores` [N, F] (NaN = None) and their weighted sums `total` [N].

    `frac_reward_zero_std` is only computed when `num_generations` says how rows group.
    """
    scores, total = np.asarray(scores, dtype=np.float64), np.asarray(total, dtype=np.float64)
    out = {}
    for j, name in enumerate(names):
        out[f"rewards/{name}/mean"] = _nanmean(scores[:, j])
        out[f"rewards/{name}/std"] = float(nanstd(scores[:, j]))
    out["reward"] = _nanmean(total)
    out["reward_std"] = float(nanstd(total))
    if num_generations is not None:
        out["frac_reward_zero_std"] = zero_std_fraction(total, num_generations, scale_rewards)
    return out
