"""TensorBoard, W&B and evaluation during training (issue 13), checked against what they are not
written by: TensorBoard's own event reader, transformers' TensorBoard callback and TRL's
evaluation on the torch backend, W&B's offline run files read with W&B's own protobufs."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mlxrl.config import load_config  # noqa: E402
from mlxrl.mlx.train import train as mlx_train  # noqa: E402
from mlxrl.testing import capture_lines  # noqa: E402
from mlxrl.torch import train as torch_train  # noqa: E402
from mlxrl.torch import translate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
# One update at learning rate 0 (the first step of a linear warmup), then an evaluation: both
# backends evaluate the starting model (LoRA's B is zero), so their eval metrics must agree.
EVAL = ["--training.max_steps", "1", "--training.warmup_steps", "10", "--training.logging_steps", "1",
        "--training.save_steps", "0", "--training.eval_strategy", "steps", "--training.eval_steps", "1",
        "--training.per_device_eval_batch_size", "8"]
METHODS = {"sft": ("sft.yaml", "sft.jsonl"), "dpo": ("dpo.yaml", "preferences_heldout.jsonl")}
MLX_ONLY = {"train/update_time"}  # the MLX loop times the update apart from the batch


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard files, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = {Path(p).parent for p in glob.glob(str(run_dir / "runs" / "*" / "events.out.tfevents.*"))}
    assert len(folders) == 1, folders
    events = EventAccumulator(str(folders.pop()))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _train(method: str, backend: str, out: Path, *extra):
    config, validation = METHODS[method]
    cfg = load_config(ROOT / "configs/quickstart" / config, [
        *EVAL, "--training.output_dir", str(out), *extra,
        "--data.validation.datasets", f"[{{dataset_name: {DATA / validation}, sample_count: 16}}]"])
    with capture_lines() as lines:
        (mlx_train if backend == "mlx" else torch_train.train)(cfg, quiet=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return records, lines


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluation_during_training_matches_trl(tmp_path, method, monkeypatch):
    if method == "dpo":  # torch without a TensorBoard package: mlxrl's writer, and no note
        monkeypatch.setattr(translate, "tensorboard_by_transformers", lambda: False)
    runs = {b: _train(method, b, tmp_path / b) for b in ("mlx", "torch")}
    (mlx_records, mlx_lines), (torch_records, torch_lines) = runs["mlx"], runs["torch"]
    mlx_eval, torch_eval = ([r for r in records if "eval_loss" in r] for records in (mlx_records, torch_records))
    assert len(mlx_eval) == len(torch_eval) == 1 and mlx_eval[0]["step"] == torch_eval[0]["step"] == 1
    mlx_eval, torch_eval = mlx_eval[0], torch_eval[0]
    assert set(mlx_eval) <= set(torch_eval), set(mlx_eval) - set(torch_eval)  # TRL's names
    shared = [k for k in mlx_eval if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
    assert "eval_loss" in shared and (method == "sft" or "eval_rewards/accuracies" in shared)
    for key in shared:
        assert mlx_eval[key] == pytest.approx(torch_eval[key], abs=2e-4), key
    for lines in (mlx_lines, torch_lines):  # the evaluation's terminal line, on both backends
        assert any(x.startswith("eval step 1/1  eval_loss ") for x in lines), lines
    # TensorBoard: the same tags on both backends, at the same steps, with the jsonl's values
    mlx_board, torch_board = scalars(tmp_path / "mlx"), scalars(tmp_path / "torch")
    assert set(mlx_board) - MLX_ONLY <= set(torch_board), set(mlx_board) - set(torch_board)
    for tag in ("train/loss", "train/learning_rate", "eval/loss", "train/train_runtime"):
        assert [s for s, _ in mlx_board[tag]] == [s for s, _ in torch_board[tag]] == [1], tag
    assert mlx_board["eval/loss"][0][1] == pytest.approx(mlx_eval["eval_loss"], rel=1e-6)
    assert not any("enable_tensorboard" in x for x in mlx_lines + torch_lines)


def _grpo_config(out: Path):
    return load_config(ROOT / "configs/quickstart/grpo.yaml", [
        "--training.max_steps", "2", "--training.logging_steps", "1", "--training.save_steps", "0",
        "--training.grpo.max_completion_length", "8", "--training.grpo.log_completions", "true",
        "--training.eval_strategy", "steps", "--training.eval_steps", "2",
        "--training.output_dir", str(out),
        "--data.validation.datasets", f"[{{dataset_name: oumi-ai/oumi-letter-count, dataset_path: "
                                      f"{DATA / 'letter_count.jsonl'}, sample_count: 4}}]"])


def test_grpo_evaluates_on_validation_prompts_and_shows_samples(tmp_path):
    cfg = _grpo_config(tmp_path)
    with capture_lines() as lines:
        mlx_train(cfg, quiet=True)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evaluation] == [2]
    assert {"eval_reward", "eval_reward_std", "eval_rewards/letter_count/mean",
            "eval_completions/mean_length", "eval_runtime"} <= set(evaluation[0])
    steps = [x for x in lines if x.startswith("step ")]
    assert all(" rollout " in x and " update " in x for x in steps) and len(steps) == 2
    samples = [x for x in lines if x.startswith("  sample: ")]
    completions = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and "rewards: letter_count " in samples[0]
    assert completions[0]["completion"][:20].split()[0] in samples[0]
    assert scalars(tmp_path)["eval/reward"][0][0] == 2
    # TRL's GRPO evaluation logs every name the MLX one does (and eval_loss, which MLX does not)
    torch_train.train(_grpo_config(tmp_path / "torch"), quiet=True)
    torch_records = [json.loads(x) for x in (tmp_path / "torch" / "metrics.jsonl").read_text().splitlines()]
    torch_eval = [r for r in torch_records if "eval_reward" in r]
    assert [r["step"] for r in torch_eval] == [2]
    assert set(evaluation[0]) <= set(torch_eval[0]), set(evaluation[0]) - set(torch_eval[0])


WANDB_RECORDS = """
import glob, json, struct, sys
from wandb.proto import wandb_internal_pb2 as pb
data = open(glob.glob(sys.argv[1] + "/wandb/offline-run-*/run-*.wandb")[0], "rb").read()
out, pos, block, part = [], 7, 32768, b""   # LevelDB log records after W&B's 7-byte header
while pos + 7 <= len(data):
    if block - pos % block < 7:
        pos += block - pos % block
        continue
    _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
    part += data[pos + 7:pos + 7 + size]
    pos += 7 + size
    if kind in (1, 4):
        record = pb.Record()
        record.ParseFromString(part)
        part = b""
        which = record.WhichOneof("record_type")
        if which == "history":
            out.append(["history", {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.history.item}])
        elif which == "summary":
            out.append(["summary", {i.key or "/".join(i.nested_key): i.value_json
                                    for i in record.summary.update}])
        elif which == "run":
            out.append(["run", {"name": record.run.display_name, "project": record.run.project,
                                "config": [i.key for i in record.run.config.update]}])
print(json.dumps(out))
"""


def test_wandb_offline_run_has_the_metrics(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", "train", "--backend", "mlx", "-c",
                           "configs/quickstart/dpo.yaml", "--training.max_steps", "2",
                           "--training.logging_steps", "1", "--training.enable_wandb", "true",
                           "--training.run_name", "ux-check", "--training.output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    read = subprocess.run([sys.executable, "-c", WANDB_RECORDS, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    records = json.loads(read.stdout)
    run = next(r for kind, r in records if kind == "run")
    assert run["name"] == "ux-check" and run["project"] == "huggingface"
    history = [r for kind, r in records if kind == "history" and "train/loss" in r]
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/global_step"] for h in history] == [r["step"] for r in jsonl] == [1, 2]
    for h, r in zip(history, jsonl):
        assert h["train/loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert h["train/rewards/margins"] == pytest.approx(r["rewards/margins"], rel=1e-5)
    summary = {k for kind, r in records if kind == "summary" for k in r}
    assert {"train_runtime", "train_loss"} <= summary


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_wandb_without_a_login_is_one_line(tmp_path, backend):
    """No API key, no terminal to ask on: W&B's own refusal, as one line naming what to do."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"),
               WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", "train", "--backend", backend, "-c",
                           "configs/quickstart/dpo.yaml", "--training.max_steps", "1",
                           "--training.enable_wandb", "true", "--training.output_dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [x for x in proc.stderr.splitlines() if "Traceback" in x or x.startswith("error")], proc.stderr
    assert len(errors) == 1 and errors[0].startswith(
        "error: training.enable_wandb: W&B did not start (No API key configured."), proc.stderr
    assert "wandb login" in errors[0] and "WANDB_MODE=offline" in errors[0]
    assert not (tmp_path / "run" / "runs").exists()  # no TensorBoard folder for a run that never stepped
