"""`train(cfg)` on MLX: load the model with fresh LoRA layers, the data, the method, and run."""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from mlxrl import capabilities
from mlxrl.data.loading import load_split, with_chat_template_kwargs
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


def _freeze(model, names: list[str], log) -> None:
    """model.freeze_layers; a name the model does not have gets a note (as Oumi warns)."""
    if not names:
        return
    missing = mlx_model.freeze_layers(model, names)
    if missing:
        log(f"note: model.freeze_layers: {missing} not found in the model (module paths such as "
            f"model.layers.0)")
    if mlx_model.trainable_count(model)[0] == 0:
        raise ConfigError(f"model.freeze_layers {names} freezes every trainable parameter")


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
    capabilities.check(cfg, "mlx", log)
    resume = resume_folder(cfg.training, overwrite)
    mx.random.seed(cfg.training.seed)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True,
                            gradient_checkpointing=cfg.training.enable_gradient_checkpointing)
    _freeze(loaded.model, cfg.model.freeze_layers, log)
    dataset = load_split(cfg.data.train, where="data.train", log=log)
    dataset = with_chat_template_kwargs(dataset, cfg.model.chat_template_kwargs)
    try:
        method = _method_class(cfg.training.method)(cfg, loaded, dataset, log=log)
    except DataError as e:
        names = ", ".join(d.dataset_path or d.dataset_name for d in cfg.data.train.datasets)
        raise DataError(f"data.train ({names}): {e}") from None
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
