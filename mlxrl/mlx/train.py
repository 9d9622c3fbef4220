"""`train(cfg)` on MLX: load the model with fresh LoRA layers, the data, the method, and run."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from mlxrl.data.loading import load_split
from mlxrl.errors import ConfigError, DataError
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.trainer import Trainer, total_steps_for
from mlxrl.run_dir import resume_folder


def _method_class(name: str):
    if name == "sft":
        from mlxrl.mlx.sft import SFTMethod
        return SFTMethod
    if name == "dpo":
        from mlxrl.mlx.dpo import DPOMethod
        return DPOMethod
    from mlxrl.mlx.grpo import GRPOMethod
    return GRPOMethod


def _notes(cfg, log) -> None:
    """One line for each setting that the MLX backend accepts but cannot honour."""
    t = cfg.training
    if not t.use_peft:
        log("note: training.use_peft is false; the MLX backend trains LoRA adapters "
            f"(r={cfg.peft.lora_r}, alpha={cfg.peft.lora_alpha}) on a frozen base")
    if t.method == "grpo" and t.grpo.use_vllm:
        log("note: training.grpo.use_vllm is ignored on MLX; rollouts use mlxrl's batched sampler")
    if cfg.peft.q_lora and cfg.peft.bnb_4bit_quant_type != "fp4" or cfg.peft.llm_int8_skip_modules:
        log(f"note: peft.q_lora uses MLX {cfg.peft.q_lora_bits}-bit affine quantization "
            "(bitsandbytes settings do not apply)")
    if t.enable_wandb or t.enable_mlflow:
        log("note: W&B / MLflow logging is not built in; metrics go to metrics.jsonl")


def disable_dropout(model: nn.Module) -> int:
    """TRL's `disable_dropout`: every dropout of the model (LoRA's included) becomes the identity.
    Returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        for name, child in module.children().items():
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
                replaced += 1
    return replaced


def train(cfg, *, quiet: bool = False, log=print, overwrite: bool = False) -> dict:
    """Train per `cfg` (a `TrainConfig`); returns the final trainer state.

    Resumes from `training.resume_from_checkpoint`, or from the newest complete checkpoint in
    `output_dir` with `training.try_resume_from_last_checkpoint`. A fresh run refuses an
    `output_dir` holding another run's checkpoints unless `overwrite`.
    """
    if not cfg.model.model_name:
        raise ConfigError("model.model_name is required")
    if not cfg.data.train.datasets:
        raise ConfigError("data.train.datasets is empty: name at least one dataset")
    _notes(cfg, log)
    resume = resume_folder(cfg.training, overwrite)
    mx.random.seed(cfg.training.seed)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True,
                            gradient_checkpointing=cfg.training.enable_gradient_checkpointing)
    dataset = load_split(cfg.data.train, where="data.train")
    try:
        method = _method_class(cfg.training.method)(cfg, loaded, dataset, log=log)
    except DataError as e:
        names = ", ".join(d.dataset_path or d.dataset_name for d in cfg.data.train.datasets)
        raise DataError(f"data.train ({names}): {e}") from None
    if getattr(getattr(method, "settings", None), "disable_dropout", False):
        disable_dropout(loaded.model)  # DPO's default, as in TRL
    t = cfg.training
    total = total_steps_for(t, method.examples_per_step, method.dataset_size)
    trainable, params = mlx_model.trainable_count(loaded.model)
    log(f"mlxrl {t.method} on MLX: {loaded.base_name}, {trainable:,} trainable of {params:,} "
        f"parameters, {method.dataset_size} examples, {total} steps -> {t.output_dir}")
    extra = {"method": t.method, "config": dataclasses.asdict(cfg)}
    adapter_config = mlx_model.adapter_config_for(loaded, extra)
    trainer = Trainer(cfg, loaded, method, adapter_config, total, quiet=quiet)
    if resume is not None:
        trainer.restore(resume)
        log(f"resumed from {resume} at step {trainer.step}")
    return trainer.run()
