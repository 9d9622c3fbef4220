"""dpo_loss against a float64 NumPy transcription of TRL's DPOTrainer formulas."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxrl.mlx.dpo import DPO_LOSSES, dpo_loss

BETA = 0.1


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_dpo(pc, pr, rc, rr, loss_type, beta=BETA, ls=0.0, n_c=None, n_r=None, tau=0.05):
    """Per-pair loss mean and metrics, written from trl/trainer/dpo_trainer.py::_compute_loss."""
    s_c, s_r = pc - rc, pr - rr
    delta = s_c - s_r
    if loss_type in ("ipo", "sigmoid_norm"):
        norm_delta = s_c / np.maximum(n_c, 1) - s_r / np.maximum(n_r, 1)
    per_pair = {
        "sigmoid": lambda: -log_sigmoid(beta * delta),
        "hinge": lambda: np.maximum(0.0, 1 - beta * delta),
        "ipo": lambda: (norm_delta - 1 / (2 * beta)) ** 2,
        "robust": lambda: (
            (-(1 - ls) * log_sigmoid(beta * delta) - (-ls * log_sigmoid(-beta * delta)))
            / (1 - 2 * ls)
        ),
        "sigmoid_norm": lambda: -log_sigmoid(beta * norm_delta),
        "bco_pair": lambda: -log_sigmoid(beta * s_c) - log_sigmoid(-beta * s_r),
        "exo_pair": lambda: (
            sigmoid(beta * delta) * (log_sigmoid(beta * delta) - np.log1p(-ls))
            + sigmoid(-beta * delta) * (log_sigmoid(-beta * delta) - np.log(ls))
        ),
        "nca_pair": lambda: (
            -log_sigmoid(beta * s_c)
            - 0.5 * log_sigmoid(-beta * s_c)
            - 0.5 * log_sigmoid(-beta * s_r)
        ),
        "sppo_hard": lambda: (s_c - 0.5 / beta) ** 2 + (s_r + 0.5 / beta) ** 2,
        "aot": lambda: aot_loss(np.sort(pc - pr) - np.sort(rc - rr), beta, ls),
        "aot_unpaired": lambda: aot_loss(np.sort(s_c) - np.sort(s_r), beta, ls),
        "apo_zero": lambda: (1 - sigmoid(beta * s_c)) + sigmoid(beta * s_r),
        "apo_down": lambda: sigmoid(beta * s_c) + (1 - sigmoid(beta * (s_c - s_r))),
        "discopop": lambda: discopop_loss(beta * delta, tau),
    }[loss_type]()
    chosen_rewards, rejected_rewards = beta * s_c, beta * s_r
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(np.float64).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    return per_pair.mean(), metrics


def aot_loss(delta, beta, ls):
    return -log_sigmoid(beta * delta) * (1 - ls) - log_sigmoid(-beta * delta) * ls


def discopop_loss(logits, tau):
    mix = sigmoid(logits / tau)
    return -log_sigmoid(logits) * (1 - mix) + np.exp(-logits) * mix


@pytest.fixture(scope="module")
def batch():
    """Summed log-probs of 8 pairs, spread like real completions of 5..40 tokens."""
    rng = np.random.default_rng(1234)
    n_c = rng.integers(5, 40, size=8).astype(np.float64)
    n_r = rng.integers(5, 40, size=8).astype(np.float64)
    rc, rr = -1.3 * n_c + rng.normal(0, 2, 8), -1.3 * n_r + rng.normal(0, 2, 8)
    pc, pr = rc + rng.normal(0, 3, 8), rr + rng.normal(0, 3, 8)
    # float32 inputs for both, so only the arithmetic precision differs
    return [x.astype(np.float32).astype(np.float64) for x in (pc, pr, rc, rr, n_c, n_r)]


def run_mlx(batch, **kwargs):
    pc, pr, rc, rr, n_c, n_r = (mx.array(x.astype(np.float32)) for x in batch)
    return dpo_loss(pc, pr, rc, rr, chosen_lengths=n_c, rejected_lengths=n_r, **kwargs)


PAIR_LOSSES = sorted(set(DPO_LOSSES) - {"sft"})  # sft reads token log-probs: test_trl_loss_parity.py


@pytest.mark.parametrize("loss_type", PAIR_LOSSES)
def test_loss_and_metrics_match_numpy_reference(batch, loss_type):
    ls = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    loss, metrics = run_mlx(batch, beta=BETA, loss_type=loss_type, label_smoothing=ls)
    ref_loss, ref_metrics = numpy_dpo(*batch[:4], loss_type, ls=ls, n_c=batch[4], n_r=batch[5])
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5, atol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name].item(), value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_sigmoid_ignores_label_smoothing(batch):
    plain, _ = run_mlx(batch, loss_type="sigmoid")
    smoothed, _ = run_mlx(batch, loss_type="sigmoid", label_smoothing=0.2)
    assert plain.item() == smoothed.item()


def test_policy_equal_to_reference_gives_ln2():
    logps = mx.array([-12.0, -30.5, -7.25])
    for loss_type in ("sigmoid", "robust"):
        loss, metrics = dpo_loss(logps, logps - 3.0, logps, logps - 3.0, loss_type=loss_type)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["rewards/margins"].item() == 0.0
        assert metrics["rewards/accuracies"].item() == 0.0  # ties are not wins


def test_accuracies_are_per_pair_not_on_batch_means():
    # pair 0 is right by a lot, pairs 1-3: two wrong and one right by a little; the batch-mean
    # margin is positive, so an accuracy computed on means would say 1.0
    ref = mx.zeros(4)
    chosen = mx.array([10.0, -1.0, -1.0, 0.5])
    rejected = mx.zeros(4)
    _, metrics = dpo_loss(chosen, rejected, ref, ref)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)
    assert metrics["rewards/margins"].item() > 0


def test_loss_types_give_different_values(batch):
    values = {}
    for loss_type in PAIR_LOSSES:
        ls = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        values[loss_type] = round(
            run_mlx(batch, loss_type=loss_type, label_smoothing=ls)[0].item(), 6
        )
    assert len(set(values.values())) == len(values), values


def test_weighted_list_of_loss_types(batch):
    combined, _ = run_mlx(batch, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])
    sigmoid_loss, _ = run_mlx(batch, loss_type="sigmoid")
    bco_loss, _ = run_mlx(batch, loss_type="bco_pair")
    expected = 0.8 * sigmoid_loss.item() + 0.2 * bco_loss.item()
    assert combined.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_sigmoid_derivative(batch):
    pc, pr, rc, rr, _, _ = (mx.array(x.astype(np.float32)) for x in batch)
    grad = mx.grad(lambda chosen: dpo_loss(chosen, pr, rc, rr, beta=BETA)[0])(pc)
    delta = (batch[0] - batch[2]) - (batch[1] - batch[3])
    expected = -BETA * sigmoid(-BETA * delta) / len(delta)
    np.testing.assert_allclose(np.array(grad), expected, atol=1e-6)


def test_compiles():
    compiled = mx.compile(lambda a, b, c, d: dpo_loss(a, b, c, d, loss_type="hinge")[0])
    args = [mx.array([-3.0, -4.0]), mx.array([-5.0, -2.0]), mx.array([-3.5, -4.0]), mx.zeros(2) - 3]
    assert compiled(*args).item() == pytest.approx(dpo_loss(*args, loss_type="hinge")[0].item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "dpo"}, "valid: sigmoid, hinge, ipo"),
        ({"loss_type": ["sigmoid", "nope"]}, "nope"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    x = mx.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


def test_length_normalised_types_need_lengths():
    x = mx.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
