"""GRPO on MLX end to end, and one test for each GRPO bug of mlx-lm-lora (reference/mlx-peers.md)."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxrl.config import load_config
from mlxrl.data.loading import load_split
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.grpo import GRPOMethod
from mlxrl.mlx.logprobs import per_token_logps
from mlxrl.mlx.train import train

ROOT = Path(__file__).resolve().parents[1]
LETTERS = ROOT / "configs/quickstart/data/letter_count.jsonl"

REWARD_FILE = '''
SEEN = []

def digit_fraction(prompts, completions, completion_ids, **kwargs):
    """Fraction of characters that are digits: something a random tiny model can learn fast."""
    SEEN.append([list(ids) for ids in completion_ids])
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def grpo_config(out, reward, *extra):
    return load_config(ROOT / "configs/quickstart/grpo.yaml", [
        "--data.train.datasets[0].dataset_path", str(LETTERS), "--training.output_dir", str(out),
        "--training.reward_functions", f"['{reward}']", *extra])


def method_for(cfg):
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    return loaded, GRPOMethod(cfg, loaded, load_split(cfg.data.train))


def test_logprobs_condition_on_the_prompt_and_ids_are_kept_as_sampled(tmp_path, reward_file):
    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction")
    loaded, method = method_for(cfg)
    batch = method.next_step()
    sampled = method.rewards.fns[0].__globals__["SEEN"][-1]  # what the reward function was given
    G = method.settings.num_generations
    for ids, mask, *_ in batch.micro_batches:
        # each prompt once for its G completions (mlx/shared_prefix.py): prefix + suffix rows
        prefix, pad, row_prefix, suffix = (np.array(a) for a in ids)
        assert len(prefix) * G == len(suffix) and row_prefix.tolist() == np.repeat(np.arange(len(prefix)), G).tolist()
        for row, row_mask, p in zip(suffix, np.array(mask), row_prefix):
            assert row_mask[0] == 0 and row_mask[1:].any()
            completion = row[row_mask.astype(bool)].tolist()
            assert completion in sampled  # the exact sampled ids, never re-tokenised text
            prompt = prefix[p, pad[p]:].tolist() + [int(row[0])]
            assert prompt in method.prompt_ids and len(prompt) > 10  # the prompt precedes the completion
    # scoring with the prompt differs from scoring the completion alone (the peer's bug)
    ids = batch.micro_batches[0][0]
    with_prompt = per_token_logps(loaded.model, ids)[0, :4]
    alone = per_token_logps(loaded.model, ids[3][:1])[0, :4]
    assert mx.abs(with_prompt - alone).max().item() > 1e-3
    assert len(sampled) == G * method.prompts_per_step


@pytest.mark.parametrize("options", ["{beta: 0.1}", "{beta: 0.04, loss_type: dr_grpo, num_iterations: 2}"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_prompt_rows_give_the_plain_loss_and_gradients(tmp_path, reward_file, monkeypatch, options,
                                                             packed):
    """The G completions of a prompt with the prompt run once (mlx/shared_prefix.py), right-padded
    or packed, against the same rollout as plain right-padded rows: reference log-probs, loss,
    metrics and gradients."""
    from mlx.utils import tree_flatten

    from mlxrl.mlx import grpo, shared_prefix
    from mlxrl.mlx.grpo_reuse import _from_json, _to_json

    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction", "--training.trainer_kwargs", options)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    for _, layer in loaded.model.named_modules():  # a policy off the reference
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(3)) * 0.3
    monkeypatch.setattr(shared_prefix, "worth_packing", lambda *a: packed)
    shared = grpo.GRPOMethod(cfg, loaded, load_split(cfg.data.train)).next_step().micro_batches[0]
    monkeypatch.setattr(shared_prefix, "worth_sharing", lambda *a: False)
    plain = grpo.GRPOMethod(cfg, loaded, load_split(cfg.data.train)).next_step().micro_batches[0]
    assert isinstance(shared[0], tuple) and not isinstance(plain[0], tuple)
    assert len(shared[0]) == (10 if packed else 4)
    restored = _from_json(json.loads(json.dumps(_to_json(grpo.StepBatch([shared]))))).micro_batches[0]
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(restored[0], shared[0]))

    def flat(ids, mask, per_token):  # each row's completion tokens, in order
        m = np.array(mask[:, 1:]).astype(bool)
        return np.array(per_token)[m]

    method = grpo.GRPOMethod(cfg, loaded, load_split(cfg.data.train))
    results = []
    for arrays in (plain, shared):
        assert np.abs(flat(*arrays[:2], arrays[3])).max() > 0  # beta != 0: a reference was computed
        (loss, metrics), grads = nn.value_and_grad(loaded.model, method.loss)(*arrays)
        results.append((flat(*arrays[:2], arrays[3]), float(loss), {k: float(v) for k, v in metrics.items()},
                        dict(tree_flatten(grads))))
    (ref_a, loss_a, metrics_a, grads_a), (ref_b, loss_b, metrics_b, grads_b) = results
    assert np.abs(ref_a - ref_b).max() < 1e-4 and abs(loss_a - loss_b) < 1e-5
    assert abs(metrics_a["kl"]) > 1e-6 and metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        assert abs(metrics_a[k] - metrics_b[k]) < 1e-4 * max(1.0, abs(metrics_a[k])), k
    scale = max(np.abs(np.array(g)).max() for g in grads_a.values())
    for k, g in grads_a.items():
        assert np.abs(np.array(g) - np.array(grads_b[k])).max() < 1e-5 * scale, k


def test_the_body_never_reads_the_last_column(tmp_path, reward_file, monkeypatch):
    """Completions cut at max_completion_length (16, a multiple of 8): a shared row's suffix is
    the prompt's last token and 16 tokens, 17 columns, and the body runs 16 of them (padding the
    suffix to 24 ran 24). Shared or plain, the body never reads a row's last column, which is only
    a target (`trainer.row_width`), and runs a multiple of 8 columns."""
    from mlxrl.mlx import shared_prefix

    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction", "--training.grpo.max_completion_length", "16")
    loaded, method = method_for(cfg)
    method.eos_ids = [10**6]  # never sampled: every completion is 16 tokens
    shared = method.next_step().micro_batches[0]
    monkeypatch.setattr(shared_prefix, "worth_sharing", lambda *a: False)
    plain = method.next_step().micro_batches[0]
    assert isinstance(shared[0], tuple) and shared[0][3].shape[1] == 17
    width = plain[0].shape[1]
    assert (width - 1) % 8 == 0 and width - 1 < max(map(len, method.prompt_ids)) + 16 + 8

    body_type, widths = type(loaded.model.model), []
    original = body_type.__call__

    def recording(self, inputs, *args, **kwargs):
        widths.append(inputs.shape[1])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(body_type, "__call__", recording)
    mx.eval(method.loss(*shared)[0])
    assert widths == [shared[0][0].shape[1], 16]  # the prompts once, then the suffixes
    mx.eval(method.loss(*plain)[0])
    assert widths[2:] == [width - 1]


def test_eos_stays_in_the_completion(tmp_path, reward_file):
    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction", "--training.grpo.max_completion_length", "64")
    loaded, method = method_for(cfg)
    from mlxrl.mlx.sampling import sample

    prompts = [method.prompt_ids[0]]
    # make EOS the likeliest token so rows finish: greedy decoding with EOS boosted via the bias
    head = loaded.model.lm_head if hasattr(loaded.model, "lm_head") else loaded.model.model.embed_tokens
    eos = method.eos_ids[0]
    weight = np.array(head.weight)
    weight[eos] *= 25.0
    head.weight = mx.array(weight)
    rollout = sample(loaded.model, prompts, num_generations=4, max_tokens=64, temperature=1.0,
                     eos_token_ids=method.eos_ids, seed=0)
    finished = np.asarray(rollout.finished)
    assert finished.any()
    for i in np.flatnonzero(finished):
        n = int(rollout.lengths[i])
        assert rollout.tokens[i, n - 1] == eos  # EOS is part of the completion (and of the loss mask)


def test_ratio_is_against_the_sampling_policy_and_kl_is_k3(tmp_path, reward_file):
    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction", "--training.trainer_kwargs", "{beta: 0.1}")
    loaded, method = method_for(cfg)
    # move the adapter away from zero so policy != reference
    for _, layer in loaded.model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    batch = method.next_step()
    ids, mask, adv, ref, num_items = batch.micro_batches[0]
    loss, metrics = method.loss(ids, mask, adv, ref, num_items)
    # ratio against pi_old = stop_gradient(pi): no token is clipped even though pi != reference
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    assert float(metrics["kl"]) > 0.0  # k3 against the adapter-off model, never negative
    m = np.array(mask[:, 1:], dtype=np.float64)
    assert isinstance(ids, tuple)  # each prompt once (mlx/shared_prefix.py); masks on its suffixes
    logps = np.array(per_token_logps(loaded.model, ids, method.settings.temperature))
    d = np.array(ref) - logps
    k3 = (np.exp(d) - d - 1) * m
    expected = (-(np.array(adv)[:, None]) * m + 0.1 * k3).sum() / float(num_items)
    assert abs(float(loss) - expected) < 1e-4


def test_grpo_learns_a_reward_the_tiny_model_can_reach(tmp_path, reward_file):
    cfg = grpo_config(tmp_path, f"{reward_file}:digit_fraction", "--training.max_steps", "40",
                      "--training.learning_rate", "2e-2", "--training.logging_steps", "1",
                      "--training.grpo.max_completion_length", "8", "--training.save_steps", "0")
    train(cfg, quiet=True)
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean(rewards[:8]), np.mean(rewards[-8:])
    # measured here: first 8 steps 0.002, last 8 steps 1.0 (digits take over the completions)
    assert last > first + 0.15, (first, last)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for name in ("reward", "reward_std", "rewards/digit_fraction/mean", "rewards/digit_fraction/std",
                 "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                 "clip_ratio/region_mean", "rollout_tokens_per_second"):
        assert name in logged, name
    assert (tmp_path / "completions.jsonl").is_file()


@pytest.mark.slow  # all 30 steps; tests/test_walkthrough.py runs this config through the CLI in CI
def test_walkthrough_grpo_config_runs_to_the_end(tmp_path):
    """`mlxrl train -c configs/examples/learn_grpo_laptop.yaml` with a tiny model and local data."""
    cmd = [sys.executable, "-m", "mlxrl.cli", "train", "--backend", "mlx", "-c", "configs/examples/learn_grpo_laptop.yaml",
           "--model.model_name", "tiny://qwen2",
           "--data.train.datasets[0].dataset_path", str(LETTERS),
           "--training.output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert any(x.startswith("note: training.grpo.use_vllm") and "MLX has no vLLM" in x
               for x in proc.stderr.splitlines())
    for folder in (tmp_path / "checkpoint-15", tmp_path / "checkpoint-30", tmp_path):
        assert (folder / "model.safetensors").is_file(), folder  # no use_peft: a full fine-tune
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(3, 31, 3))
    assert "rewards/count_letters/mean" in logged[-1]
