"""The three methods on TRL: mlxrl's token ids and reward functions handed to TRL's trainers.

Both backends must see the same tokens, so the datasets are encoded by `mlxrl.data.formats` (TRL's
own tokenization, plus mlxrl's assistant-turn mask for SFT `messages`), as on MLX, and truncated
by its `Truncation` (TRL's keep_start):
- SFT: `input_ids` + `completion_mask` (SFTTrainer takes tokenized rows as they are; it packs
  them itself with `data.train.pack`, strategy `bfd`, as mlxrl does on MLX);
- DPO: `prompt_ids` / `chosen_ids` / `rejected_ids` (TRL 1.16's DPOTrainer has no path for
  tokenized rows, so `_prepare_dataset` is overridden to keep them);
- GRPO: TRL samples and tokenizes prompts itself, as `encode_prompt` does on MLX. `RewardBridge`
  turns mlxrl's `RewardSet` into TRL reward functions and writes `completions.jsonl` like the
  MLX loop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets

from mlxrl.data.collators import apply_target, sft_target
from mlxrl.data.formats import Truncation, encode_preference, encode_sft, grpo_template_note
from mlxrl.errors import ConfigError, DataError
from mlxrl.metrics_log import log_completions
from mlxrl.rewards import load_rewards
from mlxrl.torch.checkpoints import safe_trainer_class

TRL_REWARD_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")
logger = logging.getLogger(__name__)


def _encoded(rows: list[dict], what: str, truncation: Truncation) -> datasets.Dataset:
    if truncation.message():
        logger.warning(truncation.message())
    if not rows:
        raise DataError(f"no {what} left after truncation to model.model_max_length")
    return datasets.Dataset.from_list(rows)


def sft_dataset(dataset, tokenizer, max_length: int, target: str = "completion"
                ) -> datasets.Dataset:
    truncation = Truncation(max_length)
    rows = [truncation.sft(apply_target(encode_sft(truncation.cut(row, tokenizer), tokenizer, i), target))
            for i, row in enumerate(dataset)]
    return _encoded([r for r in rows if r is not None], "SFT rows", truncation)


def dpo_dataset(dataset, tokenizer, max_length: int) -> datasets.Dataset:
    truncation = Truncation(max_length)
    rows = [truncation.preference(encode_preference(truncation.cut(row, tokenizer), tokenizer, i), i)
            for i, row in enumerate(dataset)]
    return _encoded([r for r in rows if r is not None], "preference pairs", truncation)


def grpo_dataset(dataset) -> datasets.Dataset:
    if "prompt" not in dataset.column_names:
        raise DataError(f"GRPO data needs a 'prompt' column (has {sorted(dataset.column_names)})")
    return dataset


class RewardBridge:
    """mlxrl's reward functions as TRL reward functions, called as on MLX.

    TRL calls its reward functions one after another on the same batch; the first call scores
    the batch with every function (`RewardSet.score`, so kwargs filtering, `reward_function_kwargs`
    and errors are mlxrl's) and the others read their column.
    """

    def __init__(self, training, weights, log_path: Path | None = None, on_sample=None):
        if not training.reward_functions:
            raise ConfigError("GRPO needs training.reward_functions (e.g. [count_letters])")
        self.rewards = load_rewards(training.reward_functions, training.reward_function_kwargs,
                                    weights=weights)
        self.log_path, self.on_sample = log_path, on_sample  # on_sample(record): a step's sample
        self._scores = None

    def functions(self) -> list:
        """One TRL reward function per mlxrl function; `__name__` names its metrics."""
        fns = []
        for j, name in enumerate(self.rewards.names):
            def fn(prompts, completions, completion_ids=None, _j=j, **kwargs):
                return self._column(_j, prompts, completions, completion_ids, kwargs)

            fn.__name__ = name
            fns.append(fn)
        return fns

    def _column(self, j: int, prompts, completions, completion_ids, kwargs) -> list:
        if j == 0:
            self._scores = self._score(prompts, completions, completion_ids, kwargs)
        return [None if v != v else float(v) for v in self._scores[:, j]]

    def _score(self, prompts, completions, completion_ids, kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in TRL_REWARD_EXTRAS}
        scores = self.rewards.score(prompts, completions, completion_ids, columns)
        state = kwargs.get("trainer_state")
        if self.log_path is not None and (state is None or state.is_world_process_zero):
            sample = log_completions(self.log_path, state.global_step + 1 if state is not None else 0,
                                     prompts, completions, self.rewards.names, scores)
            if self.on_sample is not None and sample is not None:
                self.on_sample(sample)
        return scores

def timed_grpo(base, clock):
    """`base` (TRL's GRPOTrainer) counting its training rollouts' time and tokens into `clock`
    (a `callbacks.RolloutClock`); evaluation's rollouts are not counted."""

    class TimedGRPOTrainer(base):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                clock.seconds += time.perf_counter() - started
            return out

        def _generate(self, prompts):
            started = time.perf_counter()
            out = super()._generate(prompts)
            if self.model.training:
                clock.sampling_seconds += time.perf_counter() - started
                clock.tokens += sum(len(ids) for ids in out[1])  # the completions' token ids
            return out

    return TimedGRPOTrainer


def build_trainer(cfg, loaded, dataset, args, peft_config, callbacks, run_record=None,
                  eval_dataset=None, on_sample=None, rollout_clock=None):
    """TRL's trainer for `cfg.training.method`, on mlxrl-encoded data (`eval_dataset`: the
    validation rows, encoded the same way); GRPO counts its rollouts into `rollout_clock`."""
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    method, tok = cfg.training.method, loaded.tokenizer
    DPOTrainer, GRPOTrainer, SFTTrainer = (
        safe_trainer_class(c, cfg.training.skip_non_finite_steps, run_record, loaded.adapter_fields)
        for c in (DPOTrainer, GRPOTrainer, SFTTrainer))
    common = dict(model=loaded.model, args=args, processing_class=tok, callbacks=callbacks,
                  peft_config=peft_config)
    if method == "sft":
        target = sft_target(cfg.data.train)
        data = sft_dataset(dataset, tok, args.max_length, target)
        if eval_dataset is not None:
            common["eval_dataset"] = sft_dataset(eval_dataset, tok, args.max_length, target)
        return SFTTrainer(train_dataset=data, **common)
    if method == "dpo":
        data = dpo_dataset(dataset, tok, args.max_length)
        if eval_dataset is not None:
            common["eval_dataset"] = dpo_dataset(eval_dataset, tok, args.max_length)

        class TokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already templated, tokenized and truncated by mlxrl

        return TokenizedDPOTrainer(train_dataset=data, **common)
    data = grpo_dataset(dataset)
    if eval_dataset is not None:
        common["eval_dataset"] = grpo_dataset(eval_dataset)
    if note := grpo_template_note(data, cfg.model.chat_template_kwargs):
        logger.warning(note)
    log_path = Path(args.output_dir) / "completions.jsonl" if cfg.training.grpo.log_completions else None
    bridge = RewardBridge(cfg.training, args.reward_weights, log_path, on_sample)
    if rollout_clock is not None:
        GRPOTrainer = timed_grpo(GRPOTrainer, rollout_clock)
    return GRPOTrainer(reward_funcs=bridge.functions(), train_dataset=data, **common)
