"""reward_metrics (GRPO training and `mlxrl eval --task reward`) against TRL 1.16's own `nanstd`
and the lines of `GRPOTrainer._generate_and_score_completions` that log the reward metrics
(trl/trainer/grpo_trainer.py, sum_then_normalize branch and the `_metrics` block after it)."""

import json
import math

import numpy as np
import pytest

from mlxrl.reward_metrics import nanstd, reward_metrics

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")

WEIGHTS = np.array([1.0, 0.5])


def trl_metrics(names, scores, num_generations, scale_rewards):
    """The logged values, computed with TRL's functions on torch tensors as TRL does."""
    per_func = torch.tensor(scores, dtype=torch.float32)
    unscorable = torch.isnan(per_func).all(dim=1)
    rewards = (per_func * torch.tensor(WEIGHTS, dtype=torch.float32).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    if scale_rewards in ("group", "none"):
        std = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, i]).item()
        out[f"rewards/{name}/std"] = trl_utils.nanstd(per_func[:, i]).item()
    out["reward"] = torch.nanmean(rewards).item()
    out["reward_std"] = trl_utils.nanstd(rewards).item()
    out["frac_reward_zero_std"] = is_std_zero.float().mean().item()
    return out


def total(scores):
    weighted = scores * WEIGHTS[None, :]
    out = np.nansum(weighted, axis=1)
    out[np.all(np.isnan(weighted), axis=1)] = np.nan
    return out


nan = math.nan
BATCHES = {
    # group 0 ties (zero std), group 1 one scorable row (std NaN: not zero), group 2 all None
    "ties_lone_and_unscorable": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0],
                                          [nan, nan], [2.0, nan], [nan, nan],
                                          [nan, nan], [nan, nan], [nan, nan]]),
    "random_with_nans": np.where(np.random.default_rng(0).random((12, 2)) < 0.2, nan,
                                 np.random.default_rng(1).normal(size=(12, 2))),
    "second_function_one_value": np.array([[0.5, nan], [1.5, nan], [0.5, 3.0], [0.5, nan],
                                           [0.0, nan], [2.0, nan]]),
    "all_equal": np.ones((6, 2)),
}


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_matches_trl(batch, scale_rewards):
    scores = BATCHES[batch]
    G = 3
    ours = reward_metrics(["a", "b"], scores, total(scores), G, scale_rewards)
    theirs = trl_metrics(["a", "b"], scores, G, scale_rewards)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if math.isnan(value):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_batch_scaling_uses_the_batch_std():
    """Two groups of ties with different values: zero std per group, not over the batch."""
    scores = np.array([[1.0, 0.0]] * 2 + [[3.0, 0.0]] * 2)
    assert reward_metrics(["a", "b"], scores, total(scores), 2, "group")["frac_reward_zero_std"] == 1.0
    assert reward_metrics(["a", "b"], scores, total(scores), 2, "batch")["frac_reward_zero_std"] == 0.0


def test_std_of_one_value_is_nan_as_trl():
    assert math.isnan(float(nanstd(np.array([2.0]))))
    assert math.isnan(float(nanstd(np.array([2.0, nan]))))
    assert float(nanstd(np.array([1.0, 3.0]))) == pytest.approx(math.sqrt(2.0))


def test_training_log_leaves_nan_out_and_writes_null(tmp_path):
    """The MLX loop's log line: NaN values do not enter averages; all-NaN is null (TRL's log)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxrl.config import load_config
    from mlxrl.mlx.trainer import StepBatch, Trainer

    class Method:
        name, epoch, examples_per_step = "grpo", 0.0, 1
        values = iter([{"r": 1.0, "s": nan}, {"r": nan, "s": nan}, {"r": 3.0, "s": nan}])

        def __init__(self, model):
            self.model = model

        def loss(self, x):
            return (self.model.w * x).sum(), {}

        def next_step(self):
            return StepBatch([(mx.array([1.0]),)], metrics=next(self.values))

        def state(self):
            return {}

    model = nn.Module()
    model.w = mx.zeros((1,))
    cfg = load_config(None, ["training.max_steps=3", "training.logging_steps=3", "training.save_steps=0",
                             "training.save_final_model=false", f"training.output_dir={tmp_path}"])
    Trainer(cfg, type("L", (), {"model": model})(), Method(model), {}, 3, quiet=True).run()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["r"] == 2.0 and record["s"] is None
