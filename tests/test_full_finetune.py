"""Full fine-tuning (`training.use_peft: false`) through the CLI: every weight trains, the output
and checkpoints are Hugging Face folders that transformers and mlx-lm load with mlxrl's logits,
DPO's reference is the starting model, GRPO's KL is against a frozen copy, a SIGKILL + --resume
gives the same weights, and the torch backend (TRL) trains the same weights from the same config.
(With LoRA the base weights do not move: tests/test_train_mlx.py::test_only_lora_parameters_change;
the one-line refusals are rows of docs/errors.md, tests/test_errors.py.)"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_resume import run_until

from mlxrl.config import ModelParams
from mlxrl.mlx import model as mlx_model
from mlxrl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
SFT, DPO, GRPO = (str(ROOT / f"configs/quickstart/{m}.yaml") for m in ("sft", "dpo", "grpo"))
FULL = ["--training.use_peft", "false"]
BASE = tiny_model("qwen2")
DIGITS = '''
def digit_fraction(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]
'''


def train(config, out, *extra, backend="mlx", check=True):
    cmd = [sys.executable, "-m", "mlxrl.cli", "train", "--backend", backend, "-c", config,
           "--training.output_dir", str(out), *extra]  # not --quiet: the header is checked
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def weights(folder) -> dict[str, np.ndarray]:
    return load_file(str(Path(folder) / "model.safetensors"))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def base_parameter_count() -> int:
    return sum(v.size for v in weights(BASE).values())


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_full")
    proc = train(SFT, out, *FULL, "--training.max_steps", "20", "--training.save_steps", "10",
                 "--training.logging_steps", "5", "--training.learning_rate", "1e-3")
    return out, proc.stderr


def test_sft_trains_every_weight_and_the_loss_falls(sft_full):
    out, stderr = sft_full
    n = base_parameter_count()
    assert f"{n:,} trainable of {n:,} parameters" in stderr
    assert f"model in {out}" in stderr
    losses = [r["loss"] for r in metrics(out)]
    assert losses[-1] < losses[0] - 1.0, losses  # measured: 6.9 -> 3.6
    base, trained = weights(BASE), weights(out)
    assert trained.keys() == base.keys()  # transformers' names: tied lm_head left out, as in the base
    unchanged = [k for k in base if np.array_equal(base[k], trained[k])]
    assert not unchanged, unchanged
    assert all(trained[k].dtype == base[k].dtype == np.float32 for k in base)


@pytest.mark.parametrize("folder", ["", "checkpoint-10"])
def test_saved_folder_loads_in_transformers_and_mlx_lm_with_mlxrls_logits(sft_full, folder):
    import torch
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sft_full[0] / folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "trainer_state.json", "mlxrl_run.json"):
        assert (path / name).is_file(), name
    assert (path / "optimizer.safetensors").is_file() == bool(folder)  # checkpoints only
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2

    tok, base_tok = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(BASE)
    chat = [{"role": "user", "content": "How many 'r's are in 'strawberry'?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == base_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(mlx_model.load(ModelParams(model_name=str(path))).model(mx.array([ids]))[0])
    stock = np.array(mlx_lm_load(str(path))[0](mx.array([ids]))[0])
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(stock - expected).max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(base(torch.tensor([ids])).logits[0].numpy() - expected).max() > 1e-2


def test_infer_and_compare_take_the_folder_and_its_checkpoints(sft_full, tmp_path):
    from click.testing import CliRunner

    from mlxrl.cli import main

    out = sft_full[0]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "How many 'l's are in 'hello'?"}) + "\n")
    result = CliRunner().invoke(main, ["infer", "--model.model_name", str(out / "checkpoint-10"),
                                       "--input_path", str(src), "--output_path", str(dst),
                                       "--generation.max_new_tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(dst.read_text())["response"]
    result = CliRunner().invoke(main, ["compare", "tiny://qwen2", str(out), "--prompt", "hello",
                                       "--generation.max_new_tokens", "4", "--output", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert f"[B] {out}:" in result.output


def test_dpo_reference_is_the_starting_model_and_frozen_layers_get_no_gradient(tmp_path):
    out = tmp_path / "dpo"
    proc = train(DPO, out, *FULL, "--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl"),
                 "--model.freeze_layers", "[model.layers.0]", "--training.max_steps", "12",
                 "--training.logging_steps", "1", "--training.save_steps", "0",
                 "--training.learning_rate", "1e-3")
    base, trained = weights(BASE), weights(out)
    frozen = [k for k in base if k.startswith("model.layers.0.")]
    assert frozen and all(np.array_equal(base[k], trained[k]) for k in frozen)
    moved = [k for k in base if k not in frozen]
    assert all(not np.array_equal(base[k], trained[k]) for k in moved)
    n, n_frozen = base_parameter_count(), sum(base[k].size for k in frozen)
    assert f"{n - n_frozen:,} trainable of {n:,} parameters" in proc.stderr
    logged = metrics(out)
    # step 1: the precomputed reference is the policy itself (same weights, same forward)
    assert abs(logged[0]["loss"] - math.log(2)) < 1e-5 and abs(logged[0]["rewards/margins"]) < 1e-4
    # at step 1 the margins are rounding noise (|margin| < 1e-4), so its accuracy is the sign of
    # that noise (0.125 or 0.5 measured, by how the rows were batched): learning is the later 1.0
    last = np.mean([r["rewards/accuracies"] for r in logged[-4:]])
    assert last >= 0.9, [r["rewards/accuracies"] for r in logged]  # measured: 1.0

    # mlxrl eval: the reference of a full fine-tune is the model its run started from
    held_out = tmp_path / "pairs.jsonl"
    held_out.write_text("".join((DATA / "preferences_heldout.jsonl").read_text().splitlines(True)[:4]))
    eval_out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "mlxrl.cli", "eval", "--model.model_name", str(out), "--task", "preference",
           "--dataset", str(held_out), "--output", str(eval_out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((eval_out / "eval_results.json").read_text())["tasks"]["preference"]
    assert got["mean_reward_margin"] == pytest.approx(_margin_by_transformers(out, held_out), abs=1e-3)
    assert got["mean_reward_margin"] > 1.0 and "no adapter" not in proc.stderr


def _margin_by_transformers(policy_path, pairs_file, beta=0.1) -> float:
    """DPO's mean reward margin, policy vs the base, from transformers' forwards: string pairs
    are TRL's standard format (plain text, the EOS token appended)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (policy_path, BASE)]

    def logp(model, prompt, answer):
        ids, head = tok(prompt + answer + tok.eos_token)["input_ids"], tok(prompt)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        return float(sum(logits[t - 1, ids[t]] for t in range(start, len(ids))))

    margins = []
    for row in map(json.loads, Path(pairs_file).read_text().splitlines()):
        c = [logp(m, row["prompt"], row["chosen"]) for m in models]
        r = [logp(m, row["prompt"], row["rejected"]) for m in models]
        margins.append(beta * ((c[0] - c[1]) - (r[0] - r[1])))
    return float(np.mean(margins))


def test_grpo_with_kl_learns_against_a_frozen_copy_of_the_start(tmp_path):
    (tmp_path / "digits.py").write_text(DIGITS)
    out = tmp_path / "grpo"
    train(GRPO, out, *FULL, "--training.reward_functions", f"['{tmp_path / 'digits.py'}:digit_fraction']",
          "--training.trainer_kwargs", "{beta: 0.1}", "--training.max_steps", "30",
          "--training.learning_rate", "2e-3", "--training.logging_steps", "1",
          "--training.grpo.max_completion_length", "8", "--training.save_steps", "0")
    logged = metrics(out)
    rewards = [r["reward"] for r in logged]
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.15, rewards  # measured: 0.00 -> 0.72
    # the KL is against the starting weights: 0 while the policy is them, then it grows
    assert logged[0]["kl"] == 0.0 and min(r["kl"] for r in logged[-8:]) > 0.1
    base, trained = weights(BASE), weights(out)
    assert all(not np.array_equal(base[k], trained[k]) for k in base)


def _dpo_cmd(out, backend="mlx", *extra):
    return [sys.executable, "-m", "mlxrl.cli", "train", "--backend", backend, "-c", DPO, *FULL,
            "--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl"),
            "--training.output_dir", str(out), "--training.max_steps", "8", "--training.save_steps", "4",
            "--training.learning_rate", "1e-3", *extra]  # not --quiet: "resumed from" is checked


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_sigkill_then_resume_gives_the_same_weights(backend, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    subprocess.run(_dpo_cmd(straight, backend), cwd=ROOT, check=True, capture_output=True, timeout=600)
    # killed as soon as checkpoint-4's staging folder appears (mid-save, or just after it)
    run_until(_dpo_cmd(out, backend), out,
               lambda o: (o / ".tmp-checkpoint-4").exists() or (o / "checkpoint-4").exists())
    if not (out / "checkpoint-4" / "trainer_state.json").is_file():  # killed mid-save: start over
        run_until(_dpo_cmd(out, backend, "--resume"), out, lambda o: (o / "checkpoint-4").is_dir())
    proc = subprocess.run(_dpo_cmd(out, backend, "--resume"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    tol = 0.0 if backend == "mlx" else 1e-6  # MLX: bit for bit
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= tol
    assert not list(out.glob(".tmp-*"))


def test_torch_backend_trains_the_same_weights_from_the_same_config(tmp_path):
    """Full-batch SGD (4 pairs, batch 4: both backends see the same pairs at every step, and SGD
    moves each weight by lr x its gradient, so the weights compare element by element)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((DATA / "preferences.jsonl").read_text().splitlines(True)[:4]))
    args = [*FULL, "--data.train.datasets[0].dataset_name", str(pairs), "--training.max_steps", "3",
            "--training.save_steps", "0", "--training.logging_steps", "1", "--training.optimizer", "sgd",
            "--training.learning_rate", "0.5", "--training.lr_scheduler_type", "constant",
            "--training.warmup_steps", "0"]
    outs = {b: tmp_path / b for b in ("mlx", "torch")}
    for backend, out in outs.items():
        proc = train(DPO, out, *args, backend=backend)
        assert f"model in {out}" in proc.stderr
    mlx_w, torch_w, base = weights(outs["mlx"]), weights(outs["torch"]), weights(BASE)
    assert mlx_w.keys() == torch_w.keys() == base.keys()
    assert max(np.abs(mlx_w[k] - torch_w[k]).max() for k in base) < 1e-5  # measured: 1.2e-7
    assert min(np.abs(mlx_w[k] - base[k]).max() for k in base) > 1e-4  # every tensor moved (9e-4 and up)
    mlx_log, torch_log = metrics(outs["mlx"]), metrics(outs["torch"])
    for a, b in zip(mlx_log, torch_log, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-3
    assert mlx_log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # both references: the start


@pytest.mark.slow
def test_torch_reference_is_the_start_also_for_fresh_weights(tmp_path):
    """TRL loads a full fine-tune's reference from the policy's path (the pretrained weights);
    with load_pretrained_weights: false mlxrl gives it the policy's starting weights."""
    (tmp_path / "digits.py").write_text(DIGITS)
    out = tmp_path / "grpo"
    train(GRPO, out, *FULL, "--model.load_pretrained_weights", "false", "--training.max_steps", "2",
          "--training.reward_functions", f"['{tmp_path / 'digits.py'}:digit_fraction']",
          "--training.trainer_kwargs", "{beta: 0.1}", "--training.logging_steps", "1",
          "--training.grpo.max_completion_length", "8", "--training.save_steps", "0", backend="torch")
    assert metrics(out)[0]["kl"] == 0.0


def test_a_model_stored_quantized_is_refused(tmp_path):
    import mlx.nn as nn
    from mlx_lm.utils import load_model, save_config, save_model

    model, config = load_model(BASE)
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path / "q4"
    save_model(folder, model)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, folder / "config.json")
    for f in BASE.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    with pytest.raises(Exception, match="is stored quantized"):
        mlx_model.load(ModelParams(model_name=str(folder)), for_training=True, full=True)
