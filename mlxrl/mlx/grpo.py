"""GRPO on MLX: rollouts, rewards and advantages, and the training loop.

The loss and the advantages are TRL 1.16's (`mlxrl/mlx/grpo_loss.py`, every `loss_type`). Where
TRL departs from the GRPO paper (and so do we): `beta = 0` by default (no reference forward at
all); the ratio is clipped PPO-style with an optional asymmetric `epsilon_high` (DAPO); the
default aggregation is `dapo` (token mean over the window) rather than the paper's per-sequence
mean (`grpo`); `scale_rewards="none"` drops the std division (Dr. GRPO).
"""

import logging
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxrl.data.formats import encode_prompt, grpo_template_note, unwrap
from mlxrl.errors import ConfigError
from mlxrl.loss_types import grpo_notes
from mlxrl.metrics_log import log_completions
from mlxrl.mlx.full_model import frozen_copy
from mlxrl.mlx.grpo_loss import (  # noqa: F401  (re-exported: the loss's public names)
    GRPO_AGGREGATIONS,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    clip_metrics,
    group_advantages,
    grpo_loss,
    per_token_kl,
)
from mlxrl.mlx.grpo_reuse import RolloutReuse
from mlxrl.mlx.logprobs import first_scored_position, per_token_logps, scored_from
from mlxrl.mlx.model import adapters_disabled
from mlxrl.mlx.shared_prefix import layout, shared_rows
from mlxrl.mlx.trainer import IndexStream, StepBatch, StreamPosition, pad_rows, row_width
from mlxrl.reward_metrics import reward_metrics
from mlxrl.rewards import load_rewards

logger = logging.getLogger(__name__)

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

    def __init__(self, cfg, loaded, dataset):
        self.model, self.training = loaded.model, cfg.training
        self.settings = s = cfg.grpo_settings()
        if not self.training.reward_functions:
            raise ConfigError("GRPO needs training.reward_functions (e.g. [count_letters])")
        for note in grpo_notes(s):
            logger.warning(note)
        self.rewards = load_rewards(self.training.reward_functions, self.training.reward_function_kwargs,
                                    weights=s.reward_weights)
        self.tokenizer = unwrap(loaded.tokenizer)
        self.eos_ids = sorted(loaded.tokenizer.eos_token_ids)
        self.rows = [dict(row) for row in dataset]
        self.template_kwargs = dict(cfg.model.chat_template_kwargs or {})
        if note := grpo_template_note(self.rows, self.template_kwargs):
            logger.warning(note)
        logger.info(f"tokenizing {len(self.rows)} prompts")
        self.prompt_ids = [encode_prompt(row, loaded.tokenizer, i, self.template_kwargs)
                           for i, row in enumerate(self.rows)]
        self.loaded_tokenizer = loaded.tokenizer
        self.accum = self.training.gradient_accumulation_steps
        completions = self.training.per_device_train_batch_size * self.accum
        self.prompts_per_step = completions // s.num_generations
        self.stream = IndexStream(len(self.rows), self.training.seed)
        self.step_count = 0
        self.completions_log = Path(self.training.output_dir) / "completions.jsonl" if s.log_completions else None
        self.reuse = RolloutReuse(self, s.num_iterations) if s.num_iterations > 1 else None
        self.last_sample: dict | None = None  # the first completion of the last rollout (log_completions)
        # The KL's reference: the adapter-off model, or for a full fine-tune a frozen copy of the
        # starting weights (one more copy of the weights in memory, from the first update on).
        self.reference = frozen_copy(self.model) if s.beta != 0.0 and not cfg.training.use_peft else None

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
        logps = per_token_logps(self.model, input_ids, s.temperature, scored_from(input_ids, mask))
        ref = ref_logps if s.beta != 0.0 else None
        old = mx.stop_gradient(logps) if old_logps is None else old_logps
        return grpo_loss(logps, old, ref, advantages, mask[:, 1:],
                         beta=s.beta, epsilon=s.epsilon, epsilon_high=s.epsilon_high,
                         loss_type=s.loss_type, importance_sampling_level=s.importance_sampling_level,
                         max_completion_length=s.max_completion_length, num_items_in_batch=num_items,
                         grad_accum=self.accum, delta=s.delta, use_bias_correction_kl=s.use_bias_correction_kl,
                         sapo_temperature_neg=s.sapo_temperature_neg, sapo_temperature_pos=s.sapo_temperature_pos,
                         vespo=(s.vespo_k_pos, s.vespo_lambda_pos, s.vespo_k_neg, s.vespo_lambda_neg))

    def _rollout(self, indices: list[int], prompt_ids=None, seed: int | None = None):
        from mlxrl.mlx.sampling import sample

        s = self.settings
        prompt_ids = self.prompt_ids if prompt_ids is None else prompt_ids
        seed = self.training.seed * 100_003 + self.step_count if seed is None else seed
        self.model.eval()
        try:
            rollout = sample(self.model, [prompt_ids[i] for i in indices], num_generations=s.num_generations,
                             max_tokens=s.max_completion_length, temperature=s.temperature, top_p=s.top_p,
                             top_k=s.top_k, min_p=s.min_p or 0.0, eos_token_ids=self.eos_ids,
                             seed=seed, repetition_penalty=self.training.grpo.repetition_penalty or 1.0)
        finally:
            self.model.train()
        return rollout

    def _score(self, indices: list[int], completion_ids: list[list[int]], source=None
               ) -> tuple[np.ndarray, np.ndarray]:
        G = self.settings.num_generations
        rows = [(self.rows if source is None else source)[i] for i in indices for _ in range(G)]
        texts = [_completion_text(self.tokenizer, ids) for ids in completion_ids]
        conversational = isinstance(rows[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        scores = self.rewards.score([r["prompt"] for r in rows], completions, completion_ids, columns)
        if self.completions_log is not None and source is None:
            self.last_sample = log_completions(self.completions_log, self.step_count,
                                               [r["prompt"] for r in rows], texts, self.rewards.names,
                                               scores)
        return scores, self.rewards.total(scores)

    def next_step(self) -> StepBatch:
        return self.rollout_step() if self.reuse is None else self.reuse.next_step()

    def rollout_step(self) -> StepBatch:
        """Sample, score and batch one rollout: the micro-batches of one optimizer step."""
        s = self.settings
        indices = self.stream.take(self.prompts_per_step)
        started = time.perf_counter()
        rollout = self._rollout(indices)
        self.step_count += 1
        lengths, finished = np.asarray(rollout.lengths), np.asarray(rollout.finished)
        completion_ids = [rollout.tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]
        scores, total = self._score(indices, completion_ids)
        rollout_time = time.perf_counter() - started
        advantages = group_advantages(total, s.num_generations, s.scale_rewards)
        prompts = [self.prompt_ids[indices[int(p)]] for p in rollout.prompt_index]
        rows = [p + c for p, c in zip(prompts, completion_ids)]
        masks = [[0] * len(p) + [int(finished[i] or not s.mask_truncated_completions)] * len(c)
                 for i, (p, c) in enumerate(zip(prompts, completion_ids))]
        num_items = mx.array(float(sum(map(sum, masks))))
        micro = self._micro_batches(prompts, completion_ids, masks, advantages, num_items)
        metrics = reward_metrics(self.rewards.names, scores, total, s.num_generations, s.scale_rewards)
        metrics.update(completion_metrics(lengths, finished))
        metrics["rollout_tokens_per_second"] = float(rollout.tokens_per_second)
        metrics["rollout_time"] = rollout_time
        return StepBatch(micro, metrics, num_tokens=sum(map(len, rows)))

    def evaluation(self, dataset):
        """TRL's GRPO evaluation on `dataset`'s prompts: `num_generations` completions each,
        sampled as in training, scored by the reward functions (reward, reward_std,
        rewards/<name>/mean|std, completions/*)."""
        rows = [dict(row) for row in dataset]
        prompt_ids = [encode_prompt(row, self.loaded_tokenizer, i, self.template_kwargs)
                      for i, row in enumerate(rows)]
        s = self.settings
        per_batch = max(1, self.training.per_device_eval_batch_size // s.num_generations)

        def run() -> dict:
            scores, lengths, finished = [], [], []
            for start in range(0, len(rows), per_batch):
                indices = list(range(start, min(start + per_batch, len(rows))))
                rollout = self._rollout(indices, prompt_ids, seed=self.training.seed * 7_919 + start)
                n = np.asarray(rollout.lengths)
                ids = [rollout.tokens[i, :n[i]].tolist() for i in range(len(n))]
                scores.append(self._score(indices, ids, source=rows)[0])
                lengths.append(n)
                finished.append(np.asarray(rollout.finished))
            scored = np.concatenate(scores)
            out = reward_metrics(self.rewards.names, scored, self.rewards.total(scored),
                                 s.num_generations, s.scale_rewards)
            out.update(completion_metrics(np.concatenate(lengths), np.concatenate(finished)))
            return out | {"num_samples": len(scored), "num_batches": -(-len(rows) // per_batch)}

        return run

    def _micro_batches(self, prompts, completions, masks, advantages, num_items) -> list[tuple]:
        """Each micro-batch's rows (`_rows`), masks, advantages, reference log-probs (zeros
        with beta 0) and the step's loss-token count."""
        bs = self.training.per_device_train_batch_size
        widths = (row_width(max(len(p) + len(c) for p, c in zip(prompts, completions))),
                  row_width(1 + max(map(len, completions))), first_scored_position(masks))
        micro = []
        for start in range(0, len(prompts), bs):
            part = slice(start, start + bs)
            ids, mask = self._rows(prompts[part], completions[part], masks[part], *widths)
            if self.settings.beta != 0.0:
                ref = self._reference_logps(ids, scored_from(ids, mask))
            else:
                ref = mx.zeros((mask.shape[0], mask.shape[1] - 1))
            micro.append((ids, mask, mx.array(advantages[part]), ref, num_items))
        return micro

    def _rows(self, prompts, completions, masks, width, suffix_width, scored):
        """The rows with each prompt once for its completions (`shared_prefix`; the completions
        packed where EOS made them uneven) and masks over their suffixes, when that pays
        (`shared_prefix.layout`); else right-padded rows and masks without the prompt columns no row scores
        (`logprobs.scored_from`)."""
        unique = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
        share, pack = layout(self.model, unique, completions, len(prompts), width, suffix_width)
        if share:
            index = {tuple(p): i for i, p in enumerate(unique)}
            ids = shared_rows(unique, completions, [index[tuple(p)] for p in prompts], suffix_width, pack)
            return ids, pad_rows([[0] + m[len(p):] for p, m in zip(prompts, masks)], suffix_width)
        rows = [p + c for p, c in zip(prompts, completions)]
        return pad_rows(rows, width), pad_rows(masks, width)[:, scored:]

    def _reference_logps(self, ids: mx.array, start: int) -> mx.array:
        if self.reference is not None:
            ref = per_token_logps(self.reference, ids, self.settings.temperature, start)
        else:
            with adapters_disabled(self.model):
                ref = per_token_logps(self.model, ids, self.settings.temperature, start)
        mx.eval(ref)
        return ref
