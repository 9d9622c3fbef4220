"""What each backend does with every config field: the one table both backends' notes read.

For each field of the schema (`mlxrl.config.TrainConfig`, walked by a test) and each backend:
- honoured: the field does what it says (nothing printed);
- note: accepted, but it cannot apply there; one line `note: <field>: <why>` is printed at the
  start of a run when the user set the field to something other than its default;
- refused: the run stops with a `ConfigError` naming the field.
A note's text may be a function of the value (and the config), giving None for values that are
honoured: `trainer_type: HF` trains SFT, so it says so; `TRL_SFT` needs no word.

`Row.methods` names the methods that read a field; set in a run of another method it gets a
note on both backends. `Row.always` fields are checked even at their default. The `peft` fields
are read only with `training.use_peft: true`; with `false` (a full fine-tune) they get a note, and
`peft.q_lora` is refused. `training.trainer_kwargs` keys that TRL knows but one backend
does not read are rows too (`training.trainer_kwargs.<key>`); the other keys are settings both
backends read (`cfg.dpo_settings()`, `cfg.grpo_settings()`), and unknown keys are refused there.
`INFERENCE` says the same of the `generation` fields for `mlxrl infer` / `eval` (MLX).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxrl.errors import ConfigError

logger = logging.getLogger(__name__)

Text = str | Callable[[Any, Any], str | None] | None


@dataclass(frozen=True)
class Support:
    kind: str  # "honoured" | "note" | "refused"
    text: Text = None  # the note or refusal; a function (value, cfg) -> text or None

    def message(self, value, cfg) -> str | None:
        return self.text(value, cfg) if callable(self.text) else self.text


@dataclass(frozen=True)
class Row:
    mlx: Support
    torch: Support
    methods: tuple[str, ...] = ()  # only these methods read the field
    always: bool = False  # check even when the field has its default value


H = Support("honoured")


def note(text: Text) -> Support:
    return Support("note", text)


def refused(text: Text) -> Support:
    return Support("refused", text)


def both(support: Support, **kw) -> Row:
    return Row(support, support, **kw)


def mlx_only(text: Text) -> Row:
    """Honoured on torch (TRL/transformers read it); a note on MLX."""
    return Row(note(text), H)


SINGLE_DEVICE = "single device; for several GPUs use --backend torch"
NO_EVAL = ("evaluation during training computes the method's own metrics (eval_loss, ...); for "
           "task metrics run `mlxrl eval` on a checkpoint")
TEXT_ONLY = "mlxrl trains text models; vision settings do not apply"
HF_LOADING = "transformers' loading arguments; mlx-lm does not take them"
NO_VLLM = "MLX has no vLLM; rollouts use mlxrl's batched sampler"
IN_PROCESS = "MLX reads and batches the data in-process"
VISION_COLLATORS = ("vision_language_with_padding", "vision_language_sft")
PLAIN_ADAMW = ("adamw_torch", "adamw_hf", "adamw", "adam", "adafactor", "sgd")


FULL_FINETUNE = "not read: training.use_peft is false, so every weight trains (no adapter)"


def _q_lora(value, cfg) -> str | None:
    if cfg.training.use_peft or not value:
        return None
    return ("a quantized base trains only through an adapter; set training.use_peft: true for QLoRA, "
            "or peft.q_lora: false to train every weight")


def _ref_model_init_kwargs(value, cfg) -> str:
    if cfg.training.use_peft:
        return "the reference is the base model without the adapter"
    return "the reference is the starting model as loaded (model.* settings)"


def _trainer_type(value, cfg) -> str | None:
    if value.upper() in ("HF", "OUMI"):
        return f"{value} trains SFT here (TRL's SFTTrainer on the chat-templated rows)"
    return None


def _optimizer(value, cfg) -> str | None:
    name = value.lower()
    if name in PLAIN_ADAMW:
        return None
    if "adam" in name:
        return f"{value}: MLX runs its own AdamW (the same update; {value} is a torch implementation)"
    raise ConfigError(f"training.optimizer {value!r} is not available on MLX; use adamw_torch, "
                      f"adafactor or sgd (or --backend torch)")


def _collator(value, cfg) -> str | None:
    return f"{value}: {TEXT_ONLY}" if value in VISION_COLLATORS else None


def _bnb(value, cfg) -> str | None:
    return (f"MLX quantizes with its own {cfg.peft.q_lora_bits}-bit affine quantization; "
            "bitsandbytes settings do not apply")


def _remove_unused_columns(value, cfg) -> str | None:
    return "true: every dataset column still reaches the reward functions" if value else None


def _validation(value, cfg) -> str | None:
    if cfg.training.eval_strategy == "no":
        return "read only with training.eval_strategy: steps or epoch (it is \"no\")"
    return None


def _eval_strategy(value, cfg) -> str | None:
    if value != "no" and not cfg.data.validation.datasets:
        raise ConfigError(f"training.eval_strategy {value!r} evaluates on data.validation, which "
                          f"names no dataset; add data.validation.datasets or set eval_strategy: no")
    return None


def _eval_setting(value, cfg) -> str | None:
    if cfg.training.eval_strategy == "no":
        return "read only with training.eval_strategy: steps or epoch"
    return None


def _run_name(value, cfg) -> str | None:
    return None if cfg.training.enable_wandb else "names W&B runs (training.enable_wandb is off)"


def _shuffle(value, cfg) -> str | None:
    return None if value else "false: MLX always shuffles the prompts (seeded by training.seed)"


_MODEL = {
    "model.model_name": both(H), "model.tokenizer_name": both(H),
    "model.tokenizer_pad_token": both(H), "model.tokenizer_kwargs": both(H),
    "model.adapter_model": both(note("read by `mlxrl infer` and `eval`; to train an adapter further, "
                                     "name its folder in model.model_name")),
    "model.processor_kwargs": both(note(TEXT_ONLY)),
    "model.model_max_length": both(H, methods=("sft", "dpo")),
    "model.load_pretrained_weights": both(H), "model.trust_remote_code": both(H),
    "model.torch_dtype_str": both(H), "model.compile": both(H),  # MLX always compiles its step
    "model.chat_template": both(H), "model.chat_template_kwargs": both(H),
    "model.attn_implementation": mlx_only("MLX runs mlx-lm's attention"),
    "model.device_map": Row(note(SINGLE_DEVICE),
                            note("the Trainer places the model (accelerate for several GPUs)")),
    "model.model_kwargs": mlx_only(HF_LOADING),
    "model.enable_liger_kernel": both(note("Liger kernels are not used (TRL deprecated them)")),
    "model.shard_for_eval": both(note(NO_EVAL)),
    "model.freeze_layers": both(H), "model.model_revision": both(H),
}

_DATA = {
    "data.train.datasets": both(H),
    "data.train.collator_name": both(Support("honoured", _collator), methods=("sft",)),
    "data.train.collator_kwargs": both(note("turn boundaries come from the chat template; "
                                            "collator_kwargs are not read")),
    "data.train.train_target": both(H, methods=("sft",)),
    "data.train.pack": both(H, methods=("sft",)),
    "data.train.stream": both(note("datasets are loaded whole, not streamed")),
    "data.train.target_col": both(note("deprecated in Oumi; rows are read by their columns")),
    "data.train.mixture_strategy": both(H), "data.train.seed": both(H),
    "data.train.use_async_dataset": both(note("datasets load in-process")),
    "data.train.use_torchdata": both(note("datasets load in-process")),
    "data.validation.*": both(Support("honoured", _validation)),
    "data.test.*": both(note(f"test data is not read: {NO_EVAL}")),
}

_GRPO = {f"training.grpo.{k}": both(H, methods=("grpo",)) for k in (
    "max_completion_length", "num_generations", "temperature", "epsilon", "log_completions",
    "repetition_penalty")}
_GRPO.update({
    "training.grpo.model_init_kwargs": Row(note(HF_LOADING), H, methods=("grpo",)),
    "training.grpo.max_prompt_length": both(note("not a TRL setting since v0.28; prompts are not "
                                                 "truncated"), methods=("grpo",)),
    "training.grpo.remove_unused_columns": both(note(_remove_unused_columns), methods=("grpo",)),
    "training.grpo.use_vllm": Row(note(NO_VLLM), H, methods=("grpo",)),
    "training.grpo.vllm_mode": Row(note(NO_VLLM), H, methods=("grpo",)),
    "training.grpo.vllm_gpu_memory_utilization": Row(note(NO_VLLM), H, methods=("grpo",)),
    "training.grpo.rollout_function": both(note("not supported; rollouts are sampled by the trainer"),
                                           methods=("grpo",)),
})

_TRAINING = {f"training.{k}": both(H) for k in (
    "enable_gradient_checkpointing", "output_dir", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_steps", "num_train_epochs", "save_steps", "save_final_model",
    "seed", "use_deterministic", "full_determinism", "logging_steps", "logging_first_step",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "sgd_momentum", "compile",
    "resume_from_checkpoint", "try_resume_from_last_checkpoint", "max_grad_norm", "trainer_kwargs",
    "skip_non_finite_steps")}
_TRAINING.update({
    "training.nccl_default_timeout_minutes": Row(note(SINGLE_DEVICE), H),
    "training.use_peft": both(H),
    "training.trainer_type": both(Support("honoured", _trainer_type)),
    "training.optimizer": Row(Support("honoured", _optimizer), H),
    "training.gradient_checkpointing_kwargs": mlx_only("MLX checkpoints whole blocks; these are torch's"),
    "training.per_device_eval_batch_size": both(Support("honoured", _eval_setting)),
    "training.save_epoch": mlx_only("MLX saves every save_steps and at the end"),
    "training.data_seed": mlx_only("the data order follows training.seed"),
    "training.run_name": Row(Support("honoured", _run_name), H),
    "training.metrics_function": both(note(NO_EVAL)),
    "training.reward_functions": both(H, methods=("grpo",)),
    "training.reward_function_kwargs": both(H, methods=("grpo",)),
    "training.gkd": both(note("GKD is not supported; the section is not read")),
    "training.gold": both(note("GOLD is not supported; the section is not read")),
    "training.log_level": both(note("mlxrl prints its own progress lines (--quiet hides the bar)")),
    "training.dep_log_level": both(note("mlxrl prints its own progress lines (--quiet hides the bar)")),
    "training.enable_wandb": both(H),  # a missing wandb package is a note at run time
    "training.enable_mlflow": mlx_only("MLflow logging is not built in on MLX; metrics go to metrics.jsonl"),
    "training.enable_tensorboard": both(H),  # mlxrl's writer where transformers has none
    "training.logging_strategy": both(note("mlxrl logs every training.logging_steps")),
    "training.logging_dir": both(H),  # TensorBoard's folder (default output_dir/runs/<time>_<host>)
    "training.eval_strategy": both(Support("honoured", _eval_strategy), always=True),
    "training.eval_steps": both(Support("honoured", _eval_setting)),
    "training.mixed_precision_dtype": mlx_only("MLX computes in the model's dtype (model.torch_dtype_str)"),
    "training.include_performance_metrics": Row(H, note("tokens/s and step time are in metrics.jsonl "
                                                        "on MLX only")),  # MLX always logs them
    "training.include_alternative_mfu_metrics": both(note("no MFU metrics")),
    "training.log_model_summary": both(note("the trainable and total parameter counts are printed")),
    "training.dataloader_num_workers": mlx_only(IN_PROCESS),
    "training.dataloader_persistent_workers": mlx_only(IN_PROCESS),
    "training.dataloader_prefetch_factor": mlx_only(IN_PROCESS),
    "training.dataloader_main_process_only": both(note("data is read in-process")),
    "training.ddp_find_unused_parameters": mlx_only(SINGLE_DEVICE),
    "training.verl_config_overrides": both(note("VERL is not supported; the section is not read")),
    "training.profiler": both(note("no profiler is built in")),
    "training.telemetry": both(note("mlxrl sends no telemetry")),
    "training.empty_device_cache_steps": mlx_only("MLX manages its own memory cache"),
    "training.label_ignore_index": both(note("losses use completion masks, not label ids")),
})

_TRAINER_KWARGS = {
    "training.trainer_kwargs.num_iterations": both(H, methods=("grpo",)),
    "training.trainer_kwargs.padding_free": both(note("rows are padded (the loss is the same)")),
    "training.trainer_kwargs.disable_dropout": both(H, methods=("dpo", "grpo")),  # TRL's default: DPO on
    "training.trainer_kwargs.dataset_num_proc": mlx_only("rows are encoded in-process"),
    "training.trainer_kwargs.ref_model_init_kwargs": both(note(_ref_model_init_kwargs)),
    "training.trainer_kwargs.vllm_mode": mlx_only(NO_VLLM),
    "training.trainer_kwargs.shuffle_dataset": Row(note(_shuffle), H),
    "training.trainer_kwargs.generation_kwargs": mlx_only("not read by MLX's sampler"),
}

_PEFT = {f"peft.{k}": both(H) for k in (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_exclude_modules", "use_dora",
    "q_lora_bits")}
_PEFT.update({f"peft.{k}": Row(note(_bnb), H) for k in (
    "bnb_4bit_quant_type", "llm_int8_skip_modules", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
    "bnb_4bit_compute_dtype")})
_PEFT.update({
    "peft.lora_target_parameters": mlx_only("LoRA on parameters (MoE experts) is not available on MLX"),
    "peft.lora_modules_to_save": mlx_only("modules trained in full beside LoRA are not available on MLX"),
    "peft.lora_bias": mlx_only("mlx-lm's LoRA layers train no bias"),
    "peft.lora_init_weights": mlx_only("mlx-lm initialises LoRA as PEFT's default (A random, B zero)"),
    "peft.lora_task_type": mlx_only("mlxrl trains causal language models"),
    "peft.peft_save_mode": both(note("the adapter alone is saved; `mlxrl fuse` merges it")),
})


def _lora_only(support: Support) -> Support:
    """A `peft` field's support when training.use_peft is true; a note when it is false."""
    def text(value, cfg):
        return support.message(value, cfg) if cfg.training.use_peft else FULL_FINETUNE
    return Support("note" if support.kind == "refused" else support.kind, text)


_PEFT = {path: Row(_lora_only(row.mlx), _lora_only(row.torch)) for path, row in _PEFT.items()}
_PEFT["peft.q_lora"] = both(refused(_q_lora))

_OTHER = {
    "generation.*": both(note("read by `mlxrl infer` and `eval`, not by training "
                              "(GRPO samples with training.grpo)")),
    "fsdp": Row(note(SINGLE_DEVICE), note("not read; configure it with `accelerate config` and run "
                                          "`accelerate launch -m mlxrl.cli train ...`")),
    "deepspeed": Row(note(SINGLE_DEVICE), note("not read; configure it with `accelerate config` and "
                                               "run `accelerate launch -m mlxrl.cli train ...`")),
}

TABLE: dict[str, Row] = {**_MODEL, **_DATA, **_GRPO, **_TRAINING, **_TRAINER_KWARGS, **_PEFT, **_OTHER}

# `mlxrl infer` / `eval` (MLX) and the generation fields
_UNSUPPORTED = "not supported by mlxrl's sampler; ignored"
INFERENCE: dict[str, Support] = {f"generation.{k}": H for k in (
    "max_new_tokens", "batch_size", "seed", "temperature", "top_p", "top_k", "min_p", "stop_strings",
    "stop_token_ids", "skip_special_tokens", "use_cache")}
INFERENCE.update({f"generation.{k}": note(_UNSUPPORTED) for k in (
    "frequency_penalty", "presence_penalty", "logit_bias", "num_beams", "guided_decoding")})
INFERENCE.update({
    "generation.exclude_prompt_from_response": note("false: replies never include the prompt"),
    "generation.use_sampling": note("sampling follows temperature (0: greedy, above 0: sampled)"),
})


# ----------------------------------------------------------------------------- reading the table


def fields(cls, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a dataclass tree as {dotted path: default value}."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f"{prefix}{f.name}"] = default
    return out


def row_for(path: str) -> Row | None:
    """The row of a dotted field path: its own, or its section's (`data.validation.*`)."""
    if path in TABLE:
        return TABLE[path]
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        section = ".".join(parts[:n]) + ".*"
        if section in TABLE:
            return TABLE[section]
    return None


def _value(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def check(cfg, backend: str) -> None:
    """Log the `notes` of a run of `cfg` on `backend` (at WARNING, the level of notes)."""
    for line in notes(cfg, backend):
        logger.warning(line)


def notes(cfg, backend: str) -> list[str]:
    """One note per field this backend cannot honour as set; raise ConfigError for a refused
    one. `backend` is "mlx" or "torch"."""
    from mlxrl.config import TrainConfig

    method = cfg.training.method
    said: dict[str, list[str]] = {}  # reason -> the fields that gave it (one line per reason)
    defaults = fields(TrainConfig)
    values = {path: (_value(cfg, path), default) for path, default in defaults.items()}
    values.update({f"training.trainer_kwargs.{k}": (v, object()) for k, v in
                   cfg.training.trainer_kwargs.items() if f"training.trainer_kwargs.{k}" in TABLE})
    for path, (value, default) in values.items():
        row = row_for(path)
        if row is None or (value == default and not row.always):
            continue
        name = path if path in TABLE else next(k for k in TABLE if k.endswith(".*") and
                                               path.startswith(k[:-1]))
        if row.methods and method not in row.methods:
            text = f"read by {'/'.join(m.upper() for m in row.methods)} runs only; ignored in {method.upper()}"
        else:
            support = getattr(row, backend)
            text = support.message(value, cfg)
            if text and support.kind == "refused":
                raise ConfigError(f"{path}: {text}")
        if text and name.removesuffix(".*") not in said.setdefault(text, []):
            said[text].append(name.removesuffix(".*"))
    return [f"note: {', '.join(names)}: {text}" for text, names in said.items()]


def check_inference(generation) -> list[str]:
    """The same for `mlxrl infer` / `eval`: one note per generation field the sampler ignores."""
    from mlxrl.config import GenerationParams

    out = []
    for path, default in fields(GenerationParams, "generation.").items():
        value = _value(generation, path.split(".", 1)[1])
        support = INFERENCE[path]
        text = support.message(value, None) if value != default else None
        if text:
            out.append(f"note: {path}: {text}")
    return out
