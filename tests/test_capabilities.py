"""The one table of what each backend honours (mlxrl/capabilities.py): every schema field is in it,
notes come only for settings a user changed, and once per reason."""

import pytest

from mlxrl import capabilities
from mlxrl.config import GenerationParams, TrainConfig, load_config
from mlxrl.errors import ConfigError


def notes(overrides, backend="mlx"):
    cfg = load_config(None, ["--model.model_name", "m", "--training.use_peft", "true", *overrides])
    return capabilities.notes(cfg, backend)


def test_every_field_of_the_schema_is_in_the_table():
    missing = [p for p in capabilities.fields(TrainConfig) if capabilities.row_for(p) is None]
    assert not missing, missing
    generation = capabilities.fields(GenerationParams, "generation.")
    assert set(generation) == set(capabilities.INFERENCE)
    kinds = {s.kind for row in capabilities.TABLE.values() for s in (row.mlx, row.torch)}
    assert kinds <= {"honoured", "note", "refused"}


def test_defaults_give_no_note_on_either_backend():
    assert notes([]) == [] and notes([], "torch") == []


def test_use_peft_false_is_a_full_finetune_whose_lora_fields_are_noted():
    """Oumi's default (use_peft: false) trains every weight on both backends: no note at the
    defaults; LoRA fields set anyway are named as not read, and QLoRA is refused."""
    for backend in ("mlx", "torch"):
        cfg = load_config(None, ["--model.model_name", "m"])
        assert capabilities.notes(cfg, backend) == []
        cfg = load_config(None, ["--model.model_name", "m", "--peft.lora_r", "16", "--peft.use_dora", "true",
                                 "--peft.lora_bias", "all"])
        lines = capabilities.notes(cfg, backend)
        assert lines == ["note: peft.lora_r, peft.lora_bias, peft.use_dora: not read: training.use_peft is "
                         "false, so every weight trains (no adapter)"]
        cfg = load_config(None, ["--model.model_name", "m", "--peft.q_lora", "true"])
        with pytest.raises(ConfigError, match="peft.q_lora: a quantized base trains only through an adapter"):
            capabilities.notes(cfg, backend)
    assert notes(["--peft.lora_bias", "all"]) == ["note: peft.lora_bias: mlx-lm's LoRA layers train no bias"]


def test_single_device_and_accelerate_notes():
    fsdp = ["--fsdp", "{enable_fsdp: true}", "--deepspeed", "{zero_stage: ZERO_3}"]
    assert notes(fsdp) == ["note: fsdp, deepspeed: single device; for several GPUs use --backend torch"]
    assert notes(fsdp, "torch") == ["note: fsdp, deepspeed: not read; configure it with `accelerate config` "
                                    "and run `accelerate launch -m mlxrl.cli train ...`"]


def test_value_dependent_notes_and_refusals():
    assert notes(["--training.trainer_type", "OUMI"]) == [
        "note: training.trainer_type: OUMI trains SFT here (TRL's SFTTrainer on the chat-templated rows)"]
    assert notes(["--training.trainer_type", "TRL_DPO"]) == []
    assert "adamw_torch_fused" in notes(["--training.optimizer", "adamw_torch_fused"])[0]
    assert notes(["--training.optimizer", "adamw_torch_fused"], "torch") == []
    with pytest.raises(ConfigError, match="training.optimizer 'lion_32bit' is not available on MLX"):
        notes(["--training.optimizer", "lion_32bit"])
    assert notes(["--training.optimizer", "lion_32bit"], "torch") == []


def test_fields_of_another_method_and_trainer_kwargs_keys():
    said = notes(["--training.reward_functions", "[count_letters]", "--data.train.pack", "true",
                  "--training.trainer_type", "TRL_DPO", "--training.trainer_kwargs", "{padding_free: true}"])
    assert "note: training.reward_functions: read by GRPO runs only; ignored in DPO" in said
    assert "note: data.train.pack: read by SFT runs only; ignored in DPO" in said
    assert "note: training.trainer_kwargs.padding_free: rows are padded (the loss is the same)" in said
    grpo = notes(["--training.trainer_type", "TRL_GRPO", "--training.reward_functions", "[count_letters]",
                  "--training.per_device_train_batch_size", "8", "--training.trainer_kwargs",
                  "{shuffle_dataset: false, num_iterations: 2}"])
    assert grpo == ["note: training.trainer_kwargs.shuffle_dataset: false: MLX always shuffles the prompts "
                    "(seeded by training.seed)"]


def test_sections_and_shared_reasons_give_one_line():
    said = notes(["--data.validation.datasets", "[{dataset_name: v.jsonl}]", "--data.validation.pack", "true",
                  "--peft.bnb_4bit_quant_type", "nf4", "--peft.bnb_4bit_compute_dtype", "bfloat16",
                  "--generation.num_beams", "4", "--generation.max_new_tokens", "5"])
    assert len([x for x in said if "data.validation" in x]) == 1
    assert [x for x in said if "bitsandbytes" in x] == [
        "note: peft.bnb_4bit_quant_type, peft.bnb_4bit_compute_dtype: MLX quantizes with its own 4-bit "
        "affine quantization; bitsandbytes settings do not apply"]
    assert said.count("note: generation: read by `mlxrl infer` and `eval`, not by training "
                      "(GRPO samples with training.grpo)") == 1
    assert len(said) == 3


def test_inference_notes():
    lines = capabilities.check_inference(GenerationParams(num_beams=4, max_new_tokens=8, frequency_penalty=0.5))
    assert lines == ["note: generation.frequency_penalty: not supported by mlxrl's sampler; ignored",
                     "note: generation.num_beams: not supported by mlxrl's sampler; ignored"]


def test_infer_cli_config_prints_the_inference_notes(tmp_path):
    from mlxrl.inference import load_inference_config

    _, said = load_inference_config(None, ["--model.model_name", "tiny://qwen2", "--generation.logit_bias",
                                           "{5: 1.0}"])
    assert said == ["note: generation.logit_bias: not supported by mlxrl's sampler; ignored"]


def test_collator_and_train_target_are_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="collator_name 'text_only' is not one of"):
        load_config(None, ["--data.train.collator_name", "text_only"])
    with pytest.raises(ConfigError, match="train_target needs collator_name: text_completions_only"):
        load_config(None, ["--data.train.train_target", "final_assistant_turn"])
    cfg = load_config(None, ["--data.train.collator_name", "text_completions_only_with_padding",
                             "--data.train.train_target", "FINAL_ASSISTANT_TURN"])
    assert cfg.data.train.train_target == "final_assistant_turn"
