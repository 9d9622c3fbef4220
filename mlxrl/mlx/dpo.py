"""DPO: the loss (this section) and its training loop (below).

Objective, as TRL's `DPOTrainer` computes it. For a pair (chosen, rejected) with summed completion
log-probs under the policy (`pc`, `pr`) and the reference (`rc`, `rr`), the log-ratios are
`s_c = pc - rc`, `s_r = pr - rr` and `delta = s_c - s_r`. The default `sigmoid` loss is
`-log sigmoid(beta * delta)`; the loss of a batch is the plain mean over pairs, and with several
loss types it is the weighted sum of those means.

Where TRL departs from the DPO paper (and so do we):
- Sequence log-probs are SUMS over completion tokens (prompt and padding masked), not means.
- `sigmoid` ignores `label_smoothing` (since TRL 0.29; cDPO is gone). Only `robust`, `exo_pair`
  and `aot*` read it.
- `ipo` and `sigmoid_norm` divide each log-ratio by its completion length before the margin
  (TRL's choice, confirmed with the IPO authors); `beta` is IPO's tau.
- Metrics are TRL's: `rewards/*` are `beta * log-ratio`, `rewards/accuracies` is the fraction of
  pairs with `reward_c > reward_r` (per pair, not on batch means).
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlxrl.data.formats import Truncation, encode_preference
from mlxrl.errors import DataError
from mlxrl.mlx.logprobs import sequence_logps
from mlxrl.mlx.model import adapters_disabled
from mlxrl.mlx.trainer import IndexStream, StepBatch, StreamPosition, bucket, pad_rows


class PairTerms(NamedTuple):
    """What a per-pair DPO loss may read; every field is `[P]`."""

    policy_chosen: mx.array
    policy_rejected: mx.array
    ref_chosen: mx.array
    ref_rejected: mx.array
    chosen_lengths: mx.array | None
    rejected_lengths: mx.array | None

    @property
    def chosen_logratios(self) -> mx.array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> mx.array:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> mx.array:
        return self.chosen_logratios - self.rejected_logratios

    def length_normalised_delta(self, loss_type: str) -> mx.array:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"DPO loss_type {loss_type!r} needs chosen_lengths and rejected_lengths"
            )
        chosen = self.chosen_logratios / mx.maximum(self.chosen_lengths.astype(mx.float32), 1.0)
        rejected = self.rejected_logratios / mx.maximum(
            self.rejected_lengths.astype(mx.float32), 1.0
        )
        return chosen - rejected


class LossParams(NamedTuple):
    beta: float
    label_smoothing: float
    discopop_tau: float


PairLoss = Callable[[PairTerms, LossParams], mx.array]


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
    return mx.sigmoid(p.beta * t.chosen_logratios) + 1.0 - mx.sigmoid(p.beta * t.delta)


def _discopop(t: PairTerms, p: LossParams) -> mx.array:
    z = p.beta * t.delta
    mix = mx.sigmoid(z / p.discopop_tau)
    return -nn.log_sigmoid(z) * (1.0 - mix) + mx.exp(-z) * mix


# TRL's per-pair losses (`sft` needs per-token log-probs and lives with the training loop).
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
) -> tuple[mx.array, dict[str, mx.array]]:
    """DPO loss of a batch of `P` pairs and TRL's metrics.

    Log-probs are `[P]` sums over completion tokens; `chosen_lengths` / `rejected_lengths` `[P]`
    are completion token counts (needed by `ipo` and `sigmoid_norm`). `loss_type` is a name from
    `DPO_LOSSES` or a list of them combined with `loss_weights` (default all 1.0).
    Returns `(scalar loss, metrics)`.
    """
    weighted = _weighted_loss_types(loss_type, loss_weights)
    terms = PairTerms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
    )
    params = LossParams(beta, label_smoothing, discopop_tau)
    loss = sum(weight * per_pair(terms, params).mean() for per_pair, weight in weighted)
    return loss, dpo_metrics(terms, beta)


# ---------------------------------------------------------------------------------------------
# Training: chosen and rejected in one concatenated forward; the reference is the same model
# with its adapters switched off (a forward outside the differentiated function), or log-probs
# precomputed once for the whole dataset (`precompute_ref_log_probs`).


def _pair_rows(pair: dict) -> tuple:
    """(chosen ids, chosen mask, rejected ids, rejected mask): prompt + completion, mask on
    the completion."""
    prompt = pair["prompt_ids"]
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        out += [prompt + pair[key], [0] * len(prompt) + [1] * len(pair[key])]
    return tuple(out)


def encode_pairs(dataset, tokenizer, max_length: int, log=print) -> list[tuple]:
    truncation = Truncation(max_length)
    pairs = []
    for i, row in enumerate(dataset):
        pair = truncation.preference(encode_preference(truncation.cut(row, tokenizer), tokenizer, i), i)
        if pair is not None:
            pairs.append(_pair_rows(pair))
    if truncation.message():
        log(truncation.message())
    if not pairs:
        raise DataError("no preference pairs left after truncation to model.model_max_length")
    return pairs


def pair_arrays(pairs: list[tuple]) -> tuple[mx.array, mx.array, int]:
    """[chosen...; rejected...] token rows and completion masks, right-padded to a bucket."""
    rows = [p[0] for p in pairs] + [p[2] for p in pairs]
    masks = [p[1] for p in pairs] + [p[3] for p in pairs]
    width = bucket(max(len(r) for r in rows))
    return pad_rows(rows, width), pad_rows(masks, width), sum(len(r) for r in rows)


def settings_loss(settings, logps, ref_logps, mask):
    """`dpo_loss` on [chosen; rejected] sequence log-probs with the run's DPO settings."""
    lengths = mask[:, 1:].sum(axis=-1).astype(mx.float32)
    pc, pr = mx.split(logps, 2)
    rc, rr = mx.split(ref_logps, 2)
    lc, lr = mx.split(lengths, 2)
    return dpo_loss(pc, pr, rc, rr, beta=settings.beta, loss_type=settings.loss_type,
                    loss_weights=settings.loss_weights, label_smoothing=settings.label_smoothing,
                    chosen_lengths=lc, rejected_lengths=lr)


def reference_logps(model, input_ids, mask, adapters_off: bool = True) -> mx.array:
    """Summed completion log-probs of the reference policy: by default the adapter-off model."""
    with adapters_disabled(model) if adapters_off else contextlib.nullcontext():
        logps = sequence_logps(model, input_ids, mask)
    mx.eval(logps)
    return logps


def preference_eval(model, tokenizer, dataset, settings, batch_size: int = 8) -> dict[str, float]:
    """TRL's DPO metrics (and loss) over a whole held-out dataset, policy vs adapter-off ref."""
    pairs = encode_pairs(dataset, tokenizer, settings.max_length)
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask, _ = pair_arrays(chunk)
        ref = reference_logps(model, ids, mask)
        logps = sequence_logps(model, ids, mask)
        loss, metrics = settings_loss(settings, logps, ref, mask)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {k: v / len(pairs) for k, v in totals.items()} | {"num_pairs": len(pairs)}


class DPOMethod(StreamPosition):
    name = "dpo"

    def __init__(self, cfg, loaded, dataset, log=print):
        self.model, self.training = loaded.model, cfg.training
        self.settings = cfg.dpo_settings()
        _weighted_loss_types(self.settings.loss_type, self.settings.loss_weights)  # fail early
        self.pairs = encode_pairs(dataset, loaded.tokenizer, self.settings.max_length, log)
        self.accum = self.training.gradient_accumulation_steps
        self.stream = IndexStream(len(self.pairs), self.training.seed)
        # Starting from a trained adapter (e.g. DPO after SFT), the reference is that starting
        # policy, as TRL's frozen "ref" adapter copy: its log-probs are computed once, up front.
        self.reference_is_start = loaded.adapter_path is not None
        if self.reference_is_start:
            log(f"note: the DPO reference is the starting adapter ({loaded.adapter_path}), precomputed")
        precompute = self.settings.precompute_ref_log_probs or self.reference_is_start or self._visits_all()
        self.ref_cache = self._precompute_reference() if precompute else None

    examples_per_step = property(lambda self: self.training.per_device_train_batch_size * self.accum)
    dataset_size = property(lambda self: len(self.pairs))

    def _visits_all(self) -> bool:
        """Will the run see every pair at least once? Then one reference forward per pair up front
        costs no more than one per step, and the step drops its reference forward (same values:
        the reference is the frozen adapter-off model)."""
        if self.training.max_steps <= 0:
            return True
        return self.training.max_steps * self.examples_per_step >= len(self.pairs)

    def _arrays(self, indices: list[int]):
        return pair_arrays([self.pairs[i] for i in indices])

    def _precompute_reference(self) -> list[tuple[float, float]]:
        batch = self.training.per_device_train_batch_size
        cache = []
        for start in range(0, len(self.pairs), batch):
            indices = list(range(start, min(start + batch, len(self.pairs))))
            ids, mask, _ = self._arrays(indices)
            logps = reference_logps(self.model, ids, mask, not self.reference_is_start).tolist()
            n = len(indices)
            cache += list(zip(logps[:n], logps[n:]))
        return cache

    def loss(self, input_ids, mask, ref_logps):
        logps = sequence_logps(self.model, input_ids, mask)
        loss, metrics = settings_loss(self.settings, logps, ref_logps, mask)
        return loss / self.accum, metrics

    def next_step(self):
        micro, tokens = [], 0
        for _ in range(self.accum):
            indices = self.stream.take(self.training.per_device_train_batch_size)
            ids, mask, n = self._arrays(indices)
            if self.ref_cache is not None:
                cached = [self.ref_cache[i] for i in indices]
                ref = mx.array([c[0] for c in cached] + [c[1] for c in cached])
            else:
                ref = reference_logps(self.model, ids, mask)
            micro.append((ids, mask, ref))
            tokens += n
        return StepBatch(micro, num_tokens=tokens)
