"""DPO's loss, as TRL 1.16's `DPOTrainer._compute_loss` computes it: every `loss_type`.

For a pair (chosen, rejected) with summed completion log-probs under the policy (`pc`, `pr`) and
the reference (`rc`, `rr`), the log-ratios are `s_c = pc - rc`, `s_r = pr - rr`. `f_divergence_type`
turns them into scores (`reverse_kl`, the default: the log-ratios themselves; `forward_kl`:
`1 - exp(-s)`; `js_divergence`: `log 2 + log sigmoid(s)`; `alpha_divergence`:
`(exp((alpha - 1) s) - 1) / (alpha - 1)`), and `delta` is the chosen score minus the rejected. The
default `sigmoid` loss is `-log sigmoid(beta * delta)`; each loss type is a per-pair function
(`DPO_LOSSES`), averaged over the pairs, times its `loss_weights` entry, summed over the list.

Where TRL departs from the DPO paper (and so do we):
- Sequence log-probs are SUMS over completion tokens (prompt and padding masked), not means. With
  `ld_alpha` (LD-DPO) the tokens past the shorter completion of the pair count `ld_alpha` times.
- `sigmoid` ignores `label_smoothing` (since TRL 0.29; cDPO is gone). Only `robust`, `exo_pair`
  and `aot*` read it.
- `ipo` and `sigmoid_norm` divide each score by its completion length before the margin
  (TRL's choice, confirmed with the IPO authors); `beta` is IPO's tau.
- `sft` is the mean NLL of the chosen completion tokens of the batch (the RPO term).
- `use_weighting` (WPO) multiplies each pair's loss by `w_c * w_r`, `w = exp(mean over the
  completion of logp - log sum_v p_v^2)`, without gradient.
- Metrics are TRL's: `rewards/*` are `beta * log-ratio`, `rewards/accuracies` is the fraction of
  pairs with `reward_c > reward_r` (per pair, not on batch means).
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn


class PairTerms(NamedTuple):
    """What a per-pair DPO loss may read; every field is `[P]` unless noted."""

    policy_chosen: mx.array
    policy_rejected: mx.array
    ref_chosen: mx.array
    ref_rejected: mx.array
    chosen_lengths: mx.array | None
    rejected_lengths: mx.array | None
    chosen_scores: mx.array  # the log-ratios under `f_divergence_type`
    rejected_scores: mx.array
    chosen_nll: mx.array | None = None  # scalar: mean NLL of the batch's chosen tokens (`sft`)

    @property
    def chosen_logratios(self) -> mx.array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> mx.array:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> mx.array:
        return self.chosen_scores - self.rejected_scores

    def length_normalised_delta(self, loss_type: str) -> mx.array:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"DPO loss_type {loss_type!r} needs chosen_lengths and rejected_lengths"
            )
        chosen = self.chosen_scores / mx.maximum(self.chosen_lengths.astype(mx.float32), 1.0)
        rejected = self.rejected_scores / mx.maximum(
            self.rejected_lengths.astype(mx.float32), 1.0
        )
        return chosen - rejected


class LossParams(NamedTuple):
    beta: float
    label_smoothing: float
    discopop_tau: float


PairLoss = Callable[[PairTerms, LossParams], mx.array]


# ---------------------------------------------------------------- f-divergences


def _reverse_kl(logratio: mx.array, alpha: float) -> mx.array:
    return logratio


def _forward_kl(logratio: mx.array, alpha: float) -> mx.array:
    return 1 - mx.exp(-logratio)


def _js_divergence(logratio: mx.array, alpha: float) -> mx.array:
    return math.log(2) + nn.log_sigmoid(logratio)


def _alpha_divergence(logratio: mx.array, alpha: float) -> mx.array:
    if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
        return logratio
    t = mx.minimum((alpha - 1.0) * logratio, 80.0)  # TRL's float32 clamp, so exp stays finite
    return (mx.exp(t) - 1.0) / (alpha - 1.0)


F_DIVERGENCES: dict[str, Callable[[mx.array, float], mx.array]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


# ---------------------------------------------------------------- per-pair losses


def _sigmoid(t: PairTerms, p: LossParams) -> mx.array:
    return -nn.log_sigmoid(p.beta * t.delta)


def _hinge(t: PairTerms, p: LossParams) -> mx.array:
    return nn.relu(1.0 - p.beta * t.delta)


def _ipo(t: PairTerms, p: LossParams) -> mx.array:
    return (t.length_normalised_delta("ipo") - 1.0 / (2.0 * p.beta)) ** 2


def _robust(t: PairTerms, p: LossParams) -> mx.array:
    ls, z = p.label_smoothing, p.beta * t.delta
    return (-(1.0 - ls) * nn.log_sigmoid(z) + ls * nn.log_sigmoid(-z)) / (1.0 - 2.0 * ls)


def _sigmoid_norm(t: PairTerms, p: LossParams) -> mx.array:
    return -nn.log_sigmoid(p.beta * t.length_normalised_delta("sigmoid_norm"))


def _bco_pair(t: PairTerms, p: LossParams) -> mx.array:
    return -nn.log_sigmoid(p.beta * t.chosen_logratios) - nn.log_sigmoid(
        -p.beta * t.rejected_logratios
    )


def _exo_pair(t: PairTerms, p: LossParams) -> mx.array:
    if not 0.0 < p.label_smoothing < 1.0:
        raise ValueError("DPO loss_type 'exo_pair' needs 0 < label_smoothing < 1")
    z = p.beta * t.delta
    log_p_chosen, log_p_rejected = math.log1p(-p.label_smoothing), math.log(p.label_smoothing)
    return mx.sigmoid(z) * (nn.log_sigmoid(z) - log_p_chosen) + mx.sigmoid(-z) * (
        nn.log_sigmoid(-z) - log_p_rejected
    )


def _nca_pair(t: PairTerms, p: LossParams) -> mx.array:
    chosen, rejected = p.beta * t.chosen_logratios, p.beta * t.rejected_logratios
    return -nn.log_sigmoid(chosen) - 0.5 * nn.log_sigmoid(-chosen) - 0.5 * nn.log_sigmoid(-rejected)


def _sppo_hard(t: PairTerms, p: LossParams) -> mx.array:
    return (t.chosen_logratios - 0.5 / p.beta) ** 2 + (t.rejected_logratios + 0.5 / p.beta) ** 2


def _smoothed_sigmoid(delta: mx.array, p: LossParams) -> mx.array:
    z = p.beta * delta
    return -(1.0 - p.label_smoothing) * nn.log_sigmoid(z) - p.label_smoothing * nn.log_sigmoid(-z)


def _aot(t: PairTerms, p: LossParams) -> mx.array:
    policy = mx.sort(t.policy_chosen - t.policy_rejected, axis=0)
    reference = mx.sort(t.ref_chosen - t.ref_rejected, axis=0)
    return _smoothed_sigmoid(policy - reference, p)


def _aot_unpaired(t: PairTerms, p: LossParams) -> mx.array:
    chosen = mx.sort(t.chosen_logratios, axis=0)
    rejected = mx.sort(t.rejected_logratios, axis=0)
    return _smoothed_sigmoid(chosen - rejected, p)


def _apo_zero(t: PairTerms, p: LossParams) -> mx.array:
    return 1.0 - mx.sigmoid(p.beta * t.chosen_logratios) + mx.sigmoid(p.beta * t.rejected_logratios)


def _apo_down(t: PairTerms, p: LossParams) -> mx.array:
    return mx.sigmoid(p.beta * t.chosen_logratios) + 1.0 - mx.sigmoid(
        p.beta * (t.chosen_logratios - t.rejected_logratios)
    )


def _discopop(t: PairTerms, p: LossParams) -> mx.array:
    z = p.beta * t.delta
    mix = mx.sigmoid(z / p.discopop_tau)
    return -nn.log_sigmoid(z) * (1.0 - mix) + mx.exp(-z) * mix


def _sft(t: PairTerms, p: LossParams) -> mx.array:
    if t.chosen_nll is None:
        raise ValueError("DPO loss_type 'sft' needs chosen_nll (per-token log-probs)")
    return mx.broadcast_to(t.chosen_nll, t.policy_chosen.shape)


# TRL's loss types (mlxrl.loss_types.DPO_LOSS_TYPES), each a per-pair loss `[P]`.
DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "sigmoid_norm": _sigmoid_norm,
    "bco_pair": _bco_pair,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
}


def _weighted_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> list[tuple[PairLoss, float]]:
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in names if name not in DPO_LOSSES]
    if unknown or not names:
        raise ValueError(
            f"unknown DPO loss_type {unknown or names!r}; valid: {', '.join(DPO_LOSSES)}"
        )
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(names)}")
    return [(DPO_LOSSES[name], float(weight)) for name, weight in zip(names, weights)]


def dpo_metrics(terms: PairTerms, beta: float) -> dict[str, mx.array]:
    """TRL's DPO metrics as mx scalars (no gradient flows through them)."""
    chosen_rewards = mx.stop_gradient(beta * terms.chosen_logratios)
    rejected_rewards = mx.stop_gradient(beta * terms.rejected_logratios)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": mx.stop_gradient(terms.policy_chosen).mean(),
        "logps/rejected": mx.stop_gradient(terms.policy_rejected).mean(),
    }


def dpo_loss(
    policy_chosen_logps: mx.array,
    policy_rejected_logps: mx.array,
    ref_chosen_logps: mx.array,
    ref_rejected_logps: mx.array,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: mx.array | None = None,
    rejected_lengths: mx.array | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_nll: mx.array | None = None,
    pair_weights: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """DPO loss of a batch of `P` pairs and TRL's metrics.

    Log-probs are `[P]` sums over completion tokens; `chosen_lengths` / `rejected_lengths` `[P]`
    are completion token counts (read by `ipo` and `sigmoid_norm`); `chosen_nll` is the scalar
    read by `sft`; `pair_weights` `[P]` are WPO's weights (`use_weighting`). `loss_type` is a
    name from `DPO_LOSSES` or a list of them combined with `loss_weights` (default all 1.0).
    Returns `(scalar loss, metrics)`.
    """
    weighted = _weighted_loss_types(loss_type, loss_weights)
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown DPO f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
    score = F_DIVERGENCES[f_divergence_type]
    terms = PairTerms(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths,
        score(policy_chosen_logps - ref_chosen_logps, f_alpha_divergence_coef),
        score(policy_rejected_logps - ref_rejected_logps, f_alpha_divergence_coef),
        chosen_nll,
    )
    params = LossParams(beta, label_smoothing, discopop_tau)
    loss = mx.array(0.0)
    for per_pair, weight in weighted:
        pair_loss = per_pair(terms, params)
        if pair_weights is not None:
            pair_loss = pair_loss * pair_weights
        loss = loss + weight * pair_loss.mean()
    return loss, dpo_metrics(terms, beta)


# ---------------------------------------------------------------- from per-token log-probs
# Rows are [chosen...; rejected...]; `mask` [2P, L] marks completion tokens, `token_logps`
# [2P, L-1] scores token t + 1 at position t (TRL's labels shifted by one).


def completion_logps(token_logps: mx.array, mask: mx.array, ld_alpha: float | None = None) -> mx.array:
    """`[2P]` summed completion log-probs; with `ld_alpha`, each pair's tokens past the shorter
    completion's length count `ld_alpha` times (LD-DPO, TRL's `ld_alpha`)."""
    shifted = mask[:, 1:].astype(mx.float32)
    if ld_alpha is None:
        return (token_logps * shifted).sum(-1)
    position = mx.cumsum(shifted, axis=-1)  # 1-based index of each completion token
    lengths = shifted.sum(-1)
    chosen, rejected = mx.split(lengths, 2)
    shared = mx.concatenate([mx.minimum(chosen, rejected)] * 2)[:, None]
    shared_part = (token_logps * shifted * (position <= shared)).sum(-1)
    tail_part = (token_logps * shifted * (position > shared)).sum(-1)
    return shared_part + ld_alpha * tail_part


def chosen_nll(token_logps: mx.array, mask: mx.array) -> mx.array:
    """`sft`'s term: the mean NLL over the chosen completion tokens of the batch."""
    chosen_logps, _ = mx.split(token_logps, 2)
    chosen_mask, _ = mx.split(mask[:, 1:].astype(mx.float32), 2)
    return -(chosen_logps * chosen_mask).sum() / mx.maximum(chosen_mask.sum(), 1.0)


def wpo_weights(token_logps: mx.array, log_sum_sq_probs: mx.array, mask: mx.array) -> mx.array:
    """`[P]` WPO weights `w_c * w_r`, `w = exp(mean over the completion of logp - log sum p^2)`."""
    shifted = mask[:, 1:].astype(mx.float32)
    aligned = ((token_logps - log_sum_sq_probs) * shifted).sum(-1)
    weights = mx.exp(aligned / mx.maximum(shifted.sum(-1), 1.0))
    chosen, rejected = mx.split(mx.stop_gradient(weights), 2)
    return chosen * rejected


def settings_loss(settings, logps, ref_logps, mask, token_logps=None, log_sum_sq_probs=None):
    """`dpo_loss` with the run's DPO settings, on [chosen; rejected] rows.

    `logps` / `ref_logps` `[2P]` are the (ld_alpha-weighted) sums; `token_logps` `[2P, L-1]` are
    read by `sft`, `log_sum_sq_probs` `[2P, L-1]` by `use_weighting`. Lengths count the completion
    mask as TRL does (`completion_mask.sum(1)`).
    """
    lengths = mask.sum(axis=-1).astype(mx.float32)
    pc, pr = mx.split(logps, 2)
    rc, rr = mx.split(ref_logps, 2)
    lc, lr = mx.split(lengths, 2)
    names = [settings.loss_type] if isinstance(settings.loss_type, str) else settings.loss_type
    nll = chosen_nll(token_logps, mask) if "sft" in names else None
    weights = None
    if settings.use_weighting:
        weights = wpo_weights(token_logps, log_sum_sq_probs, mask)
    return dpo_loss(pc, pr, rc, rr, beta=settings.beta, loss_type=settings.loss_type,
                    loss_weights=settings.loss_weights, label_smoothing=settings.label_smoothing,
                    chosen_lengths=lc, rejected_lengths=lr, discopop_tau=settings.discopop_tau,
                    f_divergence_type=settings.f_divergence_type,
                    f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
                    chosen_nll=nll, pair_weights=weights)
