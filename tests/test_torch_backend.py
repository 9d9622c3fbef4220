"""The PyTorch/TRL backend against the MLX one: same tokens, same first-step DPO loss and GRPO loss
from the same LoRA weights, the example configs run to the end on both with the same layout, and
the CLI's backend choice and notes."""

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from mlxrl.config import load_config  # noqa: E402
from mlxrl.data.formats import encode_prompt  # noqa: E402
from mlxrl.data.loading import load_split  # noqa: E402
from mlxrl.mlx import model as mlx_model  # noqa: E402
from mlxrl.mlx.dpo import encode_pairs, pair_arrays, policy_loss, reference_logps  # noqa: E402
from mlxrl.mlx.grpo import grpo_loss  # noqa: E402
from mlxrl.mlx.logprobs import per_token_logps  # noqa: E402
from mlxrl.testing import capture_lines  # noqa: E402
from mlxrl.torch import train as torch_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
QUIET = dict(quiet=True)


def quickstart(method, out, *extra):
    return load_config(ROOT / f"configs/quickstart/{method}.yaml",
                       ["--training.output_dir", str(out), *extra])


def copy_lora(peft_model, mlx_loaded, seed=0, scale=0.5):
    """Random LoRA A and non-zero B in PEFT, copied into MLX: lora_a = A.T, lora_b = B.T."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in module.lora_A):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=gen) * scale / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=gen) * scale / math.sqrt(b.shape[1]))
        key = name.split("base_model.model.", 1)[-1]
        updates += [(f"{key}.lora_a", mx.array(a.detach().T.numpy())),
                    (f"{key}.lora_b", mx.array(b.detach().T.numpy()))]
    lora_keys = {k for k, _ in tree_flatten(mlx_loaded.model.trainable_parameters())}
    assert {k for k, _ in updates} == lora_keys  # the same layers carry LoRA on both sides
    mlx_loaded.model.load_weights(updates, strict=False)
    mx.eval(mlx_loaded.model.parameters())


def test_same_lora_targets_and_prompt_tokens(tmp_path):
    cfg = quickstart("grpo", tmp_path)
    trainer, loaded, _ = torch_train.build(cfg, **QUIET)
    mlx_loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    copy_lora(trainer.model, mlx_loaded)  # asserts the LoRA layer sets match
    rows = [dict(r) for r in load_split(cfg.data.train).select(range(3))]
    theirs, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    assert [list(t) for t in theirs] == [encode_prompt(r, mlx_loaded.tokenizer) for r in rows]


@pytest.mark.parametrize("trainer_kwargs", [
    "{beta: 0.1, loss_type: sigmoid}",
    "{loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5], ld_alpha: 0.5}",  # RPO, LD-DPO
    "{loss_type: ipo, use_weighting: true, f_divergence_type: alpha_divergence}",  # WPO, f-DPO
])
def test_first_dpo_step_loss_and_rewards_match_mlx(tmp_path, monkeypatch, trainer_kwargs):
    cfg = quickstart("dpo", tmp_path, "--training.per_device_train_batch_size", "4",
                     "--training.trainer_kwargs", trainer_kwargs)
    trainer, _, _ = torch_train.build(cfg, **QUIET)
    mlx_loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    copy_lora(trainer.model, mlx_loaded, seed=1)

    settings = cfg.dpo_settings()
    pairs = encode_pairs(load_split(cfg.data.train), mlx_loaded.tokenizer, settings.max_length)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer._metrics["train"].clear()
    trainer.model.train()
    torch_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False).detach()
    torch_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # MLX: plain rows, and the rows as training makes them (each prompt once, mlx/shared_prefix.py),
    # the suffixes right-padded and packed
    from mlxrl.mlx import shared_prefix

    plain = pair_arrays(pairs[:4])
    monkeypatch.setattr(shared_prefix, "worth_packing", lambda *a: False)
    shared = pair_arrays(pairs[:4], mlx_loaded.model)
    monkeypatch.setattr(shared_prefix, "worth_packing", lambda *a: True)
    packed = pair_arrays(pairs[:4], mlx_loaded.model)
    assert len(shared[0]) == 4 and len(packed[0]) == 10
    assert batch["input_ids"].tolist() == [r[:batch["input_ids"].shape[1]] for r in np.array(plain[0]).tolist()]
    for ids, mask, _ in (plain, shared, packed):
        ref = reference_logps(mlx_loaded.model, ids, mask, ld_alpha=settings.ld_alpha)
        mlx_loss, mlx_metrics = policy_loss(mlx_loaded.model, settings, ids, mask, ref)
        assert abs(float(mlx_metrics["rewards/margins"])) > 1e-3  # the policy differs from the reference
        assert abs(float(mlx_loss) - float(torch_loss)) < 1e-4
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert abs(float(mlx_metrics[name]) - torch_metrics[name]) < 1e-4, name
        for name in ("logps/chosen", "logps/rejected"):  # sums over ~60 tokens: relative tolerance
            assert abs(float(mlx_metrics[name]) - torch_metrics[name]) < 1e-4 * abs(torch_metrics[name]), name


def test_sft_loss_matches_mlx(tmp_path):
    from mlxrl.data.formats import encode_sft
    from mlxrl.mlx.sft import sft_loss

    cfg = quickstart("sft", tmp_path, "--model.model_max_length", "256")
    trainer, _, _ = torch_train.build(cfg, **QUIET)
    mlx_loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    copy_lora(trainer.model, mlx_loaded, seed=4)
    rows = [encode_sft(r, mlx_loaded.tokenizer) for r in load_split(cfg.data.train).select(range(4))]
    width = max(len(r["input_ids"]) for r in rows)
    ids = mx.array([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mask = mx.array([r["completion_mask"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mlx_loss = float(sft_loss(per_token_logps(mlx_loaded.model, ids), mask[:, 1:]))
    by_ids = {tuple(r["input_ids"]): r for r in trainer.train_dataset}  # TRL shuffles nothing, but be sure
    batch = trainer.data_collator([by_ids[tuple(r["input_ids"])] for r in rows])
    trainer.model.train()
    torch_loss = float(trainer.compute_loss(trainer.model, batch).detach())
    assert abs(mlx_loss - torch_loss) < 1e-4, (mlx_loss, torch_loss)


def _fixed_rollouts(tokenizer, rows, G, seed=0):
    """Prompt ids, completions (some ending at EOS, some cut), rewards: fixed, not sampled."""
    rng = np.random.default_rng(seed)
    prompts = [encode_prompt(r, tokenizer) for r in rows for _ in range(G)]
    completions = []
    for i in range(len(prompts)):
        ids = rng.integers(3, 700, size=int(rng.integers(3, 11))).tolist()
        completions.append(ids + [2] if i % 3 else ids)  # 2 = <|im_end|>
    rewards = rng.normal(size=len(prompts)).astype(np.float32)
    return prompts, completions, rewards


def _mlx_grpo(loaded, prompts, completions, old_noise, advantages, settings, **options):
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = mx.array([r + [0] * (width - len(r)) for r in rows])
    mask = mx.array([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
                     for p, c in zip(prompts, completions)], dtype=mx.float32)[:, 1:]
    logps = per_token_logps(loaded.model, ids, settings.temperature)
    with mlx_model.adapters_disabled(loaded.model):
        ref = per_token_logps(loaded.model, ids, settings.temperature)
    old = np.zeros(mask.shape, np.float32)  # the sampling policy's log-probs: policy + noise
    for i, (p, c) in enumerate(zip(prompts, completions)):
        old[i, len(p) - 1:len(p) - 1 + len(c)] = np.array(logps[i, len(p) - 1:len(p) - 1 + len(c)]) + old_noise[i, :len(c)]
    loss, metrics = grpo_loss(logps, mx.array(old), ref, mx.array(advantages), mask, beta=settings.beta,
                              epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
                              max_completion_length=settings.max_completion_length,
                              num_items_in_batch=mask.sum(),
                              use_bias_correction_kl=settings.use_bias_correction_kl, **options)
    return float(loss), {k: float(v) for k, v in metrics.items()}, old


def _torch_inputs(prompts, completions, old, advantages):
    P, C = max(map(len, prompts)), max(map(len, completions))
    def left(r, n):
        return [0] * (n - len(r)) + r
    def right(r, n):
        return r + [0] * (n - len(r))
    old_rows = [right(old[i, len(p) - 1:len(p) - 1 + len(c)].tolist(), C)
                for i, (p, c) in enumerate(zip(prompts, completions))]
    mask = torch.tensor([right([1] * len(c), C) for c in completions])
    return {"prompt_ids": torch.tensor([left(p, P) for p in prompts]),
            "prompt_mask": torch.tensor([left([1] * len(p), P) for p in prompts]),
            "completion_ids": torch.tensor([right(c, C) for c in completions]),
            "completion_mask": mask, "advantages": torch.tensor(advantages),
            "old_per_token_logps": torch.tensor(old_rows), "num_items_in_batch": mask.sum().float()}


def test_grpo_loss_on_fixed_rollouts_matches_mlx(tmp_path):
    from mlxrl.mlx.grpo import group_advantages

    cfg = quickstart("grpo", tmp_path, "--training.grpo.temperature", "0.7",
                     "--training.trainer_kwargs", "{beta: 0.04, epsilon_high: 0.28}")
    settings = cfg.grpo_settings()
    trainer, _, _ = torch_train.build(cfg, **QUIET)
    mlx_loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    copy_lora(trainer.model, mlx_loaded, seed=2, scale=0.15)
    rows = [dict(r) for r in load_split(cfg.data.train).select(range(2))]
    prompts, completions, rewards = _fixed_rollouts(mlx_loaded.tokenizer, rows, settings.num_generations)
    advantages = group_advantages(rewards, settings.num_generations, settings.scale_rewards)
    noise = np.random.default_rng(3).normal(scale=0.3, size=(len(prompts), 16)).astype(np.float32)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    clipped = []
    for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("bnpo", "token"),
                            ("dr_grpo", "sequence"), ("dapo", "sequence"), ("cispo", "token"),
                            ("sapo", "token"), ("vespo", "token"), ("luspo", "sequence")):
        mlx_loss, mlx_metrics, old = _mlx_grpo(mlx_loaded, prompts, completions, noise, advantages,
                                               settings, loss_type=loss_type, importance_sampling_level=level)
        inputs = _torch_inputs(prompts, completions, old, advantages)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad(), trainer.model.disable_adapter():
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, inputs["completion_ids"].shape[1])[0]
        trainer.loss_type, trainer.importance_sampling_level = loss_type, level
        trainer._metrics["train"].clear()
        torch_loss = float(trainer._compute_loss(trainer.model, inputs).detach())
        torch_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert abs(mlx_loss - torch_loss) < 1e-4, (loss_type, level, mlx_loss, torch_loss)
        assert set(mlx_metrics) == set(torch_metrics) - {"entropy"}, loss_type
        for name in mlx_metrics:
            assert abs(mlx_metrics[name] - torch_metrics[name]) < 1e-4, (loss_type, level, name)
        clipped.append(mlx_metrics.get("clip_ratio/region_mean", 0.0))
    assert max(clipped) > 0  # the sampling-policy noise makes the clip bite


# --------------------------------------------------------------------------- end to end, both backends

SHORT = ["--training.max_steps", "2", "--training.save_steps", "1", "--training.logging_steps", "1"]
TINY = ["--model.model_name", "tiny://qwen2"]
RUNS = {
    "sft": ("configs/quickstart/sft.yaml", SHORT),
    "dpo": ("configs/quickstart/dpo.yaml", SHORT),
    "grpo": ("configs/quickstart/grpo.yaml", [*SHORT, "--training.grpo.max_completion_length", "8"]),
    "learn_dpo": ("configs/examples/learn_dpo_laptop.yaml", [
        *TINY, *SHORT, "--data.train.datasets[0].dataset_name", str(DATA / "preferences.jsonl")]),
    "learn_grpo": ("configs/examples/learn_grpo_laptop.yaml", [
        *TINY, *SHORT, "--training.grpo.max_completion_length", "8",
        "--data.train.datasets[0].dataset_path", str(DATA / "letter_count.jsonl")]),
}
# mlxrl's files, by backend: the adapter format differs (mlx-lm vs PEFT), the layout does not;
# a full fine-tune (learn_grpo sets no use_peft: Oumi's false) writes the same model files on both
ADAPTER = {"mlx": "adapters.safetensors", "torch": "adapter_model.safetensors"}
CONTRACT = ("adapter_config.json", "trainer_state.json", "metrics.jsonl", "completions.jsonl",
            "config.json", "generation_config.json")


def _layout(out: Path, backend: str) -> set[str]:
    names = {ADAPTER[backend]: "ADAPTER", "model.safetensors": "ADAPTER", **{n: n for n in CONTRACT}}
    return {str(p.relative_to(out).with_name(names[p.name])) for p in out.rglob("*") if p.name in names}


def _run(name, backend, out):
    from mlxrl.mlx.train import train as mlx_train

    path, extra = RUNS[name]
    cfg = load_config(ROOT / path, ["--training.output_dir", str(out / backend), *extra])
    run = mlx_train if backend == "mlx" else torch_train.train
    with capture_lines() as lines:
        state = run(cfg, quiet=True)
    return state, lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {(name, backend): (*_run(name, backend, out / name), out / name / backend)
            for name in RUNS for backend in ("mlx", "torch")}


@pytest.mark.parametrize("name", list(RUNS))
def test_both_backends_run_the_example_configs_to_the_end(runs, name):
    (mlx_state, _, mlx_out), (torch_state, _, torch_out) = runs[name, "mlx"], runs[name, "torch"]
    assert mlx_state["global_step"] == torch_state["global_step"] == 2
    layout = _layout(mlx_out, "mlx")
    assert {"ADAPTER", "checkpoint-1/ADAPTER", "checkpoint-2/ADAPTER", "metrics.jsonl"} <= layout
    assert _layout(torch_out, "torch") == layout
    mlx_lines, torch_lines = ([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                              for out in (mlx_out, torch_out))
    assert [r["step"] for r in mlx_lines] == [r["step"] for r in torch_lines] == [1, 2]
    # the MLX loop times every update apart from its batch; both time GRPO's rollout apart
    missing = set(mlx_lines[-1]) - set(torch_lines[-1]) - ({"update_time"} if "grpo" not in name else set())
    assert not missing, f"torch metrics.jsonl lacks {sorted(missing)}"
    if "grpo" in name:
        for r in torch_lines:
            assert r["rollout_time"] > 0 and r["rollout_tokens_per_second"] > 0
            assert r["rollout_time"] + r["update_time"] == pytest.approx(r["step_time"], rel=1e-4)  # jsonl rounds
        steps = [x for x in runs[name, "torch"][1] if x.startswith("step ")]
        assert len(steps) == 2 and all(re.search(r"  rollout \S+ \(\d+ tok/s\)  update \S+  ", x)
                                       for x in steps), steps


def test_both_backends_log_completions_alike(runs):
    """One writer (metrics_log.log_completions): the same fields and steps on both backends."""
    mlx_rows, torch_rows = ([json.loads(x) for x in (runs["grpo", b][2] / "completions.jsonl").read_text().splitlines()]
                            for b in ("mlx", "torch"))
    assert mlx_rows and len(mlx_rows) == len(torch_rows)
    assert {tuple(sorted(r)) for r in mlx_rows + torch_rows} == {("completion", "prompt", "rewards", "step")}
    assert sorted({r["step"] for r in mlx_rows}) == sorted({r["step"] for r in torch_rows}) == [1, 2]
    assert all(isinstance(r["completion"], str) and set(r["rewards"]) == {"letter_count"}
               for r in mlx_rows + torch_rows)


def test_torch_notes_what_it_cannot_honour_in_one_line(runs):
    _, dpo_lines, _ = runs["learn_dpo", "torch"]
    _, grpo_lines, _ = runs["learn_grpo", "torch"]
    assert len([x for x in dpo_lines if "peft.q_lora" in x]) == 1, dpo_lines
    assert len([x for x in grpo_lines if "training.grpo.use_vllm" in x]) == 1, grpo_lines
    assert not any("use_peft" in x for x in grpo_lines)  # not set there: Oumi's false, a full fine-tune
    assert not any("note:" in x and "q_lora" in x for x in grpo_lines)


def test_torch_adapter_is_a_peft_adapter_of_the_run(runs):
    _, _, out = runs["learn_dpo", "torch"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["self_attn.k_proj", "self_attn.o_proj",
                                                "self_attn.q_proj", "self_attn.v_proj"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["method"] == "dpo" and state["backend"] == "torch"


# --------------------------------------------------------------------------- CLI: backend choice


def _cli(*args):
    from mlxrl.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_backend_flags_force_a_backend_and_auto_picks_mlx_without_a_gpu(tmp_path, monkeypatch):
    one_step = ["-c", str(ROOT / "configs/quickstart/dpo.yaml"), "--training.max_steps", "1",
                "--training.save_steps", "0"]
    forced = _cli("train", "--backend", "torch", *one_step, "--training.output_dir", str(tmp_path / "torch"))
    assert forced.exit_code == 0, forced.output
    assert "backend: torch (--backend torch)" in forced.stderr and "on torch" in forced.stderr
    assert (tmp_path / "torch" / ADAPTER["torch"]).is_file()
    monkeypatch.delenv("MLXRL_BACKEND", raising=False)
    auto = _cli("train", *one_step, "--training.output_dir", str(tmp_path / "auto"))
    assert auto.exit_code == 0, auto.output
    # this machine: Linux, torch installed, no GPU: MLX, and the header says why
    assert "backend: MLX (--backend auto: no GPU for torch" in auto.stderr and "on MLX" in auto.stderr
    assert (tmp_path / "auto" / ADAPTER["mlx"]).is_file()


def test_auto_backend_rules(monkeypatch):
    import mlxrl.torch as backend
    from mlxrl.cli import pick_backend
    from mlxrl.errors import MlxrlError

    monkeypatch.delenv("MLXRL_BACKEND", raising=False)
    import torch  # the installed build: CPU only here, so auto must not pick it

    assert backend._torch_build()["cuda"] == torch.version.cuda
    assert pick_backend("auto") == ("torch" if backend.gpu_for_torch() else "mlx")
    assert f"backend auto  -> {pick_backend('auto')} (" in _cli("env").output
    monkeypatch.setattr(backend, "_torch_build", lambda: {"cuda": "12.8", "hip": None})
    monkeypatch.setattr(backend.Path, "glob", lambda self, pattern: iter([Path("/dev/nvidia0")]))
    assert pick_backend("auto", explain=True) == ("torch", "--backend auto: CUDA 12.8 build of torch, NVIDIA GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pick_backend("auto") == "mlx"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(backend, "missing_packages", lambda: ["trl"])
    backend_name, why = pick_backend("auto", explain=True)
    assert backend_name == "mlx" and "trl" in why
    with pytest.raises(MlxrlError, match="needs trl"):
        pick_backend("torch")
    monkeypatch.setattr(backend, "apple_silicon", lambda: True)
    monkeypatch.setattr(backend, "missing_packages", lambda: [])
    assert pick_backend("auto", explain=True) == ("mlx", "--backend auto: Apple Silicon: MLX runs on its GPU")
    assert pick_backend("mlx") == "mlx" and pick_backend("torch") == "torch"
    monkeypatch.setenv("MLXRL_BACKEND", "torch")
    assert pick_backend("auto", explain=True) == ("torch", "MLXRL_BACKEND=torch")
    assert pick_backend("mlx") == "mlx"  # --backend mlx always forces MLX


def test_gpu_check_script_runs_its_first_run_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh is what a GPU machine runs and CI never does: its dry run on the CPU
    keeps it calling the torch backend as it is (it once passed a removed keyword to train())."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, GPU_CHECK_ON_CPU="1", GPU_CHECK_ONLY="dpo quickstart", STEPS="2",
               PYTHON=sys.executable, MLXRL_CACHE=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"^OK   dpo quickstart fp32 +2 steps", proc.stdout, re.M), proc.stdout
    assert "1 passed, 0 failed" in proc.stdout
