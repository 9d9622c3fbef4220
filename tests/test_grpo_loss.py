"""group_advantages and grpo_loss against float64 NumPy transcriptions of TRL's GRPOTrainer."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxrl.mlx.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    group_advantages,
    grpo_loss,
    per_token_kl,
)

EPS, EPS_HIGH = 0.2, 0.28
N, T = 6, 7
GRAD_ACCUM = 2
MAX_LEN = 9

# ---------------------------------------------------------------- advantages


def test_advantages_hand_value_uses_n_minus_1_std():
    adv = group_advantages(np.array([1.0, 2.0, 3.0, 4.0]), num_generations=4)
    std = math.sqrt(5.0 / 3.0)  # squares 2.25+0.25+0.25+2.25 = 5, over n-1 = 3
    np.testing.assert_allclose(adv, np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4), rtol=1e-6)
    assert adv.dtype == np.float32


def test_advantages_ties_and_zero_std_group():
    adv = group_advantages(np.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]), num_generations=4)
    tie = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    np.testing.assert_allclose(adv[:4], [tie, tie, -tie, -tie], rtol=1e-6)
    assert np.all(adv[4:] == 0.0)


def test_advantages_skip_nan_rewards():
    rewards = np.array(
        [1.0, np.nan, 3.0, np.nan, np.nan, np.nan, np.nan, np.nan, 2.0, np.nan, np.nan, np.nan]
    )
    adv = group_advantages(rewards, num_generations=4)
    # group 0: mean 2, std sqrt(2) over the two real rewards; NaN rows get 0
    expected_0 = np.array([-1.0, 0.0, 1.0, 0.0]) / (math.sqrt(2.0) + 1e-4)
    np.testing.assert_allclose(adv[:4], expected_0, rtol=1e-6)
    assert np.all(adv[4:] == 0.0)  # all-NaN group; lone reward has NaN n-1 std
    assert np.all(np.isfinite(adv))


def test_advantages_batch_scaling_keeps_group_means():
    rewards = np.array([0.0, 1.0, 5.0, 7.0])
    adv = group_advantages(rewards, num_generations=2, scale_rewards="batch")
    std = np.std(rewards, ddof=1)
    np.testing.assert_allclose(adv, np.array([-0.5, 0.5, -1.0, 1.0]) / (std + 1e-4), rtol=1e-6)


def test_advantages_none_and_booleans():
    rewards = np.array([0.0, 1.0, 5.0, 7.0])
    np.testing.assert_allclose(group_advantages(rewards, 2, "none"), [-0.5, 0.5, -1.0, 1.0])
    np.testing.assert_array_equal(
        group_advantages(rewards, 2, False), group_advantages(rewards, 2, "none")
    )
    np.testing.assert_array_equal(
        group_advantages(rewards, 2, True), group_advantages(rewards, 2, "group")
    )


def test_advantages_bad_arguments():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(np.zeros(4), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(np.zeros(4), 2, "per_token")


# ---------------------------------------------------------------- loss reference


def numpy_grpo(
    logps, old, ref, adv, mask, *, beta, loss_type, level, num_items=None, delta=None, bias_kl=False
):
    """Loss and metrics, written from trl/trainer/grpo_trainer.py::_compute_loss (float64)."""
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = ratio = np.exp(log_ratio)
    coef_2 = np.clip(coef_1, 1 - EPS, 1 + EPS_HIGH)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    A = adv[:, None]
    per_token = -np.minimum(coef_1 * A, coef_2 * A)
    metrics = {}
    if beta != 0.0:
        kl = np.exp(ref - logps) - (ref - logps) - 1
        kl = kl * ratio if bias_kl else kl  # TRL weighs the KL before capping at delta
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum() / mask.sum()
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean() / GRAD_ACCUM
    elif loss_type == "bnpo":
        loss = masked.sum() / max(mask.sum(), 1.0) / GRAD_ACCUM
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (N * MAX_LEN) / GRAD_ACCUM
    else:
        loss = masked.sum() / max(num_items if num_items is not None else mask.sum(), 1.0)
    low = ((coef_1 < 1 - EPS) & (A < 0)).astype(np.float64)
    high = ((coef_1 > 1 + EPS_HIGH) & (A > 0)).astype(np.float64)
    metrics.update(numpy_clip_metrics(low, high, mask, level))
    return loss, metrics


def numpy_clip_metrics(low, high, mask, level):
    """TRL's global_masked_mean, and nanmin / nanmax of its masked_seq_mean over rows."""
    region = np.logical_or(low, high).astype(np.float64)
    if level == "sequence":  # one value per row, every row counts
        means = {name: x.mean() for name, x in (("low", low), ("high", high), ("region", region))}
        low_rows, high_rows = low[:, 0], high[:, 0]
    else:
        means = {
            name: (x * mask).sum() / mask.sum()
            for name, x in (("low", low), ("high", high), ("region", region))
        }
        tokens = mask.sum(-1)
        empty = tokens == 0  # 0 / 0 = NaN in TRL, which nanmin / nanmax skip
        low_rows = np.where(empty, np.nan, (low * mask).sum(-1) / np.maximum(tokens, 1))
        high_rows = np.where(empty, np.nan, (high * mask).sum(-1) / np.maximum(tokens, 1))
    return {
        "clip_ratio/low_mean": means["low"],
        "clip_ratio/high_mean": means["high"],
        "clip_ratio/region_mean": means["region"],
        "clip_ratio/low_min": np.nanmin(low_rows),
        "clip_ratio/high_max": np.nanmax(high_rows),
    }


def central_difference_grad(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.fixture(scope="module")
def batch():
    """Completions of different lengths (one empty row), old != logps so some tokens clip."""
    rng = np.random.default_rng(13)  # a seed where both clip sides hit at both levels
    logps = -rng.gamma(2.0, 0.7, size=(N, T))
    old = logps + rng.normal(0.0, 0.3, size=(N, 1)) + rng.normal(0.0, 0.2, size=(N, T))
    ref = logps + rng.normal(0.0, 0.4, size=(N, T))
    adv = rng.normal(0.0, 1.0, size=N)
    lengths = [7, 5, 3, 1, 6, 0]
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float64)
    return [x.astype(np.float32).astype(np.float64) for x in (logps, old, ref, adv, mask)]


def to_mx(*arrays):
    return [mx.array(a.astype(np.float32)) for a in arrays]


def mlx_loss_fn(batch, **kwargs):
    _, old, ref, adv, mask = to_mx(*batch)
    options = dict(
        epsilon=EPS, epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN, grad_accum=GRAD_ACCUM
    )
    ref = kwargs.pop("ref", ref)
    options.update(kwargs)
    return lambda logps: grpo_loss(logps, old, ref, adv, mask, **options)


CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")  # transcribed below; every type: test_trl_loss_parity.py
CASES = [
    (t, lvl, b)
    for t in CLIPPED
    for lvl in IMPORTANCE_SAMPLING_LEVELS
    for b in (0.0, 0.05)
]


@pytest.mark.parametrize("loss_type, level, beta", CASES)
def test_loss_gradient_and_metrics_match_numpy(batch, loss_type, level, beta):
    logps, old, ref, adv, mask = batch
    num_items = (
        mask.sum() * GRAD_ACCUM if loss_type == "dapo" else None
    )  # window of 2 micro-batches
    kwargs = dict(beta=beta, loss_type=loss_type, level=level, num_items=num_items)
    ref_loss, ref_metrics = numpy_grpo(logps, old, ref, adv, mask, **kwargs)
    ref_grad = central_difference_grad(
        lambda x: numpy_grpo(x, old, ref, adv, mask, **kwargs)[0], logps
    )

    f = mlx_loss_fn(
        batch,
        beta=beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        num_items_in_batch=num_items,
    )
    loss, metrics = f(to_mx(logps)[0])
    grad = mx.grad(lambda x: f(x)[0])(to_mx(logps)[0])

    np.testing.assert_allclose(loss.item(), ref_loss, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), ref_grad, atol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name].item(), value, atol=1e-5, err_msg=name)
    # the batch really exercises both clip sides
    assert (
        0 < ref_metrics["clip_ratio/low_mean"] < 1 and 0 < ref_metrics["clip_ratio/high_mean"] < 1
    )


@pytest.mark.parametrize(
    "option",
    [
        {"delta": 1.1},
        {"use_bias_correction_kl": True},
        {"delta": 1.1, "use_bias_correction_kl": True},
    ],
)
def test_trl_options_match_numpy(batch, option):
    logps, old, ref, adv, mask = batch
    numpy_kwargs = dict(beta=0.05, loss_type="bnpo", level="token")
    numpy_kwargs.update(
        {"delta": option.get("delta"), "bias_kl": "use_bias_correction_kl" in option}
    )
    ref_loss, ref_metrics = numpy_grpo(logps, old, ref, adv, mask, **numpy_kwargs)
    ref_grad = central_difference_grad(
        lambda x: numpy_grpo(x, old, ref, adv, mask, **numpy_kwargs)[0], logps
    )
    f = mlx_loss_fn(batch, beta=0.05, loss_type="bnpo", **option)
    loss, metrics = f(to_mx(logps)[0])
    np.testing.assert_allclose(loss.item(), ref_loss, atol=1e-5)
    np.testing.assert_allclose(
        np.array(mx.grad(lambda x: f(x)[0])(to_mx(logps)[0])), ref_grad, atol=1e-5
    )
    np.testing.assert_allclose(metrics["kl"].item(), ref_metrics["kl"], atol=1e-5)


# ---------------------------------------------------------------- ratio against the sampling policy


NORMALISERS = {
    "grpo": lambda mask: np.maximum(mask.sum(-1, keepdims=True), 1.0) * N * GRAD_ACCUM,
    "bnpo": lambda mask: mask.sum() * GRAD_ACCUM,
    "dr_grpo": lambda mask: N * MAX_LEN * GRAD_ACCUM,
    "dapo": lambda mask: mask.sum(),
}


@pytest.mark.parametrize("loss_type", sorted(NORMALISERS))
@pytest.mark.parametrize("level", sorted(IMPORTANCE_SAMPLING_LEVELS))
def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage(batch, loss_type, level):
    logps, _, ref, adv, mask = batch
    _, _, ref_mx, adv_mx, mask_mx = to_mx(*batch)
    options = dict(
        loss_type=loss_type, importance_sampling_level=level, epsilon=EPS, epsilon_high=EPS_HIGH
    )
    options.update(max_completion_length=MAX_LEN, grad_accum=GRAD_ACCUM)

    def on_policy(x):
        return grpo_loss(x, mx.stop_gradient(x), ref_mx, adv_mx, mask_mx, **options)

    (loss, metrics), grad = mx.value_and_grad(on_policy)(to_mx(logps)[0])
    expected_grad = -adv[:, None] * mask / NORMALISERS[loss_type](mask)
    np.testing.assert_allclose(np.array(grad), expected_grad, atol=1e-6)
    np.testing.assert_allclose(loss.item(), expected_grad.sum(), atol=1e-6)  # loss = -sum(A*m)/norm
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_clipped_tokens_get_no_gradient():
    logps = mx.zeros((1, 4))
    old = mx.array([[0.0, -0.5, 0.5, -0.5]])  # ratios 1, e^.5 (above 1.28), e^-.5 (below .8), e^.5
    advantages = mx.array([1.0])
    mask = mx.ones((1, 4))

    def loss(x):
        return grpo_loss(x, old, None, advantages, mask, epsilon=EPS, epsilon_high=EPS_HIGH)[0]

    grad = np.array(mx.grad(loss)(logps))[0]
    # A > 0: the high-clipped tokens (1, 3) stop; the low one (2) keeps its gradient -A*ratio/4
    np.testing.assert_allclose(grad, [-0.25, 0.0, -math.exp(-0.5) / 4, 0.0], atol=1e-6)


# ---------------------------------------------------------------- KL


def test_kl_is_k3_and_never_negative():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logps = -rng.gamma(1.5, 2.0, size=(8, 16))
        ref = logps + rng.normal(
            0.0, rng.uniform(0.01, 5.0), size=(8, 16)
        )  # both signs of ref - logp
        mask = (rng.uniform(size=(8, 16)) < 0.8).astype(np.float32)
        lp, rf, m = to_mx(logps, ref, mask)
        kl = np.array(per_token_kl(lp, rf))
        assert kl.min() >= 0.0
        d = ref - logps
        np.testing.assert_allclose(kl, np.exp(d) - d - 1, rtol=1e-4, atol=1e-6)
        _, metrics = grpo_loss(lp, lp, rf, mx.zeros(8), m, beta=0.1)
        assert metrics["kl"].item() >= 0.0


def mlx_lm_lora_kl(logps, ref_logps):
    """mlx-lm-lora's "KL" with its ratio taken against the reference: r^2 - ln r - 1."""
    log_r = logps - ref_logps
    return mx.exp(log_r) * mx.exp(log_r) - log_r - 1


def test_not_mlx_lm_lora_kl():
    ref = mx.array([-2.0])
    below = ref - 0.35  # policy gives the token less probability than the reference
    assert mlx_lm_lora_kl(below, ref).item() == pytest.approx(-0.153, abs=1e-3)  # their bug
    assert per_token_kl(below, ref).item() == pytest.approx(math.exp(0.35) - 0.35 - 1, rel=1e-5)
    assert per_token_kl(below, ref).item() > 0

    # at policy == reference the KL and its gradient vanish; theirs pushes with gradient 1
    assert mx.grad(lambda x: mlx_lm_lora_kl(x, ref).sum())(ref).item() == pytest.approx(1.0)
    assert mx.grad(lambda x: per_token_kl(x, ref).sum())(ref).item() == 0.0
    assert per_token_kl(ref, ref).item() == 0.0


# ---------------------------------------------------------------- robustness and contracts


def test_junk_at_padding_does_not_leak(batch):
    logps, old, ref, adv, mask = batch
    junk_old = np.where(mask > 0, old, -1e4)  # exp(logp - old) would overflow to inf there
    junk_ref = np.where(mask > 0, ref, 1e4)
    clean = mlx_loss_fn(batch, beta=0.05, loss_type="grpo")
    junk = mlx_loss_fn([logps, junk_old, junk_ref, adv, mask], beta=0.05, loss_type="grpo")
    x = to_mx(logps)[0]
    assert junk(x)[0].item() == pytest.approx(clean(x)[0].item(), abs=1e-6)
    junk_grad = np.array(mx.grad(lambda v: junk(v)[0])(x))
    assert np.all(np.isfinite(junk_grad))
    np.testing.assert_allclose(junk_grad, np.array(mx.grad(lambda v: clean(v)[0])(x)), atol=1e-7)


def test_compiles_without_host_syncs(batch):
    f = mlx_loss_fn(batch, beta=0.05, loss_type="dapo")
    compiled = mx.compile(lambda x: f(x)[0])
    x = to_mx(batch[0])[0]
    assert compiled(x).item() == pytest.approx(f(x)[0].item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "ppo"}, "valid: grpo, bnpo, dr_grpo, dapo"),
        ({"importance_sampling_level": "none"}, "valid: token, sequence"),
        ({"loss_type": "dr_grpo", "max_completion_length": None}, "max_completion_length"),
        ({"beta": 0.1, "ref": None}, "ref_logps"),
    ],
)
def test_bad_arguments_raise_value_error(batch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mlx_loss_fn(batch, **kwargs)(to_mx(batch[0])[0])
