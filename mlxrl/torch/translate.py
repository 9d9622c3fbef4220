"""The one translation point: mlxrl's config -> TRL's SFTConfig / DPOConfig / GRPOConfig, PEFT's
LoraConfig and bitsandbytes' quantization. What this backend cannot honour is in the one table
of both backends (`mlxrl/capabilities.py`); the notes here are the ones that depend on the
machine (no CUDA, a package not installed).

Every TRL field that can change a run is set here explicitly, from the config or from
`cfg.dpo_settings()` / `cfg.grpo_settings()` (the same objects the MLX backend reads), so TRL's own
defaults, which change between releases (reference/trl-semantics.md), never decide a run.
`check_fields` refuses a TRL release that lacks one of them.

Where the two backends' defaults differ, this module follows mlxrl's (= the MLX backend's):
- `gradient_checkpointing` from `training.enable_gradient_checkpointing` (TRL: on by default);
- bf16 only when the model is bf16 or `training.mixed_precision_dtype` asks (TRL: on by default);
- GRPO `steps_per_generation` = `gradient_accumulation_steps`: one rollout batch per optimizer
  step, as the MLX loop samples it;
- `pad_token` None: `model.tokenizer_pad_token` is set on the tokenizer itself, on both backends
  (`mlxrl.chat_templates.configure_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

from mlxrl.errors import ConfigError

logger = logging.getLogger(__name__)

LORA_INIT = {"DEFAULT": True, "RANDOM": False}
_MIXED = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- shared fields


def _warmup(t) -> float:
    """HF's warmup_steps: an int count, or a float < 1 read as a ratio of the total steps."""
    if t.warmup_steps is not None:
        return int(t.warmup_steps)
    ratio = float(t.warmup_ratio or 0.0)
    if ratio >= 1.0:
        raise ConfigError(f"training.warmup_ratio must be below 1, got {ratio}")
    return ratio


def tensorboard_by_transformers() -> bool:
    """transformers' TensorBoardCallback needs tensorboard (or tensorboardX); without them the
    run's TensorBoard logs come from mlxrl's own writer (`mlxrl.reporters`), with the same tags."""
    return _installed("tensorboard") or _installed("tensorboardX")


def _report_to(t) -> list[str]:
    out = ["tensorboard"] if t.enable_tensorboard and tensorboard_by_transformers() else []
    for name, on in {"wandb": t.enable_wandb, "mlflow": t.enable_mlflow}.items():
        if on and _installed(name):
            out.append(name)
        elif on:
            logger.warning(f"note: training.enable_{name} is on but {name} is not installed "
                           f"(pip install {name}); metrics go to metrics.jsonl")
    return out or ["none"]


def precision(cfg, model_dtype: str, device: str) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags from the model's dtype and training.mixed_precision_dtype."""
    mixed = _MIXED.get(str(cfg.training.mixed_precision_dtype).lower())
    bf16 = model_dtype == "bfloat16" or mixed == "bf16"
    fp16 = model_dtype == "float16" or mixed == "fp16"
    if fp16 and device != "cuda":
        logger.warning(f"note: float16 mixed precision needs CUDA; training without autocast on {device}")
        fp16 = False
    return bf16 and not fp16, fp16


def _optimizer(t) -> dict:
    out = {"optim": t.optimizer, "weight_decay": t.weight_decay, "adam_beta1": t.adam_beta1,
           "adam_beta2": t.adam_beta2, "adam_epsilon": t.adam_epsilon, "optim_args": None}
    if t.optimizer.lower() == "sgd" and t.sgd_momentum:
        out["optim_args"] = f"momentum={t.sgd_momentum}"
    return out


def _workers(t) -> int:
    """An int as it is; Oumi's "auto" (or any other word) loads in-process: mlxrl hands TRL rows
    that are tokenized already, so worker processes have little to do."""
    if isinstance(t.dataloader_num_workers, int):
        return t.dataloader_num_workers
    logger.warning(f"note: training.dataloader_num_workers={t.dataloader_num_workers!r}: the rows are tokenized "
        f"already; loading them in-process (0 workers, no prefetch)")
    return 0


def common_fields(cfg, bf16: bool, fp16: bool, device: str) -> dict:
    """The TrainingArguments fields every method shares."""
    t = cfg.training
    steps = t.save_steps > 0
    workers = _workers(t)
    evaluates = t.eval_strategy != "no" and bool(cfg.data.validation.datasets)
    return dict(
        output_dir=t.output_dir, run_name=t.run_name, seed=t.seed, data_seed=t.data_seed,
        full_determinism=t.full_determinism or t.use_deterministic,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps, num_train_epochs=float(t.num_train_epochs),
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs or {}), warmup_steps=_warmup(t),
        max_grad_norm=t.max_grad_norm or 0.0, **_optimizer(t),
        logging_strategy="steps", logging_steps=t.logging_steps,
        logging_first_step=t.logging_first_step, logging_nan_inf_filter=False,
        save_strategy="steps" if steps else ("epoch" if t.save_epoch else "no"),
        save_steps=t.save_steps if steps else 500, save_total_limit=None, save_only_model=False,
        eval_strategy=t.eval_strategy if evaluates else "no", eval_steps=t.eval_steps,
        bf16=bf16, fp16=fp16, tf32=None,
        gradient_checkpointing=t.enable_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False, **(t.gradient_checkpointing_kwargs or {})},
        torch_compile=bool(t.compile or cfg.model.compile), use_liger_kernel=False,
        report_to=_report_to(t), disable_tqdm=True,  # mlxrl draws its own bar
        dataloader_num_workers=workers,
        dataloader_persistent_workers=t.dataloader_persistent_workers and workers > 0,
        dataloader_prefetch_factor=t.dataloader_prefetch_factor if workers > 0 else None,
        dataloader_drop_last=False,
        dataloader_pin_memory=device == "cuda", use_cpu=device == "cpu",
        ddp_find_unused_parameters=bool(t.ddp_find_unused_parameters),  # LoRA uses every adapter
        torch_empty_cache_steps=t.empty_device_cache_steps, average_tokens_across_devices=True,
        ddp_timeout=int(t.nccl_default_timeout_minutes * 60) if t.nccl_default_timeout_minutes else 1800,
        push_to_hub=False, label_smoothing_factor=0.0, auto_find_batch_size=False,
        model_init_kwargs=None, trust_remote_code=cfg.model.trust_remote_code,
        pad_to_multiple_of=None,
    )


# ----------------------------------------------------------------------------- per method


def sft_config(cfg, common: dict):
    from trl import SFTConfig

    return _build(SFTConfig, common, dict(
        max_length=cfg.model.model_max_length or 1024, truncation_mode="keep_start",
        packing=cfg.data.train.pack, packing_strategy="bfd", padding_free=False,
        completion_only_loss=True, assistant_only_loss=False,
        loss_type="nll", shuffle_dataset=False, remove_unused_columns=True,
        pad_token=None, eos_token=None, activation_offloading=False,
        dataset_num_proc=None, dataset_kwargs=None,
    ))


def dpo_config(cfg, common: dict):
    from trl import DPOConfig

    s, kw = cfg.dpo_settings(), cfg.training.trainer_kwargs
    loss_type = [s.loss_type] if isinstance(s.loss_type, str) else list(s.loss_type)
    return _build(DPOConfig, common, dict(
        beta=s.beta, loss_type=loss_type, loss_weights=s.loss_weights,
        label_smoothing=s.label_smoothing, max_length=s.max_length,
        truncation_mode="keep_start", precompute_ref_log_probs=s.precompute_ref_log_probs,
        precompute_ref_batch_size=None, padding_free=False, disable_dropout=s.disable_dropout,
        f_divergence_type=s.f_divergence_type, f_alpha_divergence_coef=s.f_alpha_divergence_coef,
        ld_alpha=s.ld_alpha, use_weighting=s.use_weighting, discopop_tau=s.discopop_tau,
        sync_ref_model=False, remove_unused_columns=True, pad_token=None,
        activation_offloading=False, dataset_num_proc=kw.get("dataset_num_proc"),
    ))


def grpo_config(cfg, common: dict, use_vllm: bool):
    from trl import GRPOConfig

    s, g, kw = cfg.grpo_settings(), cfg.training.grpo, cfg.training.trainer_kwargs
    return _build(GRPOConfig, common, dict(
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=g.repetition_penalty or 1.0, generation_kwargs=kw.get("generation_kwargs"),
        beta=s.beta, epsilon=s.epsilon, epsilon_high=s.epsilon_high, delta=s.delta,
        loss_type=s.loss_type, scale_rewards=s.scale_rewards,
        sapo_temperature_neg=s.sapo_temperature_neg, sapo_temperature_pos=s.sapo_temperature_pos,
        vespo_k_pos=s.vespo_k_pos, vespo_lambda_pos=s.vespo_lambda_pos, vespo_k_neg=s.vespo_k_neg,
        vespo_lambda_neg=s.vespo_lambda_neg,
        importance_sampling_level=s.importance_sampling_level,
        mask_truncated_completions=s.mask_truncated_completions, reward_weights=s.reward_weights,
        multi_objective_aggregation="sum_then_normalize", num_iterations=s.num_iterations,
        steps_per_generation=cfg.training.gradient_accumulation_steps, generation_batch_size=None,
        use_bias_correction_kl=s.use_bias_correction_kl, top_entropy_quantile=1.0, entropy_coef=0.0,
        off_policy_mask_threshold=None, cast_lm_head_to_fp32=False,
        disable_dropout=s.disable_dropout,
        shuffle_dataset=bool(kw.get("shuffle_dataset", True)), remove_unused_columns=False,
        use_vllm=use_vllm, vllm_mode=s.vllm_mode,
        vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
        vllm_importance_sampling_correction=True, use_transformers_continuous_batching=False,
        log_completions=False,  # mlxrl writes completions.jsonl itself, as on MLX
        chat_template_kwargs=dict(cfg.model.chat_template_kwargs) or None, num_generations_eval=None,
    ))


def check_fields(cls, fields: dict) -> None:
    """Refuse a TRL release that lacks a field this module sets (its default would decide)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        import trl

        raise ConfigError(f"TRL {trl.__version__} has no {cls.__name__} field(s) {unknown}; "
                          f"install the TRL range in mlxrl's `torch` extra")


def _build(cls, common: dict, specific: dict):
    fields = {**common, **specific}
    check_fields(cls, fields)
    try:
        return cls(**fields)
    except ValueError as e:  # TRL / transformers validation (an unknown optimizer name, ...)
        raise ConfigError(f"{cls.__name__}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- PEFT, quantization


def lora_config(peft_params, targets: list[str]):
    from peft import LoraConfig

    init = LORA_INIT.get(str(peft_params.lora_init_weights).upper(),
                         str(peft_params.lora_init_weights).lower())
    return LoraConfig(
        r=peft_params.lora_r, lora_alpha=peft_params.lora_alpha,
        lora_dropout=peft_params.lora_dropout, target_modules=targets,
        target_parameters=peft_params.lora_target_parameters,
        modules_to_save=peft_params.lora_modules_to_save, bias=peft_params.lora_bias,
        use_dora=peft_params.use_dora, init_lora_weights=init,
        task_type=peft_params.lora_task_type,
    )


def quantization_config(peft_params, device: str):
    """bitsandbytes 4/8-bit for `peft.q_lora` on CUDA; otherwise None and one line saying so."""
    if not peft_params.q_lora:
        return None
    if device != "cuda" or not _installed("bitsandbytes"):
        why = "bitsandbytes is not installed" if device == "cuda" else f"no CUDA ({device})"
        logger.warning(f"note: peft.q_lora needs CUDA and bitsandbytes ({why}); training plain LoRA on an "
            f"unquantized base")
        return None
    import torch
    from transformers import BitsAndBytesConfig

    bits = peft_params.q_lora_bits
    if bits not in (4, 8):
        logger.warning(f"note: peft.q_lora_bits={bits}: bitsandbytes quantizes to 4 or 8 bits; using 4")
        bits = 4
    compute = getattr(torch, peft_params.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8,
        bnb_4bit_quant_type=peft_params.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=peft_params.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, peft_params.bnb_4bit_quant_storage),
        llm_int8_skip_modules=peft_params.llm_int8_skip_modules,
    )


def vllm_choice(cfg, device: str) -> bool:
    """vLLM (colocated) when asked for and importable on CUDA; else one line, transformers."""
    if cfg.training.method != "grpo" or not cfg.training.grpo.use_vllm:
        return False
    if device == "cuda" and _installed("vllm"):
        return True
    why = "vllm is not installed" if device == "cuda" else f"no CUDA ({device})"
    logger.warning(f"note: training.grpo.use_vllm: {why}; generating with transformers instead")
    return False
