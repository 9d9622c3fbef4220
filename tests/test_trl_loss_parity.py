"""Every DPO and GRPO loss option of TRL 1.16 on MLX, against TRL's own `_compute_loss`.

TRL's trainers are built without a model (`object.__new__`) and given only what `_compute_loss`
reads: a stand-in for the fused LM head returns the per-token log-probs we choose (zero where the
label is -100, as the real head does), and an accelerator of one process. Then TRL's own code
computes the loss, its gradient with respect to the per-token log-probs, and its metrics, which
mlxrl's MLX losses must reproduce on the same random inputs.
"""

import dataclasses
import math
import re
from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlxrl import loss_types
from mlxrl.config import DpoSettings
from mlxrl.mlx.dpo_loss import DPO_LOSSES, F_DIVERGENCES, completion_logps, settings_loss
from mlxrl.mlx.grpo_loss import GRPO_LOSS_TYPES, grpo_loss

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

SEEDS = (0, 1, 2)


class OneProcess:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def test_tables_hold_trl_names():
    """mlxrl's names are TRL 1.16's (read from its config classes' help), and MLX has each."""
    fields = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}
    dpo_help = fields["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", dpo_help)) == set(loss_types.DPO_LOSS_TYPES) == set(DPO_LOSSES)
    div_help = fields["f_divergence_type"].metadata["help"]
    assert set(re.findall(r"`(\w+_\w+)`", div_help.split(". Only")[0])) == set(F_DIVERGENCES)
    grpo_help = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}["loss_type"].metadata["help"]
    named = set(re.findall(r"'(\w+)'", grpo_help.split("Supported values are")[1].split(". ")[0]))
    assert named == set(loss_types.GRPO_LOSS_TYPES) == set(GRPO_LOSS_TYPES)


# ------------------------------------------------------------------------------------------ DPO


def dpo_batch(seed, pairs=4, length=12):
    """Prompts of 2-4 tokens, completions of 1..8 (so ld_alpha has tails), per-token log-probs."""
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    mask = np.zeros((rows, length), np.int64)
    for i in range(rows):
        start = rng.integers(2, 5)
        mask[i, start:start + rng.integers(1, 9)] = 1
    logps = -rng.gamma(2.0, 0.8, size=(rows, length - 1))
    ref = logps + rng.normal(0.0, 0.5, size=logps.shape)
    log_sum_sq = -rng.gamma(2.0, 0.5, size=logps.shape)
    return mask, logps.astype(np.float32), ref.astype(np.float32), log_sum_sq.astype(np.float32)


class FusedHead(torch.nn.Module):
    """What `model(..., labels=..., fused_lm_head=True)` returns, for given per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, logps, log_sum_sq):
        super().__init__()
        self.logps, self.log_sum_sq = logps, log_sum_sq

    def forward(self, input_ids, labels, **kwargs):
        valid = (labels[:, 1:] != -100).float()
        zeros = torch.zeros_like(self.log_sum_sq)
        return SimpleNamespace(log_probs=self.logps * valid, log_sum_sq_probs=self.log_sum_sq * valid,
                               entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(settings, mask, logps, ref, log_sum_sq):
    trainer = object.__new__(trl.DPOTrainer)
    policy_logps = torch.tensor(logps, requires_grad=True)  # float32: TRL's f-divergence clamps key on it
    policy = FusedHead(policy_logps, torch.tensor(log_sum_sq))
    names = [settings.loss_type] if isinstance(settings.loss_type, str) else list(settings.loss_type)
    trainer.__dict__.update(
        accelerator=OneProcess(), model=policy, aux_loss_enabled=False, precompute_ref_logps=False,
        ref_model=FusedHead(torch.tensor(ref), torch.zeros(ref.shape)),
        ld_alpha=settings.ld_alpha, f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef, beta=settings.beta,
        loss_types=names, loss_weights=settings.loss_weights or [1.0] * len(names),
        label_smoothing=settings.label_smoothing, use_weighting=settings.use_weighting,
        args=SimpleNamespace(discopop_tau=settings.discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ids = torch.zeros(mask.shape, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask)}
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy_logps, allow_unused=True)
    grad = np.zeros(logps.shape) if grad is None else grad.numpy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if "/" in k}
    return loss.item(), grad, metrics


def mlx_dpo(settings, mask, logps, ref, log_sum_sq):
    """The MLX loop's path: per-token log-probs -> sums -> settings_loss (DPOMethod.loss)."""
    mask_mx, ref_mx, lss = mx.array(mask), mx.array(ref), mx.array(log_sum_sq)
    ref_sums = completion_logps(ref_mx, mask_mx, settings.ld_alpha)

    def loss_of(token_logps):
        sums = completion_logps(token_logps, mask_mx, settings.ld_alpha)
        return settings_loss(settings, sums, ref_sums, mask_mx, token_logps, lss)

    (loss, metrics), grad = mx.value_and_grad(lambda x: loss_of(x))(mx.array(logps))
    return loss.item(), np.array(grad), {k: v.item() for k, v in metrics.items()}


def _dpo_cases():
    smoothing = {"robust": 0.1, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
    cases = [dict(loss_type=t, label_smoothing=smoothing.get(t, 0.0)) for t in loss_types.DPO_LOSS_TYPES]
    for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
        for t in sorted(loss_types.F_DIVERGENCE_LOSS_TYPES):
            cases.append(dict(loss_type=t, label_smoothing=smoothing.get(t, 0.0), f_divergence_type=divergence,
                              f_alpha_divergence_coef=0.3))
    cases += [
        dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
        dict(loss_type="ipo", ld_alpha=0.0, beta=0.5),
        dict(loss_type="sigmoid", use_weighting=True),
        dict(loss_type=["ipo", "nca_pair"], loss_weights=[0.5, 2.0], use_weighting=True, ld_alpha=0.3),
        dict(loss_type="sigmoid_norm", use_weighting=True, f_divergence_type="js_divergence"),
        dict(loss_type="discopop", discopop_tau=0.2, beta=0.3),
    ]
    return cases


DPO_CASES = _dpo_cases()


@pytest.mark.parametrize("case", DPO_CASES, ids=[str(sorted(c.items())) for c in DPO_CASES])
def test_dpo_matches_trl_compute_loss(case):
    settings = DpoSettings(**case)
    for seed in SEEDS:
        batch = dpo_batch(seed)
        trl_loss, trl_grad, trl_metrics = trl_dpo(settings, *batch)
        loss, grad, metrics = mlx_dpo(settings, *batch)
        assert loss == pytest.approx(trl_loss, rel=2e-5, abs=2e-6), seed
        np.testing.assert_allclose(grad, trl_grad, rtol=2e-4, atol=2e-6, err_msg=f"seed {seed}")
        assert trl_metrics.keys() >= metrics.keys()
        for name, value in metrics.items():
            assert value == pytest.approx(trl_metrics[name], rel=2e-5, abs=2e-5), (name, seed)


@pytest.mark.parametrize("loss_type", sorted(loss_types.TRL_WEIGHTING_FAILS))
def test_weighting_refused_at_load_where_trl_fails(loss_type):
    """WPO weighting of these losses crashes TRL 1.16 at the first step, so mlxrl refuses it."""
    settings = DpoSettings(loss_type="sigmoid", use_weighting=True)
    with pytest.raises(RuntimeError, match="inplace|memory location"):
        trl_dpo(_unchecked(settings, loss_type=["sigmoid", loss_type]), *dpo_batch(0))
    with pytest.raises(ValueError, match=f"use_weighting does not work with loss_type {loss_type}"):
        DpoSettings(loss_type=["sigmoid", loss_type], use_weighting=True)


def _unchecked(settings, **changes):
    """`settings` with `changes`, past DpoSettings' load-time check."""
    out = dataclasses.replace(settings)
    out.__dict__.update(changes)
    return out


# ----------------------------------------------------------------------------------------- GRPO

N, T, GRAD_ACCUM, MAX_LEN = 6, 7, 2, 9


def grpo_batch(seed):
    """Completions of different lengths (one empty), old != logps so ratios clip on both sides."""
    rng = np.random.default_rng(seed)
    logps = -rng.gamma(2.0, 0.7, size=(N, T))
    old = logps + rng.normal(0.0, 0.3, size=(N, 1)) + rng.normal(0.0, 0.2, size=(N, T))
    ref = logps + rng.normal(0.0, 0.4, size=(N, T))
    adv = rng.normal(0.0, 1.0, size=N)
    lengths = rng.permutation([7, 5, 3, 1, 6, 0])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return [x.astype(np.float32) for x in (logps, old, ref, adv, mask)]


def trl_grpo(options, logps, old, ref, adv, mask):
    trainer = object.__new__(trl.GRPOTrainer)
    policy = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (policy, torch.zeros_like(policy), None)
    eps_high = options.get("epsilon_high")
    trainer.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=options["beta"],
        importance_sampling_level=options["importance_sampling_level"], loss_type=options["loss_type"],
        epsilon_low=0.2, epsilon_high=0.2 if eps_high is None else eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=GRAD_ACCUM, max_completion_length=MAX_LEN,
        accelerator=OneProcess(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=options.get("use_bias_correction_kl", False),
                             delta=options.get("delta"), steps_per_generation=GRAD_ACCUM,
                             sapo_temperature_neg=1.05, sapo_temperature_pos=1.0, vespo_k_pos=2.0,
                             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0))
    f64 = {"dtype": torch.float64}
    inputs = {"prompt_ids": torch.zeros((N, 2), dtype=torch.long), "prompt_mask": torch.ones((N, 2)),
              "completion_ids": torch.zeros((N, T), dtype=torch.long),
              "completion_mask": torch.tensor(mask, **f64), "advantages": torch.tensor(adv, **f64),
              "old_per_token_logps": torch.tensor(old, **f64), "ref_per_token_logps": torch.tensor(ref, **f64),
              "num_items_in_batch": torch.tensor(float(mask.sum() * GRAD_ACCUM))}
    loss = trainer._compute_loss(None, inputs)
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "entropy"}
    return loss.item(), grad.numpy(), metrics


def mlx_grpo(options, logps, old, ref, adv, mask):
    logps, old, ref, adv, mask = (mx.array(x) for x in (logps, old, ref, adv, mask))
    kwargs = dict(options, max_completion_length=MAX_LEN, grad_accum=GRAD_ACCUM,
                  num_items_in_batch=mask.sum() * GRAD_ACCUM)
    (loss, metrics), grad = mx.value_and_grad(lambda x: grpo_loss(x, old, ref, adv, mask, **kwargs))(logps)
    return loss.item(), np.array(grad), {k: v.item() for k, v in metrics.items()}


GRPO_CASES = [
    dict(loss_type=t, importance_sampling_level=level, beta=beta, **extra)
    for t in loss_types.GRPO_LOSS_TYPES
    for level in loss_types.IMPORTANCE_SAMPLING_LEVELS
    for beta, extra in ((0.0, {}), (0.05, {"use_bias_correction_kl": True}), (0.05, {"delta": 1.1, "epsilon_high": 0.28}))
] + [dict(loss_type="cispo", importance_sampling_level="token", beta=0.0, epsilon_high=1.1)]


@pytest.mark.parametrize("options", GRPO_CASES, ids=[str(sorted(c.items())) for c in GRPO_CASES])
def test_grpo_matches_trl_compute_loss(options):
    for seed in SEEDS:
        batch = grpo_batch(seed)
        trl_loss, trl_grad, trl_metrics = trl_grpo(options, *batch)
        loss, grad, metrics = mlx_grpo(options, *batch)
        assert loss == pytest.approx(trl_loss, rel=2e-5, abs=2e-6), seed
        np.testing.assert_allclose(grad, trl_grad, rtol=2e-4, atol=2e-6, err_msg=f"seed {seed}")
        assert metrics.keys() == trl_metrics.keys()
        for name, value in trl_metrics.items():
            if math.isnan(value):
                assert math.isnan(metrics[name]), (name, seed)
            else:
                assert metrics[name] == pytest.approx(value, rel=2e-5, abs=2e-6), (name, seed)
