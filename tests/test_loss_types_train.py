"""Every TRL loss option that is not plain sigmoid / dapo trains on MLX end to end (the compiled
step, accumulation, logging), and TRL's `disable_dropout` is honoured. The values are held to
TRL's own code in tests/test_trl_loss_parity.py and tests/test_torch_backend.py."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxrl.config import load_config
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.train import disable_dropout, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
STEPS = 3


def run(method, out, trainer_kwargs, *extra):
    data = {"dpo": ["--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl")],
            "grpo": ["--data.train.datasets[0].dataset_path", str(DATA / "letter_count.jsonl")]}[method]
    cfg = load_config(ROOT / f"configs/quickstart/{method}.yaml", [
        *data, "--training.output_dir", str(out), "--training.max_steps", str(STEPS),
        "--training.logging_steps", "1", "--training.save_steps", "0",
        "--training.trainer_kwargs", trainer_kwargs, *extra])
    train(cfg, quiet=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SLOW = pytest.mark.slow  # one DPO and one GRPO case run by default; the rest with -m slow


@pytest.mark.parametrize("trainer_kwargs", [
    "{loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5], ld_alpha: 0.5}",
    pytest.param("{loss_type: [ipo, sigmoid_norm], use_weighting: true, f_divergence_type: js_divergence, "
                 "beta: 0.5}", marks=SLOW),
    pytest.param("{loss_type: exo_pair, label_smoothing: 0.001, f_divergence_type: forward_kl}", marks=SLOW),
])
def test_dpo_options_train(tmp_path, trainer_kwargs):
    records = run("dpo", tmp_path, trainer_kwargs, "--training.gradient_accumulation_steps", "2",
                  "--training.per_device_train_batch_size", "2")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]  # it learns the pairs


@pytest.mark.parametrize("loss_type, level, metric", [
    ("cispo", "token", "cispo_clip_ratio"),
    pytest.param("sapo", "token", None, marks=SLOW),
    pytest.param("vespo", "token", "vespo/phi_seq_mean", marks=SLOW),
    pytest.param("luspo", "sequence", "clip_ratio/region_mean", marks=SLOW),
])
def test_grpo_loss_types_train(tmp_path, loss_type, level, metric):
    records = run("grpo", tmp_path, f"{{loss_type: {loss_type}, importance_sampling_level: {level}, "
                                    f"beta: 0.04, epsilon_high: 5.0}}",
                  "--training.grpo.max_completion_length", "8", "--training.gradient_accumulation_steps", "2",
                  "--training.per_device_train_batch_size", "4")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in records)
    if metric:
        assert all(metric in r for r in records)
    if loss_type == "vespo":  # one update per rollout: every sequence ratio is 1, phi(1) = 1
        assert all(r["vespo/phi_seq_mean"] == pytest.approx(1.0) for r in records)


def test_disable_dropout_leaves_no_dropout():
    cfg = load_config(None, ["--model.model_name", "tiny://qwen2", "--peft.lora_dropout", "0.5"])
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    model = loaded.model
    lora = mlx_model.lora_layers(model)
    for layer in lora:  # non-zero B, so dropout on the LoRA input changes the output
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    model.train()
    ids = mx.array([[1, 5, 9, 13, 17, 21]])
    assert not np.allclose(np.array(model(ids)), np.array(model(ids)))
    assert disable_dropout(model) == len(lora)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    np.testing.assert_array_equal(np.array(model(ids)), np.array(model(ids)))
