"""The one config schema, shared by both backends.

Sections and field names follow Oumi's `TrainingConfig` (reference/oumi-compat.md), so Oumi
recipes and the walkthrough's configs load as they are. Precedence: dataclass defaults < YAML <
command-line overrides. Method knobs that Oumi passes straight to TRL (`beta`, `loss_type`, ...)
live in `training.trainer_kwargs`; `dpo_settings()` / `grpo_settings()` resolve them, with TRL's
defaults, into one object that each backend reads, so neither backend's defaults decide a run.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxrl import chat_templates, config_ranges, loss_types, schedules
from mlxrl.config_parse import Builder, apply_override, key_path, load_yaml, split_overrides
from mlxrl.data.collators import check_collator
from mlxrl.errors import ConfigError

METHODS = {"TRL_SFT": "sft", "TRL_DPO": "dpo", "TRL_GRPO": "grpo", "HF": "sft", "OUMI": "sft",
           "SFT": "sft", "DPO": "dpo", "GRPO": "grpo"}


@dataclass
class ModelParams:
    model_name: str | None = None
    adapter_model: str | None = None
    tokenizer_name: str | None = None
    tokenizer_pad_token: str | None = None
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    model_max_length: int | None = None
    load_pretrained_weights: bool = True
    trust_remote_code: bool = False
    torch_dtype_str: str = "auto"
    compile: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = None
    device_map: str | None = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    enable_liger_kernel: bool = False
    shard_for_eval: bool = False
    freeze_layers: list[str] = field(default_factory=list)
    model_revision: str | None = None

    def __post_init__(self):
        valid = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
        if self.torch_dtype_str not in valid:
            raise ValueError(f"torch_dtype_str {self.torch_dtype_str!r} is not one of {valid}")
        config_ranges.check(self)
        chat_templates.check_name(self.chat_template)


@dataclass
class DatasetParams:
    dataset_name: str | None = None
    dataset_path: str | None = None
    subset: str | None = None
    split: str = "train"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_count: int | None = None
    mixture_proportion: float | None = None
    shuffle: bool = False
    seed: int | None = None
    shuffle_buffer_size: int = 1000
    trust_remote_code: bool = False
    transform_num_workers: str | int | None = None

    def __post_init__(self):
        if not self.dataset_name and not self.dataset_path:
            raise ValueError("dataset_name is required (a hub name or a local .jsonl/.json/.parquet path)")
        config_ranges.check(self)


@dataclass
class DatasetSplitParams:
    datasets: list[DatasetParams] = field(default_factory=list)
    collator_name: str | None = None
    collator_kwargs: dict[str, Any] = field(default_factory=dict)
    train_target: str | None = None  # all_assistant_turns | final_assistant_turn
    pack: bool = False
    stream: bool = False
    target_col: str | None = None
    mixture_strategy: str = "first_exhausted"
    seed: int | None = None
    use_async_dataset: bool = False
    use_torchdata: bool | None = None

    def __post_init__(self):
        config_ranges.check(self)
        self.train_target = check_collator(self.collator_name, self.train_target)


@dataclass
class DataParams:
    train: DatasetSplitParams = field(default_factory=DatasetSplitParams)
    validation: DatasetSplitParams = field(default_factory=DatasetSplitParams)
    test: DatasetSplitParams = field(default_factory=DatasetSplitParams)


@dataclass
class GrpoParams:
    model_init_kwargs: dict[str, Any] = field(default_factory=dict)
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    num_generations: int | None = None
    temperature: float = 0.9
    remove_unused_columns: bool = False
    repetition_penalty: float | None = 1.0
    use_vllm: bool = False
    vllm_mode: str | None = None
    vllm_gpu_memory_utilization: float = 0.9
    epsilon: float = 0.2
    log_completions: bool = False
    rollout_function: str | None = None

    def __post_init__(self):
        config_ranges.check(self)


@dataclass
class TrainingParams:
    use_peft: bool = False
    trainer_type: str = "HF"
    enable_gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "output"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: int = 3
    save_epoch: bool = False
    save_steps: int = 500
    save_final_model: bool = True
    seed: int = 42
    data_seed: int = 42
    use_deterministic: bool = False
    full_determinism: bool = False
    run_name: str | None = None
    metrics_function: str | None = None
    reward_functions: list[str] | None = None
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    grpo: GrpoParams = field(default_factory=GrpoParams)
    gkd: dict[str, Any] = field(default_factory=dict)
    gold: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"
    dep_log_level: str = "warning"
    enable_wandb: bool = False
    enable_mlflow: bool = False
    enable_tensorboard: bool = True
    logging_strategy: str = "steps"
    logging_dir: str | None = None
    logging_steps: int = 50
    logging_first_step: bool = False
    eval_strategy: str = "no"
    eval_steps: int = 500
    learning_rate: float = 5e-05
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-08
    sgd_momentum: float = 0.0
    mixed_precision_dtype: str = "none"
    compile: bool = False
    include_performance_metrics: bool = False
    include_alternative_mfu_metrics: bool = False
    log_model_summary: bool = False
    resume_from_checkpoint: str | None = None
    try_resume_from_last_checkpoint: bool = False
    dataloader_num_workers: int | str = 0
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    dataloader_main_process_only: bool | None = None
    ddp_find_unused_parameters: bool | None = None
    max_grad_norm: float | None = 1.0
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    verl_config_overrides: dict[str, Any] = field(default_factory=dict)
    profiler: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    empty_device_cache_steps: int | None = None
    nccl_default_timeout_minutes: float | None = None
    label_ignore_index: int | None = None
    # mlxrl extensions (not in Oumi's schema)
    skip_non_finite_steps: bool = False  # skip a step with a NaN/inf loss or gradient instead of stopping

    def __post_init__(self):
        if self.trainer_type.upper() not in METHODS:
            valid = "TRL_SFT, TRL_DPO, TRL_GRPO, sft, dpo, grpo"
            close = difflib.get_close_matches(self.trainer_type.upper(), list(METHODS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"trainer_type {self.trainer_type!r} is not supported{hint}; use one of {valid}")
        config_ranges.check(self)
        schedules.check(self.lr_scheduler_type, self.lr_scheduler_kwargs, self.learning_rate)
        if self.max_steps == 0 or self.num_train_epochs < 1 and self.max_steps < 0:
            raise ValueError("nothing to train: set max_steps > 0 or num_train_epochs >= 1")

    @property
    def method(self) -> str:
        """'sft', 'dpo' or 'grpo'."""
        return METHODS[self.trainer_type.upper()]


@dataclass
class PeftParams:
    lora_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    lora_exclude_modules: list[str] | None = None
    lora_target_parameters: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    lora_bias: str = "none"
    lora_init_weights: str = "DEFAULT"
    lora_task_type: str = "CAUSAL_LM"
    use_dora: bool = False
    q_lora: bool = False
    q_lora_bits: int = 4
    bnb_4bit_quant_type: str = "fp4"
    llm_int8_skip_modules: list[str] | None = None
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str = "uint8"
    bnb_4bit_compute_dtype: str = "float32"
    peft_save_mode: str = "ADAPTER_ONLY"

    def __post_init__(self):
        config_ranges.check(self)

    @property
    def lora_scale(self) -> float:
        """mlx-lm's LoRA multiplier: PEFT's lora_alpha / r."""
        return float(self.lora_alpha) / self.lora_r


@dataclass
class GenerationParams:
    max_new_tokens: int = 1024
    batch_size: int | None = 1
    exclude_prompt_from_response: bool = True
    seed: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, Any] = field(default_factory=dict)
    stop_strings: list[str] | None = None
    stop_token_ids: list[int] | None = None
    num_beams: int = 1
    use_sampling: bool = False
    use_cache: bool = False
    skip_special_tokens: bool = True
    guided_decoding: dict[str, Any] | None = None

    def __post_init__(self):
        config_ranges.check(self)


@dataclass
class TrainConfig:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    training: TrainingParams = field(default_factory=TrainingParams)
    peft: PeftParams = field(default_factory=PeftParams)
    generation: GenerationParams = field(default_factory=GenerationParams)
    fsdp: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # resolve the method's settings (trainer_kwargs, their ranges and loss options) now, so a bad
        # value stops at load, not at step 1
        try:
            if self.training.method == "dpo":
                self.dpo_settings()
            elif self.training.method == "grpo":
                self.grpo_settings(check_batch=False)
        except (ValueError, TypeError) as e:
            message = str(e)
            if not message.startswith("training.trainer_kwargs"):
                message = f"training.trainer_kwargs: {message}"
            raise ValueError(message) from None

    def dpo_settings(self) -> DpoSettings:
        return _settings(DpoSettings, self.training.trainer_kwargs, "dpo",
                         max_length=self.model.model_max_length or DpoSettings.max_length)

    def grpo_settings(self, check_batch: bool = True) -> GrpoSettings:
        g = self.training.grpo
        fixed = {"temperature": g.temperature, "epsilon": g.epsilon,
                 "num_generations": g.num_generations or GrpoSettings.num_generations,
                 "max_completion_length": g.max_completion_length or GrpoSettings.max_completion_length,
                 "log_completions": g.log_completions}
        for key in fixed.keys() & self.training.trainer_kwargs.keys():
            raise ConfigError(f"training.trainer_kwargs.{key} duplicates training.grpo.{key}; "
                              f"set it under training.grpo")
        if g.vllm_mode is not None and "vllm_mode" not in self.training.trainer_kwargs:
            fixed["vllm_mode"] = g.vllm_mode
        settings = _settings(GrpoSettings, self.training.trainer_kwargs, "grpo", **fixed)
        if check_batch:
            _check_grpo_batch(self.training, settings.num_generations)
        return settings


@dataclass
class DpoSettings:
    """DPO knobs (TRL's DPOConfig names and defaults), from `training.trainer_kwargs`."""

    beta: float = 0.1
    loss_type: str | list = "sigmoid"
    loss_weights: list | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter completion
    use_weighting: bool = False  # WPO
    discopop_tau: float = 0.05
    max_length: int = 1024
    precompute_ref_log_probs: bool = False
    truncation_mode: str = "keep_start"
    disable_dropout: bool = True  # TRL's DPO default: LoRA dropout off

    def __post_init__(self):
        loss_types.check_dpo(self)


@dataclass
class GrpoSettings:
    """GRPO knobs (TRL's GRPOConfig names and defaults) from `training.grpo` and `trainer_kwargs`."""

    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None  # two-sided clip of the ratio (INTELLECT-2)
    beta: float = 0.0
    use_bias_correction_kl: bool = True  # k3 KL times the importance ratio (TRL 1.16's default)
    loss_type: str = "dapo"
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    scale_rewards: str | bool = "group"
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    reward_weights: list | None = None
    log_completions: bool = False
    num_iterations: int = 1
    vllm_mode: str = "colocate"
    disable_dropout: bool = False

    def __post_init__(self):
        loss_types.check_grpo(self)


_IGNORED_TRL_KEYS = {"dpo": {"padding_free", "dataset_num_proc", "ref_model_init_kwargs"},
                     "grpo": {"shuffle_dataset", "generation_kwargs"}}


def _settings(cls, trainer_kwargs: dict, method: str, **fixed):
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(fixed)
    for key, value in trainer_kwargs.items():
        if key in names:
            values[key] = value
        elif key not in _IGNORED_TRL_KEYS[method]:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"training.trainer_kwargs.{key} is not a {method.upper()} setting mlxrl knows{hint}")
    settings = cls(**values)
    for name, problem in config_ranges.problems(settings)[:1]:
        where = "training.trainer_kwargs" if name in trainer_kwargs else f"training.{method}"
        raise ConfigError(f"{where}.{problem}")
    return settings


def _check_grpo_batch(training: TrainingParams, num_generations: int) -> None:
    completions = training.per_device_train_batch_size * training.gradient_accumulation_steps
    if completions % num_generations:
        raise ConfigError(
            f"GRPO needs per_device_train_batch_size x gradient_accumulation_steps ({completions}) "
            f"to be a multiple of grpo.num_generations ({num_generations}): each prompt's "
            f"{num_generations} completions must land in the same step")
    if training.eval_strategy != "no" and training.per_device_eval_batch_size % num_generations:
        raise ConfigError(
            f"GRPO evaluation needs per_device_eval_batch_size ({training.per_device_eval_batch_size}) "
            f"to be a multiple of grpo.num_generations ({num_generations}), as TRL does")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls=TrainConfig, *, adapt_yaml=None):
    """Defaults < YAML file < overrides (`--a.b v`, `a.b=v`, `a.l[0].x v`, ...), into `cls` (the
    training schema, or `InferenceConfig` / `EvalConfig`). `adapt_yaml(data, source)` may rewrite
    the YAML's mapping in place before the overrides apply (inference folds legacy sections)."""
    data, lines, source = {}, {}, "<defaults>"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data, lines = load_yaml(Path(path))
    if adapt_yaml is not None:
        adapt_yaml(data, source)
    origins = {}
    for dotted, value in split_overrides(list(overrides or [])):
        path_key = key_path(dotted)
        origin = f"override {dotted}"
        apply_override(data, path_key, value, origin)
        origins[path_key] = origin
    return Builder(source, lines, origins).build(cls, data)
