"""The learning rate each MLX update applies, against transformers' `get_scheduler`.

The MLX loop runs a one-parameter model whose loss has gradient 1 under plain SGD, so each update
moves the weight by exactly minus the rate it applied. That sequence must equal the rates
transformers' scheduler gives a torch SGD optimizer at updates 1..N, for every
`lr_scheduler_type` the config accepts, with `warmup_steps` and with `warmup_ratio` (turned into
steps by transformers' own `TrainingArguments.get_warmup_steps`), and `metrics.jsonl` must log the
rate each step applied. The CLI runs of both backends (and a resumed run) are checked in
tests/test_resume.py.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxrl import schedules
from mlxrl.config import load_config
from mlxrl.errors import ConfigError
from mlxrl.mlx.trainer import StepBatch, Trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 12
PEAK = 1.0

CASES = [
    ("linear", {}, 3, None),
    ("linear", {}, None, 0.3),
    ("cosine", {}, 3, None),
    ("cosine", {"num_cycles": 1.5}, None, 0.2),
    ("cosine_with_restarts", {"num_cycles": 3}, 2, None),
    ("polynomial", {"lr_end": 0.05, "power": 2.0}, 3, None),
    ("constant", {}, None, None),
    ("constant_with_warmup", {}, 4, None),
    ("constant_with_warmup", {}, None, 0.25),
    ("inverse_sqrt", {}, 3, None),
    ("inverse_sqrt", {"timescale": 5}, 2, None),
    ("cosine_with_min_lr", {"min_lr": 0.1}, 3, None),
    ("cosine_with_min_lr", {"min_lr_rate": 0.2, "num_cycles": 1.0}, None, 0.1),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}, 3, None),
    ("cosine_warmup_with_min_lr", {"min_lr": 0.05, "warmup_lr_rate": 0.2}, 4, None),
    ("warmup_stable_decay", {"num_decay_steps": 5}, 2, None),
    ("warmup_stable_decay", {"num_decay_steps": 4, "num_stable_steps": 3, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.1}, 3, None),
    ("warmup_stable_decay", {"num_decay_steps": 6, "warmup_type": "1-sqrt", "decay_type": "linear"},
     None, 0.2),
]


def test_every_accepted_type_is_covered():
    assert {kind for kind, *_ in CASES} == set(schedules.SCHEDULES)


def hf_rates(kind, kwargs, warmup_steps, warmup_ratio) -> list[float]:
    """transformers' rates for updates 1..STEPS of a torch SGD optimizer."""
    args = transformers.TrainingArguments(output_dir="unused", report_to="none",
                                          warmup_steps=warmup_steps if warmup_steps is not None
                                          else (warmup_ratio or 0.0))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=PEAK)
    scheduler = transformers.get_scheduler(kind, optimizer, args.get_warmup_steps(STEPS), STEPS,
                                           scheduler_specific_kwargs=dict(kwargs))
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


class OneWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.zeros((1,))


class UnitGradient:
    """A method whose loss is `w`: each SGD update moves `w` by minus its rate."""

    name = "sft"
    epoch = 0.0
    examples_per_step = 1  # what the MLX trainer reads for the summary

    def __init__(self, model):
        self.model, self.weights = model, []

    def loss(self, one):
        return (self.model.w * one).sum(), {}

    def next_step(self):
        self.weights.append(float(self.model.w[0]))
        return StepBatch([(mx.array([1.0]),)])

    def state(self):
        return {}

    def restore(self, state):
        pass


def run_mlx(tmp_path, kind, kwargs, warmup_steps, warmup_ratio, **training):
    overrides = {"optimizer": "sgd", "learning_rate": PEAK, "max_grad_norm": None,
                 "lr_scheduler_type": kind, "lr_scheduler_kwargs": kwargs,
                 "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio,
                 "max_steps": STEPS, "logging_steps": 1, "save_steps": 0,
                 "save_final_model": False, "output_dir": str(tmp_path), **training}
    cfg = load_config(None, [f"training.{k}={json.dumps(v)}" for k, v in overrides.items()])
    model = OneWeight()
    method = UnitGradient(model)
    loaded = type("Loaded", (), {"model": model})()
    trainer = Trainer(cfg, loaded, method, {}, STEPS, quiet=True)
    return trainer, method, model


@pytest.mark.parametrize("kind, kwargs, warmup_steps, warmup_ratio", CASES)
def test_applied_and_logged_rates_equal_transformers(tmp_path, kind, kwargs, warmup_steps, warmup_ratio):
    trainer, method, model = run_mlx(tmp_path, kind, kwargs, warmup_steps, warmup_ratio)
    trainer.run()
    weights = method.weights + [float(model.w[0])]
    applied = -np.diff(weights)
    expected = hf_rates(kind, kwargs, warmup_steps, warmup_ratio)
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=2e-6)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    # metrics.jsonl keeps 6 significant digits
    np.testing.assert_allclose([r["learning_rate"] for r in logged], expected, rtol=5e-6, atol=1e-7)


def test_resumed_run_continues_the_schedule(tmp_path):
    case = ("cosine", {}, 3, None)
    first, _, _ = run_mlx(tmp_path / "a", *case, save_steps=5)
    first.run()
    second, method, model = run_mlx(tmp_path / "a", *case, save_steps=5)
    second.restore(tmp_path / "a" / "checkpoint-5")
    second.run()
    applied = -np.diff(method.weights + [float(model.w[0])])
    np.testing.assert_allclose(applied, hf_rates(*case)[5:], rtol=1e-5, atol=2e-6)


def test_logging_every_k_steps_logs_that_steps_rate(tmp_path):
    trainer, _, _ = run_mlx(tmp_path, "linear", {}, 2, None, logging_steps=5)
    trainer.run()
    logged = {json.loads(line)["step"]: json.loads(line)["learning_rate"]
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    expected = hf_rates("linear", {}, 2, None)
    assert sorted(logged) == [5, 10, 12]
    for step, rate in logged.items():
        assert rate == pytest.approx(expected[step - 1], rel=5e-6, abs=1e-7)


@pytest.mark.parametrize("override, message", [
    (["--training.lr_scheduler_type", "reduce_lr_on_plateau"], "steps on an eval metric"),
    (["--training.lr_scheduler_type", "greedy"], "not supported"),
    (["--training.lr_scheduler_type", "cosine_schedule"], "is not one of linear, cosine"),
    (["--training.lr_scheduler_type", "cosine_with_min_lr"], "exactly one of"),
    (["--training.lr_scheduler_type", "linear", "--training.lr_scheduler_kwargs", "{num_cycles: 2}"],
     "do not apply to 'linear'"),
    (["--training.lr_scheduler_type", "polynomial", "--training.lr_scheduler_kwargs", "{lr_end: 0.1}"],
     "must be below learning_rate"),
    (["--training.lr_scheduler_type", "warmup_stable_decay"], "needs lr_scheduler_kwargs.num_decay_steps"),
])
def test_refused_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
