"""The valid range of every numeric and enumerated config field, in one table.

`check(obj)` raises `ValueError("<field> must be ..., got ...")` for the first field of a config
dataclass that is outside its range; the config builder turns it into one line naming the YAML
line or the override (`mlxrl.config_parse.Builder`). `None` is always accepted where the field
is optional (it means "the default"); NaN never is, nor infinity unless the rule says so.

Where a range is mlxrl's choice rather than the libraries' limit, the table says why.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    why: str = ""

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check (config_parse) owns this
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number{self._text()}"
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"must be {self._text().strip()}" if too_low or too_high else None

    def _text(self) -> str:
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        text = " and ".join(t for t in (low, high) if t)
        return f" {text}{f' ({self.why})' if self.why else ''}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    values: tuple
    case_sensitive: bool = False

    def problem(self, value) -> str | None:
        if not isinstance(value, str) and value in self.values:
            return None
        fold = (lambda v: v) if self.case_sensitive else (lambda v: str(v).lower())
        if any(fold(value) == fold(v) for v in self.values if isinstance(v, str)):
            return None
        names = [str(v) for v in self.values]
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be one of {', '.join(names)}{hint}"


POSITIVE_INT = Range(1)
COUNT = Range(0)
SEED = Range(0, 2**32 - 1, why="numpy and MLX take 32-bit unsigned seeds")
PROBABILITY = Range(0, 1)
STRATEGIES = OneOf(("no", "steps", "epoch"))
LOG_LEVELS = OneOf(("debug", "info", "warning", "error", "critical", "passive"))

RULES: dict[str, dict[str, Range | OneOf]] = {
    "ModelParams": {"model_max_length": POSITIVE_INT},
    "DatasetParams": {"sample_count": POSITIVE_INT, "mixture_proportion": Range(0, 1, low_open=True),
                      "shuffle_buffer_size": POSITIVE_INT, "seed": SEED, "transform_num_workers": COUNT},
    "DatasetSplitParams": {"mixture_strategy": OneOf(("first_exhausted", "all_exhausted",
                                                      "all_exhausted_without_replacement")),
                           "seed": SEED},
    "GrpoParams": {
        "max_prompt_length": POSITIVE_INT, "max_completion_length": POSITIVE_INT,
        "num_generations": Range(2, why="GRPO compares completions within a group"),
        # Oumi's range is [0, 1]; 0 is refused because the log-probs are divided by it
        "temperature": Range(0, 1, low_open=True, why="GRPO samples and divides the logits by it"),
        "repetition_penalty": Range(0, low_open=True), "vllm_mode": OneOf(("server", "colocate")),
        "vllm_gpu_memory_utilization": Range(0, 1, low_open=True), "epsilon": Range(0),
    },
    "TrainingParams": {
        "per_device_train_batch_size": POSITIVE_INT, "per_device_eval_batch_size": POSITIVE_INT,
        "gradient_accumulation_steps": POSITIVE_INT,
        "max_steps": Range(-1, why="-1 trains num_train_epochs"), "num_train_epochs": POSITIVE_INT,
        "save_steps": Range(0, why="0 writes no checkpoints"), "seed": SEED, "data_seed": SEED,
        "logging_steps": POSITIVE_INT, "eval_steps": POSITIVE_INT,
        "learning_rate": Range(0), "warmup_ratio": PROBABILITY, "warmup_steps": COUNT,
        "weight_decay": Range(0), "adam_beta1": Range(0, 1, high_open=True),
        "adam_beta2": Range(0, 1, high_open=True), "adam_epsilon": Range(0, low_open=True),
        "sgd_momentum": Range(0), "max_grad_norm": Range(0, why="0 does not clip"),
        "logging_strategy": STRATEGIES, "eval_strategy": STRATEGIES,
        "mixed_precision_dtype": OneOf(("none", "fp16", "bf16")),
        "log_level": LOG_LEVELS, "dep_log_level": LOG_LEVELS,
        "dataloader_prefetch_factor": POSITIVE_INT, "empty_device_cache_steps": POSITIVE_INT,
        "nccl_default_timeout_minutes": Range(0, low_open=True), "dataloader_num_workers": COUNT,
    },
    "PeftParams": {
        "lora_r": POSITIVE_INT, "lora_alpha": Range(0, low_open=True),
        "lora_dropout": Range(0, 1, high_open=True), "lora_bias": OneOf(("none", "all", "lora_only")),
        "lora_task_type": OneOf(("CAUSAL_LM",), case_sensitive=True),
        "q_lora_bits": OneOf((2, 3, 4, 5, 6, 8)), "bnb_4bit_quant_type": OneOf(("fp4", "nf4")),
        "peft_save_mode": OneOf(("ADAPTER_ONLY", "ADAPTER_AND_BASE_MODEL", "MERGED")),
    },
    "GenerationParams": {
        "max_new_tokens": POSITIVE_INT, "batch_size": POSITIVE_INT, "temperature": Range(0),
        "top_p": Range(0, 1, low_open=True), "top_k": COUNT, "min_p": PROBABILITY,
        "frequency_penalty": Range(-2, 2), "presence_penalty": Range(-2, 2),
        "num_beams": POSITIVE_INT, "seed": SEED,
    },
    "DpoSettings": {
        "beta": Range(0, low_open=True),
        "label_smoothing": Range(0, 0.5, high_open=True, why="the robust loss divides by 1 - 2 x it"),
        "max_length": POSITIVE_INT, "truncation_mode": OneOf(("keep_start", "keep_end")),
        "f_divergence_type": OneOf(("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")),
        "f_alpha_divergence_coef": Range(),  # any finite alpha (1 falls back to reverse_kl, as in TRL)
        "ld_alpha": PROBABILITY, "discopop_tau": Range(0, low_open=True, why="the loss divides by it"),
    },
    "GrpoSettings": {
        "num_generations": Range(2, why="GRPO compares completions within a group"),
        "max_completion_length": POSITIVE_INT,
        "temperature": Range(0, low_open=True, why="GRPO samples and divides the logits by it"),
        "top_p": Range(0, 1, low_open=True), "top_k": COUNT, "min_p": PROBABILITY,
        "epsilon": Range(0), "epsilon_high": Range(0), "delta": Range(0, low_open=True),
        "beta": Range(0), "num_iterations": POSITIVE_INT,
        "importance_sampling_level": OneOf(("token", "sequence")),
        "scale_rewards": OneOf(("group", "batch", "none", True, False)),
        "vllm_mode": OneOf(("server", "colocate")),
        "sapo_temperature_pos": Range(0, low_open=True, why="SAPO divides by it"),
        "sapo_temperature_neg": Range(0, low_open=True, why="SAPO divides by it"),
        "vespo_k_pos": Range(0), "vespo_k_neg": Range(0),  # exponents of the importance weight
        "vespo_lambda_pos": Range(0), "vespo_lambda_neg": Range(0),  # decay rates (TRL clamps at 1e-4)
    },
    "EvalTaskParams": {"num_samples": POSITIVE_INT, "beta": Range(0, low_open=True)},
}


def problems(obj) -> list[tuple[str, str]]:
    """(field, "field must be ..., got value") for each field of `obj` outside its range."""
    out = []
    for name, rule in RULES.get(type(obj).__name__, {}).items():
        value = getattr(obj, name)
        if value is None:
            continue
        problem = rule.problem(value)
        if problem is not None:
            out.append((name, f"{name} {problem}, got {value!r}"))
    return out


def check(obj) -> None:
    """Raise ValueError for the first field of `obj` outside its range."""
    found = problems(obj)
    if found:
        raise ValueError(found[0][1])
