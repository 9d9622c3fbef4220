"""DPO on MLX: pairs, the reference, and the training loop.

The loss is TRL 1.16's, every `loss_type` and option (`mlxrl/mlx/dpo_loss.py`).
"""

import contextlib
import logging

import mlx.core as mx

from mlxrl.data.formats import Truncation, encode_preference
from mlxrl.errors import DataError
from mlxrl.mlx.dpo_loss import (  # noqa: F401  (re-exported: the loss's public names)
    DPO_LOSSES,
    F_DIVERGENCES,
    completion_logps,
    dpo_loss,
    dpo_metrics,
    settings_loss,
)
from mlxrl.mlx.logprobs import (
    first_scored_position,
    per_token_logps,
    per_token_logps_and_log_sum_sq,
    scored_from,
)
from mlxrl.mlx.model import adapters_disabled
from mlxrl.mlx.shared_prefix import layout, shared_rows
from mlxrl.mlx.trainer import (
    IndexStream,
    StepBatch,
    StreamPosition,
    pad_rows,
    row_width,
    total_steps_for,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Training: chosen and rejected in one concatenated forward; the reference is the same model
# with its adapters switched off (a forward outside the differentiated function), or log-probs
# precomputed once for the whole dataset (`precompute_ref_log_probs`). A full fine-tune
# (`training.use_peft: false`) has no adapter to switch off: the starting model's log-probs are
# precomputed for the pairs the run will visit (the order is a function of the seed), one forward
# per pair, as many as a per-step reference forward would make, and no second copy in memory.


def _pair_rows(pair: dict) -> tuple:
    """(chosen ids, chosen mask, rejected ids, rejected mask): prompt + completion, mask on
    the completion."""
    prompt = pair["prompt_ids"]
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        out += [prompt + pair[key], [0] * len(prompt) + [1] * len(pair[key])]
    return tuple(out)


def encode_pairs(dataset, tokenizer, max_length: int) -> list[tuple]:
    truncation = Truncation(max_length)
    pairs = []
    for i, row in enumerate(dataset):
        pair = truncation.preference(encode_preference(truncation.cut(row, tokenizer), tokenizer, i), i)
        if pair is not None:
            pairs.append(_pair_rows(pair))
    if truncation.message():
        logger.warning(truncation.message())
    if not pairs:
        raise DataError("no preference pairs left after truncation to model.model_max_length")
    return pairs


def pair_arrays(pairs: list[tuple], model=None) -> tuple:
    """[chosen...; rejected...] token rows right-padded to a bucket, and their completion masks
    without the leading columns that no row's completion reaches (a multiple of 8 of them, so
    the compiled step sees few shapes): `ids.shape[1] - mask.shape[1]` is the first position
    whose next-token log-prob is computed (`scored_from`). With `model`, when it pays
    (`shared_prefix.layout`), the rows come with each prompt once for its chosen and rejected
    answers (`shared_prefix.shared_rows`), their suffixes packed where that pays too, and masks
    over their suffixes. The third value is the tokens of the rows."""
    rows = [p[0] for p in pairs] + [p[2] for p in pairs]
    masks = [p[1] for p in pairs] + [p[3] for p in pairs]
    width = row_width(max(len(r) for r in rows))
    tokens = sum(len(r) for r in rows)
    prompts = [p[0][:len(p[1]) - sum(p[1])] for p in pairs]
    suffix_width = row_width(1 + max(sum(m) for m in masks))
    suffixes = [r[len(prompts[i % len(pairs)]):] for i, r in enumerate(rows)]
    share, pack = (False, False) if model is None else \
        layout(model, prompts, suffixes, len(rows), width, suffix_width)
    if share:
        shared = shared_rows(prompts, suffixes, list(range(len(pairs))) * 2, suffix_width, pack)
        return shared, pad_rows([[0] + [1] * len(s) for s in suffixes], suffix_width), tokens
    start = first_scored_position(masks)
    return pad_rows(rows, width), pad_rows(masks, width)[:, start:], tokens


def policy_loss(model, settings, input_ids, mask, ref_logps):
    """The run's DPO loss and metrics for [chosen; rejected] rows under `model` (`mask` as
    `pair_arrays` gives it)."""
    start = scored_from(input_ids, mask)
    if settings.use_weighting:
        token_logps, log_sum_sq = per_token_logps_and_log_sum_sq(model, input_ids, start)
    else:
        token_logps, log_sum_sq = per_token_logps(model, input_ids, start=start), None
    logps = completion_logps(token_logps, mask, settings.ld_alpha)
    return settings_loss(settings, logps, ref_logps, mask, token_logps, log_sum_sq)


def reference_graph(model, input_ids, mask, adapters_off: bool = True,
                    ld_alpha: float | None = None) -> mx.array:
    """Summed (ld_alpha-weighted) completion log-probs of the reference policy (by default the
    adapter-off model), not evaluated and cut from the gradient."""
    start = scored_from(input_ids, mask)
    with adapters_disabled(model) if adapters_off else contextlib.nullcontext():
        logps = completion_logps(per_token_logps(model, input_ids, start=start), mask, ld_alpha)
    return mx.stop_gradient(logps)


def reference_logps(model, input_ids, mask, adapters_off: bool = True,
                    ld_alpha: float | None = None) -> mx.array:
    """`reference_graph`, evaluated."""
    logps = reference_graph(model, input_ids, mask, adapters_off, ld_alpha)
    mx.eval(logps)
    return logps


def preference_eval(model, tokenizer, dataset, settings, batch_size: int = 8,
                    reference=None) -> dict[str, float]:
    """TRL's DPO metrics (and loss) over a whole held-out dataset, policy vs adapter-off ref
    (or vs `reference`, another model: a full fine-tune's starting model)."""
    pairs = encode_pairs(dataset, tokenizer, settings.max_length)
    cached = None if reference is None else model_logps(reference, pairs, batch_size, settings.ld_alpha)
    return pairs_metrics(model, settings, pairs, batch_size, cached) | {"num_pairs": len(pairs)}


def model_logps(model, pairs: list[tuple], batch_size: int, ld_alpha: float | None = None,
                indices=None, adapters_off: bool = False) -> list[tuple[float, float] | None]:
    """(chosen, rejected) log-probs of `model` as it is (no dropout) for `pairs` at `indices`
    (all by default; None for the others)."""
    indices = list(range(len(pairs)) if indices is None else indices)
    cache: list[tuple[float, float] | None] = [None] * len(pairs)
    training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids, mask, _ = pair_arrays([pairs[i] for i in chunk], model)
            logps = reference_logps(model, ids, mask, adapters_off, ld_alpha).tolist()
            for j, i in enumerate(chunk):
                cache[i] = (logps[j], logps[len(chunk) + j])
    finally:
        model.train(training)
    return cache


def pairs_metrics(model, settings, pairs: list[tuple], batch_size: int,
                  reference: list[tuple[float, float]] | None = None) -> dict[str, float]:
    """The DPO loss and metrics over `pairs`, batch by batch, each weighted by its pairs; the
    reference is the adapter-off model unless `reference` gives its (chosen, rejected) log-probs."""
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask, _ = pair_arrays(chunk, model)
        if reference is None:
            ref = reference_logps(model, ids, mask, ld_alpha=settings.ld_alpha)
        else:
            cached = reference[start:start + batch_size]
            ref = mx.array([c[0] for c in cached] + [c[1] for c in cached])
        loss, metrics = policy_loss(model, settings, ids, mask, ref)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {k: v / len(pairs) for k, v in totals.items()}


class DPOMethod(StreamPosition):
    name = "dpo"

    def __init__(self, cfg, loaded, dataset):
        self.model, self.training = loaded.model, cfg.training
        self.tokenizer = loaded.tokenizer
        self.settings = cfg.dpo_settings()  # its options were checked when the config loaded
        logger.info(f"tokenizing {len(dataset)} preference pairs")
        self.pairs = encode_pairs(dataset, loaded.tokenizer, self.settings.max_length)
        self.accum = self.training.gradient_accumulation_steps
        self.stream = IndexStream(len(self.pairs), self.training.seed)
        # Starting from a trained adapter (e.g. DPO after SFT), the reference is that starting
        # policy, as TRL's frozen "ref" adapter copy: its log-probs are computed once, up front.
        self.reference_is_start = loaded.adapter_path is not None
        if self.reference_is_start:
            logger.warning(f"note: the DPO reference is the starting adapter ({loaded.adapter_path}), precomputed")
        self.full = not cfg.training.use_peft  # a full fine-tune: the reference is its start
        self.ref_cache = None
        if self.settings.precompute_ref_log_probs or self.reference_is_start or self._visits_all():
            self.ref_cache = self._precompute_reference(self.pairs)
        elif self.full:
            self.ref_cache = self._precompute_reference(self.pairs, self._visited())

    def evaluation(self, dataset):
        """TRL's DPO metrics on `dataset` (its evaluation loop: loss and rewards/* weighted by
        batch); the reference as in training (a starting adapter's or a full fine-tune's starting
        log-probs computed now, before any update)."""
        pairs = encode_pairs(dataset, self.tokenizer, self.settings.max_length)
        starts = self.reference_is_start or self.full
        reference = self._precompute_reference(pairs) if starts else None
        size = self.training.per_device_eval_batch_size

        def run() -> dict:
            self.model.eval()
            try:
                metrics = pairs_metrics(self.model, self.settings, pairs, size, reference)
            finally:
                self.model.train()
            return metrics | {"num_samples": len(pairs), "num_batches": -(-len(pairs) // size)}

        return run

    examples_per_step = property(lambda self: self.training.per_device_train_batch_size * self.accum)
    dataset_size = property(lambda self: len(self.pairs))

    def _visits_all(self) -> bool:
        """Will the run see every pair at least once? Then one reference forward per pair up front
        costs no more than one per step, and the step drops its reference forward (same values:
        the reference is the frozen adapter-off model)."""
        if self.training.max_steps <= 0:
            return True
        return self.training.max_steps * self.examples_per_step >= len(self.pairs)

    def _visited(self) -> list[int]:
        """The pairs this run's steps will draw, in order of index."""
        steps = total_steps_for(self.training, self.examples_per_step, len(self.pairs))
        stream = IndexStream(len(self.pairs), self.training.seed)
        return sorted(set(stream.take(steps * self.examples_per_step)))

    def _arrays(self, indices: list[int]):
        return pair_arrays([self.pairs[i] for i in indices], self.model)

    def _precompute_reference(self, pairs: list[tuple], indices=None) -> list[tuple[float, float] | None]:
        """(chosen, rejected) reference log-probs of `pairs` at `indices` (all by default; None for
        the others), computed now, before any update (and before a resume loads the checkpoint's
        weights)."""
        count = len(pairs) if indices is None else len(indices)
        logger.info(f"computing the reference's log-probs for {count} pairs")
        adapters_off = not (self.reference_is_start or self.full)
        return model_logps(self.model, pairs, self.training.per_device_train_batch_size,
                           self.settings.ld_alpha, indices, adapters_off)

    def loss(self, input_ids, mask, ref_logps=None):
        """Without `ref_logps` the reference forward (adapters off) runs here, inside the
        trainer's compiled step."""
        if ref_logps is None:
            ref_logps = reference_graph(self.model, input_ids, mask, ld_alpha=self.settings.ld_alpha)
        loss, metrics = policy_loss(self.model, self.settings, input_ids, mask, ref_logps)
        return loss / self.accum, metrics

    def next_step(self):
        micro, tokens = [], 0
        for _ in range(self.accum):
            indices = self.stream.take(self.training.per_device_train_batch_size)
            ids, mask, n = self._arrays(indices)
            if self.ref_cache is not None:
                cached = [self.ref_cache[i] for i in indices]
                micro.append((ids, mask, mx.array([c[0] for c in cached] + [c[1] for c in cached])))
            else:
                micro.append((ids, mask))
            tokens += n
        return StepBatch(micro, num_tokens=tokens)
