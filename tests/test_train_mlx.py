"""End-to-end SFT and DPO on MLX with the tiny model: learning, what changes, what reloads."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxrl.config import load_config
from mlxrl.data.loading import load_split
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.dpo import DPOMethod, preference_eval
from mlxrl.mlx.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"


def dpo_config(out, *extra):
    return load_config(ROOT / "configs/quickstart/dpo.yaml", [
        "--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl"),
        "--training.output_dir", str(out), *extra])


def heldout_config(cfg, model_name):
    return load_config(None, [
        "--model.model_name", model_name, "--model.torch_dtype_str", "float32",
        "--data.train.datasets", f"[{{dataset_name: {DATA / 'preferences_heldout.jsonl'}}}]"])


def base_weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())
            if "lora_" not in k}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    cfg = dpo_config(out)
    before = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    data = load_split(heldout_config(cfg, cfg.model.model_name).data.train)
    eval_before = preference_eval(before.model, before.tokenizer, data, cfg.dpo_settings())
    train(cfg, quiet=True)
    after = mlx_model.load(load_config(None, ["--model.model_name", str(out)]).model)
    eval_after = preference_eval(after.model, after.tokenizer, data, cfg.dpo_settings())
    return cfg, out, before, eval_before, eval_after


def test_step_zero_policy_equals_reference(tmp_path):
    cfg = dpo_config(tmp_path)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    method = DPOMethod(cfg, loaded, load_split(cfg.data.train))
    arrays, = method.next_step().micro_batches  # (ids, mask[, precomputed reference])
    loss, metrics = method.loss(*arrays)
    assert abs(float(loss) - math.log(2)) < 1e-5
    # equal up to float32 rounding: the precomputed reference ran in batches of another width, and
    # OpenBLAS picks its kernels by shape (exactly 0.0 on an AVX-512 machine, 2.9e-7 on an AVX2 EPYC)
    assert abs(float(metrics["rewards/margins"])) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_reference_is_the_base_model_also_for_dora(dora):
    """PEFT's disable_adapter(): the base layers alone. A LoRA scale of 0 would leave DoRA's
    trained magnitudes in place."""
    from mlxrl.config import ModelParams, PeftParams

    base = mlx_model.load(ModelParams(model_name="tiny://qwen2")).model
    trained = mlx_model.load(ModelParams(model_name="tiny://qwen2"), PeftParams(use_dora=dora),
                             for_training=True).model
    for layer in mlx_model.lora_layers(trained):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        if dora:
            layer.m = layer.m * 1.5
    ids = mx.array([[3, 5, 7, 9, 11, 2, 4]])
    adapted = trained(ids)
    with mlx_model.adapters_disabled(trained):
        reference = trained(ids)
    assert mx.array_equal(reference, base(ids)).item()
    assert not mx.allclose(adapted, reference, atol=1e-2).item()
    assert mx.array_equal(trained(ids), adapted).item()  # the adapters are back on exit


def test_dpo_learns_heldout_preferences(dpo_run):
    cfg, out, _, before, after = dpo_run
    assert before["rewards/accuracies"] < 0.1  # policy == reference: no pair is won yet
    assert after["rewards/accuracies"] >= 0.9, after
    assert after["rewards/margins"] > before["rewards/margins"] + 1.0, (before, after)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "tokens_per_second", "peak_memory_gb"):
        assert name in logged[-1], name


def test_dpo_writes_checkpoints_and_final_adapter(dpo_run):
    cfg, out, *_ = dpo_run
    for folder in (out / "checkpoint-20", out / "checkpoint-40", out):
        for name in ("adapters.safetensors", "adapter_config.json", "trainer_state.json"):
            assert (folder / name).is_file(), folder / name
    assert (out / "checkpoint-20" / "optimizer.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 40 and state["log_history"]
    assert not list(out.glob(".tmp*"))


def test_only_lora_parameters_change(dpo_run):
    cfg, out, before, *_ = dpo_run
    trained = mlx_model.load(load_config(None, ["--model.model_name", str(out)]).model)
    old, new = base_weights(before.model), base_weights(trained.model)
    assert old.keys() == new.keys()
    for k in old:
        assert np.array_equal(old[k], new[k]), k
    lora_b = [v for k, v in tree_flatten(trained.model.parameters()) if k.endswith("lora_b")]
    assert lora_b and max(float(mx.abs(v).max()) for v in lora_b) > 0


def test_saved_adapter_loads_in_mlx_lm_with_same_logits(dpo_run):
    from mlx_lm import load as mlx_lm_load

    cfg, out, *_ = dpo_run
    ours = mlx_model.load(load_config(None, ["--model.model_name", str(out / "checkpoint-40")]).model)
    theirs, _ = mlx_lm_load(str(ours.base_path), adapter_path=str(out / "checkpoint-40"))
    ids = mx.array([[1, 5, 17, 33, 2, 9, 40, 11]])
    assert mx.abs(ours.model(ids) - theirs(ids)).max().item() < 1e-5
    base, _ = mlx_lm_load(str(ours.base_path))
    assert mx.abs(ours.model(ids) - base(ids)).max().item() > 1e-3  # the adapter does something


def test_sft_lowers_loss_and_reloads(tmp_path):
    cfg = load_config(None, [
        "--model.model_name", "tiny://qwen2", "--model.model_max_length", "128",
        "--data.train.datasets", f"[{{dataset_name: {DATA / 'sft.jsonl'}}}]",
        "--training.trainer_type", "TRL_SFT", "--training.max_steps", "30",
        "--training.per_device_train_batch_size", "4", "--training.learning_rate", "5e-3",
        "--training.logging_steps", "5", "--training.save_steps", "0",
        "--training.output_dir", str(tmp_path), "--training.use_peft", "true", "--peft.lora_r", "8",
        "--peft.lora_alpha", "16"])
    train(cfg, quiet=True)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"], (logged[0]["loss"], logged[-1]["loss"])
    reloaded = mlx_model.load(load_config(None, ["--model.model_name", str(tmp_path)]).model)
    assert reloaded.adapter_path == tmp_path and mlx_model.lora_layers(reloaded.model)


def test_qlora_base_is_quantized_and_frozen(tmp_path):
    import mlx.nn as nn

    cfg = dpo_config(tmp_path, "--peft.q_lora", "true", "--training.max_steps", "3",
                     "--training.save_steps", "0")
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    quantized = [m for _, m in loaded.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized, "q_lora must quantize the base"
    before = base_weights(loaded.model)
    train(cfg, quiet=True)
    trained = mlx_model.load(load_config(None, ["--model.model_name", str(tmp_path)]).model)
    after = base_weights(trained.model)
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("overrides,needle", [
    (["--training.max_stepz", "1"], "unknown key 'training.max_stepz'"),
    (["--training.max_steps", "one"], "training.max_steps must be an integer"),
    (["--training.trainer_type", "PPO"], "trainer_type 'PPO' is not supported"),
    (["--data.train.datasets[0].dataset_name", "missing.jsonl"], "missing.jsonl"),
])
def test_cli_bad_input_is_one_line(tmp_path, overrides, needle):
    cmd = [sys.executable, "-m", "mlxrl.cli", "train", "--backend", "mlx", "-c", str(ROOT / "configs/quickstart/dpo.yaml"),
           "--training.output_dir", str(tmp_path), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_walkthrough_dpo_config_runs_to_the_end(tmp_path):
    """`mlxrl train -c configs/examples/learn_dpo_laptop.yaml` with a tiny model and local data."""
    cmd = [sys.executable, "-m", "mlxrl.cli", "train", "--backend", "mlx", "-c", "configs/examples/learn_dpo_laptop.yaml",
           "--model.model_name", "tiny://qwen2", "--model.torch_dtype_str", "float32",
           "--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl"),
           "--training.output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for folder in (tmp_path / "checkpoint-25", tmp_path / "checkpoint-50", tmp_path):
        assert (folder / "adapters.safetensors").is_file(), folder
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["mlxrl"]["quantization"]["bits"] == 4
    assert sorted({k.split(".")[-1] for k in config["lora_parameters"]["keys"]}) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_default_targets_are_every_exportable_linear_layer():
    cfg = load_config(None, ["--model.model_name", "tiny://falcon_h1"])
    keys = mlx_model.load(cfg.model, cfg.peft, for_training=True).lora["lora_parameters"]["keys"]
    assert "mamba.in_proj" in keys and "self_attn.q_proj" in keys and "feed_forward.down_proj" in keys
    assert "mamba.out_proj" not in keys  # PEFT cannot target it, so such an adapter could not be exported


def test_dpo_from_a_trained_adapter_uses_it_as_reference(dpo_run, tmp_path):
    """DPO after SFT: the reference is the starting adapter (TRL's frozen ref copy), not the base."""
    _, out, *_ = dpo_run
    cfg = dpo_config(tmp_path, "--model.model_name", str(out))
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    method = DPOMethod(cfg, loaded, load_split(cfg.data.train))
    arrays, = method.next_step().micro_batches  # (ids, mask[, precomputed reference])
    loss, metrics = method.loss(*arrays)
    assert abs(float(loss) - math.log(2)) < 1e-5  # policy == reference at the start
    # equal up to float32 rounding: the precomputed reference ran in batches of another width, and
    # OpenBLAS picks its kernels by shape (exactly 0.0 on an AVX-512 machine, 2.9e-7 on an AVX2 EPYC)
    assert abs(float(metrics["rewards/margins"])) < 1e-5
