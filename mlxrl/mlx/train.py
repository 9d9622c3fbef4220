"""`train(cfg)` on MLX: load the model with fresh LoRA layers (or every weight trainable with
`training.use_peft: false`), the data, the method, and run."""

from __future__ import annotations

import dataclasses
import logging
import time

import mlx.core as mx
import mlx.nn as nn

from mlxrl import _jit, capabilities
from mlxrl.data.loading import load_split, with_chat_template_kwargs
from mlxrl.errors import ConfigError, DataError
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.full_model import FullModelFiles
from mlxrl.mlx.trainer import Trainer, total_steps_for
from mlxrl.run_dir import read_state
from mlxrl.run_lock import RunLock
from mlxrl.run_plan import finished_message, plan_run, run_record
from mlxrl.run_summary import summary_lines

logger = logging.getLogger(__name__)


def _method_class(name: str):
    if name == "sft":
        from mlxrl.mlx.sft import SFTMethod
        return SFTMethod
    if name == "dpo":
        from mlxrl.mlx.dpo import DPOMethod
        return DPOMethod
    from mlxrl.mlx.grpo import GRPOMethod
    return GRPOMethod


def _freeze(model, names: list[str]) -> None:
    """model.freeze_layers; a name the model does not have gets a note (as Oumi warns)."""
    if not names:
        return
    missing = mlx_model.freeze_layers(model, names)
    if missing:
        logger.warning(f"note: model.freeze_layers: {missing} not found in the model (module paths such as "
            f"model.layers.0)")
    if mlx_model.trainable_count(model)[0] == 0:
        raise ConfigError(f"model.freeze_layers {names} freezes every trainable parameter")


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


def train(cfg, *, quiet: bool = False, overwrite: bool = False) -> dict:
    """Train per `cfg` (a `TrainConfig`); returns the final trainer state.

    Holds training.output_dir for the run's life (`RunLock`). Resumes from
    `training.resume_from_checkpoint`, or from the newest complete and readable checkpoint in
    `output_dir` with `training.try_resume_from_last_checkpoint`. A finished run is left as it is;
    a fresh run refuses an `output_dir` holding another run unless `overwrite` (`run_plan`).
    """
    if not cfg.model.model_name:
        raise ConfigError("model.model_name is required")
    if not cfg.data.train.datasets:
        raise ConfigError("data.train.datasets is empty: name at least one dataset")
    capabilities.check(cfg, "mlx")
    with RunLock(cfg.training.output_dir):
        plan = plan_run(cfg, "mlx", overwrite=overwrite)
        if plan.finished is not None:
            logger.info(plan.messages[0])
            return plan.finished
        return _run(cfg, plan, quiet)


def _validation(cfg):
    """data.validation, when the run evaluates (training.eval_strategy), else None."""
    if cfg.training.eval_strategy == "no" or not cfg.data.validation.datasets:
        return None
    dataset = load_split(cfg.data.validation, where="data.validation")
    return with_chat_template_kwargs(dataset, cfg.model.chat_template_kwargs)


def _method(cfg, loaded, dataset, validation):
    """The method with its training data (and its evaluation of `validation`)."""
    def named(split) -> str:
        return ", ".join(d.dataset_path or d.dataset_name for d in split.datasets)

    try:
        method = _method_class(cfg.training.method)(cfg, loaded, dataset)
    except DataError as e:
        raise DataError(f"data.train ({named(cfg.data.train)}): {e}") from None
    try:
        evaluation = method.evaluation(validation) if validation is not None else None
    except DataError as e:
        raise DataError(f"data.validation ({named(cfg.data.validation)}): {e}") from None
    return method, evaluation


def _run(cfg, plan, quiet: bool) -> dict:
    started = time.perf_counter()
    dataset = load_split(cfg.data.train, where="data.train")  # data errors before the model loads
    dataset = with_chat_template_kwargs(dataset, cfg.model.chat_template_kwargs)
    validation = _validation(cfg)
    mx.random.seed(cfg.training.seed)
    full = not cfg.training.use_peft
    loaded = mlx_model.load(cfg.model, None if full else cfg.peft, for_training=True, full=full,
                            gradient_checkpointing=cfg.training.enable_gradient_checkpointing)
    _freeze(loaded.model, cfg.model.freeze_layers)
    method, evaluation = _method(cfg, loaded, dataset, validation)
    if getattr(getattr(method, "settings", None), "disable_dropout", False):
        disable_dropout(loaded.model)  # DPO's default, as in TRL
    t = cfg.training
    total = total_steps_for(t, method.examples_per_step, method.dataset_size)
    if plan.resume is not None and read_state(plan.resume)["global_step"] >= total:
        state = read_state(plan.resume)
        logger.info(finished_message(plan.output_dir, {**state, "max_steps": total}, "mlx"))
        return state
    trainable, params = mlx_model.trainable_count(loaded.model)
    logger.info(f"mlxrl {t.method} on MLX: {loaded.base_name}, {trainable:,} trainable of {params:,} "
                f"parameters, {method.dataset_size} examples, {total} steps -> {t.output_dir}")
    adapter_config, files = None, None
    if full:
        files = FullModelFiles(loaded)
        for line in files.notes():
            logger.warning(line)
    else:
        extra = {"method": t.method, "config": dataclasses.asdict(cfg)}
        adapter_config = mlx_model.adapter_config_for(loaded, extra)
    plan.start()
    trainer = Trainer(cfg, loaded, method, adapter_config, total, quiet=quiet,
                      run_record=run_record(cfg, "mlx"), evaluation=evaluation, files=files)
    if plan.resume is not None:
        trainer.restore(plan.resume)
        logger.info(f"resumed from {plan.resume} at step {trainer.step}")
    if _jit.kernels_built() == 0:
        logger.info(f"building MLX's CPU kernels for this model (first run only; kept in "
                    f"{_jit.kernel_folder()}): the first steps take longer")
    first, loop_started = trainer.step, time.perf_counter()
    state = trainer.run()
    for line in summary_lines(state["log_history"], steps=state["global_step"],
                              seconds=time.perf_counter() - started, output_dir=t.output_dir,
                              method=t.method, start_model=cfg.model.model_name, backend="mlx",
                              saved=t.save_final_model, reward_functions=t.reward_functions,
                              training_seconds=time.perf_counter() - loop_started,
                              trained_steps=state["global_step"] - first):
        logger.info(line)
    return state
