"""`train(cfg)` on PyTorch/TRL: the same config, data, rewards and output layout as on MLX.

    output_dir/
      checkpoint-<step>/   adapter_model.safetensors, adapter_config.json (PEFT), trainer_state.json,
                           plus optimizer / scheduler / RNG state for an exact resume, as
                           safetensors and JSON, written atomically (checkpoints.py)
      adapter_model.safetensors, adapter_config.json, trainer_state.json   (the final adapter)

With training.use_peft: false TRL trains every weight (no peft_config) and saves model folders
(config.json, model.safetensors, tokenizer, generation_config.json) where the adapter files are.
      metrics.jsonl        (completions.jsonl for GRPO with training.grpo.log_completions)

Under `accelerate launch -m mlxrl.cli train ...` this runs TRL's own distributed path: each
process loads the model and data, TRL shards the batches, only the main process writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

from mlxrl import capabilities, reporters
from mlxrl.data.loading import load_split, with_chat_template_kwargs
from mlxrl.errors import ConfigError
from mlxrl.run_dir import RUN_FILE, STATE_FILE, read_state, write_json
from mlxrl.run_lock import RunLock
from mlxrl.run_plan import finished_message, plan_run, run_record
from mlxrl.run_summary import summary_lines
from mlxrl.stopping import StopOnSignal, interrupted
from mlxrl.torch import methods, translate
from mlxrl.torch import model as torch_model
from mlxrl.torch.callbacks import MlxrlCallback

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trl_args(cfg, loaded, device: str, use_vllm: bool):
    """TRL's config for this run (translate.py does the field-by-field work)."""
    dtype = str(getattr(loaded.model, "dtype", "float32")).removeprefix("torch.")
    bf16, fp16 = translate.precision(cfg, dtype, device)
    common = translate.common_fields(cfg, bf16, fp16, device)
    method = cfg.training.method
    if method == "sft":
        return translate.sft_config(cfg, common)
    if method == "dpo":
        return translate.dpo_config(cfg, common)
    return translate.grpo_config(cfg, common, use_vllm)


def _quiet_library_noise() -> None:
    """transformers 5 deprecates the `gradient_checkpointing` names TRL still uses; its weight-
    loading bar would sit above mlxrl's. Neither is something a user can act on."""
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*",
                            category=FutureWarning)
    hf_logging.disable_progress_bar()


def _avoid_cudnn_attention() -> None:
    """SDPA's cuDNN kernel (torch's first choice for bf16 on Hopper) rebuilds its plan for every
    new padded shape (DPO bf16 on H100: ~320 ms a step vs ~130 ms without it) and, in GRPO with
    left-padded prompts, gave NaN gradients by step 4 where the flash / memory-efficient / math
    kernels did not (torch 2.11, H100). Flash and memory-efficient kernels remain."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def _validation(cfg):
    """data.validation, when the run evaluates (training.eval_strategy), else None."""
    if cfg.training.eval_strategy == "no" or not cfg.data.validation.datasets:
        return None
    return load_split(cfg.data.validation, where="data.validation")


def build(cfg, *, quiet: bool = False, run_record: dict | None = None):
    """(trainer, loaded model) for `cfg`, ready to `train()`; the notes are logged here."""
    _quiet_library_noise()
    device = torch_model.device_kind()
    if device == "cuda":
        _avoid_cudnn_attention()
    capabilities.check(cfg, "torch")
    quantization = translate.quantization_config(cfg.peft, device)
    use_vllm = translate.vllm_choice(cfg, device)
    dataset = load_split(cfg.data.train, where="data.train")  # errors before the model loads
    validation = _validation(cfg)
    logger.info(f"loading {cfg.model.model_name}")
    loaded = torch_model.load(cfg, quantization)
    args = trl_args(cfg, loaded, device, use_vllm)
    peft_config = None
    if cfg.training.use_peft and loaded.peft_dir is None:  # a PEFT folder brings its own adapter
        targets = torch_model.lora_targets(loaded.model, cfg.peft)
        peft_config = translate.lora_config(cfg.peft, targets)
    t = cfg.training
    if t.method != "grpo":  # GRPO: TRL templates the prompts with args.chat_template_kwargs
        dataset = with_chat_template_kwargs(dataset, cfg.model.chat_template_kwargs)
        if validation is not None:
            validation = with_chat_template_kwargs(validation, cfg.model.chat_template_kwargs)
    # TensorBoard by mlxrl's writer only where transformers has no TensorBoard package
    board = not translate.tensorboard_by_transformers() and is_main_process()
    callback = MlxrlCallback(t.output_dir, t.save_steps, quiet=quiet, desc=f"{t.method} ",
                             reporters=reporters.for_run(cfg, tensorboard=board, wandb=False))
    logger.info(f"tokenizing {len(dataset)} rows")
    trainer = methods.build_trainer(cfg, loaded, dataset, args, peft_config, [callback], run_record,
                                    eval_dataset=validation, on_sample=callback.set_sample,
                                    rollout_clock=callback.rollouts)
    _freeze(trainer.model, cfg.model.freeze_layers)
    if not t.use_peft:
        _reference_is_the_start(trainer)
    _use_mlxrl_bar(trainer, callback)
    _tensorboard_folder(trainer, cfg)
    return trainer, loaded, device


def _tensorboard_folder(trainer, cfg) -> None:
    """training.logging_dir, when set, is where transformers' TensorBoard callback writes."""
    from transformers.integrations import TensorBoardCallback

    if cfg.training.logging_dir:
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):
                cb.logging_dir = cfg.training.logging_dir


def _drop_tensorboard_events(trainer) -> None:
    """Remove the event file (and the folder, if it is left empty) that transformers' TensorBoard
    callback made at the start of a run that then failed before any step: a failed start leaves
    nothing behind (as on MLX, whose writer makes its file at the first scalars)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir:
            if cb.tb_writer is not None:
                cb.tb_writer.close()
                cb.tb_writer = None
            reporters.drop_events(Path(cb.logging_dir), Path(trainer.args.output_dir))


def _freeze(model, names: list[str]) -> None:
    """model.freeze_layers, after TRL wrapped the model with PEFT (before its optimizer exists)."""
    if not names:
        return
    _, missing = torch_model.freeze_layers(model, names)
    if missing:
        logger.warning(f"note: model.freeze_layers: {missing} not found in the model (module paths such as "
            f"model.layers.0)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze_layers {names} freezes every trainable parameter")


def _reference_is_the_start(trainer) -> None:
    """A full fine-tune's reference (DPO, GRPO with beta > 0) is a second model that TRL loads
    from the policy's path with its own arguments; it gets the policy's starting weights, so the
    reference is the model the run starts from as on MLX (also with load_pretrained_weights:
    false or model_kwargs). DeepSpeed/FSDP shard both models: TRL's own reference stays."""
    ref = getattr(trainer, "ref_model", None)
    if ref is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    unwrap = trainer.accelerator.unwrap_model
    unwrap(ref).load_state_dict(unwrap(trainer.model).state_dict())


def _use_mlxrl_bar(trainer, callback: MlxrlCallback) -> None:
    """mlxrl's bar and lines instead of transformers'; mlxrl's callback right after the flow
    callback (whose save and log decisions it amends) and before the reporting callbacks, so the
    fields it adds to each log record reach TensorBoard and W&B too."""
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callbacks = trainer.callback_handler.callbacks
    callbacks.remove(callback)
    flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
    callbacks.insert(flow[0] + 1 if flow else 0, callback)


def _parameter_counts(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _steps_text(training) -> str:
    if training.max_steps > 0:
        return f"{training.max_steps} steps"
    return f"{training.num_train_epochs} epochs"


def write_state(trainer, method: str) -> dict:
    """output_dir/trainer_state.json: TRL's state plus the method and backend; returned as a dict."""
    state = dataclasses.asdict(trainer.state)
    state.update({"method": method, "backend": "torch"})
    if trainer.is_world_process_zero():
        write_json(Path(trainer.args.output_dir) / STATE_FILE, state)
    return state


def _total_steps(trainer) -> int:
    """The run's optimizer steps, as transformers will count them."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def train(cfg, *, quiet: bool = False, overwrite: bool = False) -> dict:
    """Train per `cfg` (a `TrainConfig`) with TRL; returns the final trainer state.

    The output_dir is held, planned and cleared as on MLX (`RunLock`, `run_plan`)."""
    if not cfg.model.model_name:
        raise ConfigError("model.model_name is required")
    if not cfg.data.train.datasets:
        raise ConfigError("data.train.datasets is empty: name at least one dataset")
    main = is_main_process()
    logger_level = logging.getLogger("mlxrl").level
    if not main:  # one copy of each line, from the main process
        logging.getLogger("mlxrl").setLevel(logging.ERROR)
    try:
        with RunLock(cfg.training.output_dir, enabled=main):
            plan = plan_run(cfg, "torch", overwrite=overwrite, main=main)
            if plan.finished is not None:
                logger.info(plan.messages[0])
                return plan.finished
            return _run(cfg, plan, quiet, main)
    finally:
        logging.getLogger("mlxrl").setLevel(logger_level)


def _run(cfg, plan, quiet: bool, main: bool) -> dict:
    t = cfg.training
    started = time.perf_counter()
    record = run_record(cfg, "torch")
    trainer, loaded, device = build(cfg, quiet=quiet, run_record=record)
    resume = plan.resume
    if resume is not None:  # --resume with max_steps at or below the checkpoint's step
        state, total = read_state(resume), _total_steps(trainer)
        if state["global_step"] >= total:
            logger.info(finished_message(plan.output_dir, {**state, "max_steps": total}, "torch"))
            return state
    trainable, params = _parameter_counts(trainer.model)
    logger.info(f"mlxrl {t.method} on torch ({device}): {loaded.base_name}, {trainable:,} trainable "
                f"of {params:,} parameters, {len(trainer.train_dataset)} examples, {_steps_text(t)} "
                f"-> {t.output_dir}")
    if main:
        plan.start()
    if resume is not None:
        logger.info(f"resumed from {resume} at step {read_state(resume)['global_step']}")
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MlxrlCallback))
    first = read_state(resume)["global_step"] if resume is not None else 0
    loop_started = time.perf_counter()
    try:
        with StopOnSignal() as callback.stop:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException as e:
        if trainer.state.global_step == first:
            _drop_tensorboard_events(trainer)  # the run failed before its first step
        if (error := reporters.wandb_error(e)) is not None:  # transformers' WandbCallback
            raise error from None
        raise
    training_seconds = time.perf_counter() - loop_started
    if callback.interrupted_at is not None:
        step = callback.interrupted_at
        raise interrupted(callback.signum, step, trainer.state.max_steps,
                          Path(t.output_dir) / f"checkpoint-{step}")
    files = trainer.save_final(t.output_dir) if t.save_final_model else []
    state = write_state(trainer, t.method)
    if main:
        write_json(Path(t.output_dir) / RUN_FILE, {**record, "files": sorted({*files, STATE_FILE, RUN_FILE})})
        _summary(cfg, callback, state, time.perf_counter() - started, training_seconds, first)
    return state


def _summary(cfg, callback, state: dict, seconds: float, training_seconds: float, first: int) -> None:
    t = cfg.training
    history = callback.log.history if callback.log is not None else []
    for line in summary_lines(history, steps=state["global_step"], seconds=seconds,
                              output_dir=t.output_dir, method=t.method,
                              start_model=cfg.model.model_name, backend="torch",
                              saved=t.save_final_model, reward_functions=t.reward_functions,
                              training_seconds=training_seconds,
                              trained_steps=state["global_step"] - first):
        logger.info(line)
