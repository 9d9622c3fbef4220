"""Where a config is silent, TRL 1.16's defaults apply: every field mlxrl resolves for DPO and
GRPO, read against TRL's own `DPOConfig` / `GRPOConfig` dataclass defaults.

Two levels are checked: the settings both backends read (`dpo_settings()` / `grpo_settings()`),
and the whole TRL config the torch backend builds from a silent config (every DPOConfig /
GRPOConfig field, and the TrainingArguments fields TRL's configs give defaults of their own).
The intended departures are listed with their reason: the config schema is Oumi's, so where
Oumi's own dataclasses set a default (and Oumi passes it to TRL), Oumi's value wins.
"""

import dataclasses

import pytest

from mlxrl.config import TrainingParams, load_config

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

SILENT = ["training.output_dir=unused", "training.per_device_train_batch_size=8"]

# field -> (mlxrl's value, why)
DEPARTURES = {
    "TRL_DPO": {},
    "TRL_GRPO": {
        "temperature": (0.9, "Oumi's GrpoParams.temperature default (training.grpo.temperature)"),
        "vllm_gpu_memory_utilization": (0.9, "Oumi's GrpoParams default (torch backend with vLLM only)"),
    },
}
# TrainingArguments fields whose default TRL's configs change; mlxrl's come from Oumi's
# TrainingParams (or, for bf16, the model's dtype and training.mixed_precision_dtype)
OUMI_TRAINING_DEFAULTS = {
    "learning_rate": TrainingParams.learning_rate,
    "logging_steps": TrainingParams.logging_steps,
    "gradient_checkpointing": TrainingParams.enable_gradient_checkpointing,
    "bf16": False,  # a float32 model without mixed_precision_dtype: no autocast
}


def default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def trl_defaults(cls) -> dict:
    return {f.name: default(f) for f in dataclasses.fields(cls)}


def as_trl(name, value, default):
    """The spelling TRL normalises to: DPO's loss_type string is a one-item list."""
    return [value] if isinstance(default, list) and isinstance(value, str) else value


@pytest.mark.parametrize("method, settings_of, trl_class", [
    ("TRL_DPO", lambda c: c.dpo_settings(), "DPOConfig"),
    ("TRL_GRPO", lambda c: c.grpo_settings(), "GRPOConfig"),
])
def test_resolved_settings_are_trl_defaults(method, settings_of, trl_class):
    settings = settings_of(load_config(None, [f"training.trainer_type={method}", *SILENT]))
    theirs = trl_defaults(getattr(trl, trl_class))
    for field in dataclasses.fields(settings):
        assert field.name in theirs, f"{field.name} is not a {trl_class} field"
        ours = as_trl(field.name, getattr(settings, field.name), theirs[field.name])
        if field.name in DEPARTURES[method]:
            assert ours == DEPARTURES[method][field.name][0], field.name
            assert ours != theirs[field.name], f"{field.name} no longer departs: drop it from DEPARTURES"
        else:
            assert ours == theirs[field.name], f"{field.name}: mlxrl {ours!r}, TRL {theirs[field.name]!r}"


@pytest.mark.parametrize("method", ["TRL_DPO", "TRL_GRPO"])
def test_torch_backend_config_is_trl_defaults(method):
    from mlxrl.torch import translate

    cfg = load_config(None, [f"training.trainer_type={method}", *SILENT])
    common = translate.common_fields(cfg, False, False, "cpu")
    if method == "TRL_DPO":
        built, cls = translate.dpo_config(cfg, common), trl.DPOConfig
    else:
        built, cls = translate.grpo_config(cfg, common, use_vllm=False), trl.GRPOConfig
    reference = cls(output_dir="unused", report_to="none", use_cpu=True)  # TRL's own resolution
    base = trl_defaults(transformers.TrainingArguments)
    for name, value in trl_defaults(cls).items():
        ours = getattr(built, name)
        if name in DEPARTURES[method]:
            assert ours == DEPARTURES[method][name][0], name
        elif name in OUMI_TRAINING_DEFAULTS:
            assert value != base[name]  # a TrainingArguments default that TRL's config changes
            assert ours == OUMI_TRAINING_DEFAULTS[name], name
        elif name in base and value != base[name]:
            assert ours == getattr(reference, name), name
        elif name not in base:
            assert ours == getattr(reference, name), f"{name}: mlxrl {ours!r}, TRL {getattr(reference, name)!r}"
