import re

import pytest

from mlxrl.config import load_config
from mlxrl.errors import ConfigError

DPO = "configs/examples/learn_dpo_laptop.yaml"
GRPO = "configs/examples/learn_grpo_laptop.yaml"


def test_walkthrough_configs_load_as_they_are():
    dpo = load_config(DPO)
    assert dpo.training.method == "dpo"
    assert dpo.model.model_name == "tiiuae/Falcon-H1-0.5B-Instruct"
    assert dpo.training.learning_rate == 5e-5 and isinstance(dpo.training.learning_rate, float)
    assert dpo.peft.q_lora and dpo.peft.lora_scale == 2.0
    assert dpo.peft.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert dpo.data.train.datasets[0].split == "train[:100]"
    grpo = load_config(GRPO)
    assert grpo.training.method == "grpo"
    assert grpo.training.grpo.epsilon == 1e-4 and grpo.training.grpo.use_vllm
    settings = grpo.grpo_settings()
    assert settings.num_generations == 2 and settings.temperature == 0.9


@pytest.mark.parametrize("overrides", [
    ["--training.max_steps", "7"],
    ["--training.max_steps=7"],
    ["training.max_steps=7"],
])
def test_override_spellings(overrides):
    assert load_config(DPO, overrides).training.max_steps == 7


def test_list_item_and_whole_list_overrides():
    c = load_config(DPO, ["--data.train.datasets[0].dataset_path", "a.jsonl"])
    assert c.data.train.datasets[0].dataset_path == "a.jsonl"
    c = load_config(DPO, ["data.train.datasets.0.dataset_path=b.jsonl"])
    assert c.data.train.datasets[0].dataset_path == "b.jsonl"
    c = load_config(DPO, ["--data.train.datasets", "[{dataset_name: c.jsonl}, {dataset_name: d.jsonl}]"])
    assert [d.dataset_name for d in c.data.train.datasets] == ["c.jsonl", "d.jsonl"]


def test_precedence_defaults_yaml_cli():
    c = load_config(DPO, ["--training.learning_rate", "1e-3"])
    assert c.training.learning_rate == 1e-3  # CLI over YAML
    assert c.training.weight_decay == 0.0  # default where YAML is silent
    assert c.training.logging_steps == 5  # YAML over default (50)


@pytest.mark.parametrize("trainer_type,method", [
    ("TRL_SFT", "sft"), ("TRL_DPO", "dpo"), ("TRL_GRPO", "grpo"), ("sft", "sft"), ("dpo", "dpo"), ("grpo", "grpo")])
def test_trainer_type_names(trainer_type, method):
    assert load_config(DPO, [f"training.trainer_type={trainer_type}"]).training.method == method


@pytest.mark.parametrize("overrides,needle", [
    (["--training.max_stepz", "3"], "did you mean 'training.max_steps'"),
    (["--training.max_steps", "3.5"], "training.max_steps must be an integer"),
    (["--training.learning_rate", "fast"], "training.learning_rate must be a number"),
    (["--training.trainer_type", "TRL_PPO"], "trainer_type 'TRL_PPO' is not supported"),
    (["--data.train.datasets.4.dataset_path", "x"], "does not exist"),
    (["--training.trainer_kwargs", "{betta: 0.2}"], "did you mean 'beta'"),
])
def test_bad_input_names_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=".*") as info:
        c = load_config(DPO, overrides)
        c.dpo_settings()
    assert needle in str(info.value)


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model_name: x\ntraining:\n  trainer_type: dpo\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:5" in str(info.value) and "did you mean 'training.learning_rate'" in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_grpo_batch_must_hold_whole_groups():
    c = load_config(GRPO, ["--training.gradient_accumulation_steps", "3"])
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        c.grpo_settings()
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(GRPO, ["--training.grpo.num_generations", "1"])


def test_dpo_settings_from_trainer_kwargs():
    c = load_config(DPO, ["--training.trainer_kwargs", "{beta: 0.25, loss_type: ipo}"])
    s = c.dpo_settings()
    assert (s.beta, s.loss_type, s.max_length) == (0.25, "ipo", 2048)


def test_every_numeric_and_enumerated_field_has_a_range():
    """config_ranges.RULES covers each int/float field and each string field that is a choice;
    what is left out is listed here with the reason."""
    import dataclasses
    import types
    import typing

    from mlxrl import config, config_ranges

    free = {  # fields with no range: free text, names, or values the libraries check themselves
        "ModelParams": {"torch_dtype_str", "attn_implementation", "device_map", "model_name", "adapter_model",
                        "tokenizer_name", "tokenizer_pad_token", "chat_template", "model_revision"},
        "DatasetParams": {"dataset_name", "dataset_path", "subset", "split"},
        "DatasetSplitParams": {"collator_name", "target_col", "train_target"},  # collators.check_collator
        "GrpoParams": {"rollout_function"},
        "TrainingParams": {"trainer_type", "lr_scheduler_type", "optimizer", "output_dir", "run_name",
                           "metrics_function", "logging_dir", "resume_from_checkpoint", "label_ignore_index"},
        "PeftParams": {"lora_init_weights", "bnb_4bit_quant_storage", "bnb_4bit_compute_dtype"},
        "GenerationParams": set(),
        "DpoSettings": {"loss_type"},  # each DPO loss type is checked by name where the loss is built
        "GrpoSettings": {"loss_type"},  # as DPO's
    }
    for cls in (config.ModelParams, config.DatasetParams, config.DatasetSplitParams, config.GrpoParams,
                config.TrainingParams, config.PeftParams, config.GenerationParams, config.DpoSettings,
                config.GrpoSettings):
        hints = typing.get_type_hints(cls)

        def is_scalar(hint) -> bool:
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                return any(is_scalar(h) for h in typing.get_args(hint))
            return hint in (int, float, str)

        scalar = {f.name for f in dataclasses.fields(cls) if is_scalar(hints[f.name])}
        missing = scalar - set(config_ranges.RULES.get(cls.__name__, {})) - free[cls.__name__]
        assert not missing, (cls.__name__, sorted(missing))


@pytest.mark.parametrize("overrides,needle", [
    (["--training.learning_rate", "-1"], "learning_rate must be at least 0, got -1.0"),
    (["--training.adam_beta2", "1.0"], "adam_beta2 must be at least 0 and below 1"),
    (["--training.warmup_ratio", ".nan"], "warmup_ratio must be a finite number"),
    (["--peft.lora_dropout", "1"], "lora_dropout must be at least 0 and below 1"),
    (["--training.logging_strategy", "step"], "did you mean 'steps'?"),
    (["--training.trainer_kwargs", "{label_smoothing: 0.5}"], "training.trainer_kwargs.label_smoothing must be"),
    (["--data.train.datasets[0].sample_count", "0"], "sample_count must be at least 1"),
])
def test_values_out_of_range_are_refused_at_load(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(DPO, overrides)
