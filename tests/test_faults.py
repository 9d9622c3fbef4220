"""Faults outside training's run folder, through the real CLI: damaged or pickled adapters in
every command that reads one, export/import/fuse outputs written whole or not at all, infer's
limits, rewards that return NaN or inf, a misspelled hub id."""

import json
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "configs/quickstart/dpo.yaml")
GRPO = str(ROOT / "configs/quickstart/grpo.yaml")
PAIRS = str(ROOT / "configs/quickstart/data/preferences.jsonl")
LETTERS = str(ROOT / "configs/quickstart/data/letter_count.jsonl")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An MLX run (checkpoint-2 and the final adapter) and its PEFT export."""
    root = tmp_path_factory.mktemp("trained")
    result = run("train", "--backend", "mlx", "-c", DPO, "--data.train.datasets[0].dataset_name", PAIRS,
                 "--training.output_dir", root / "run", "--training.max_steps", "2", "--training.save_steps",
                 "2")
    assert result.exit_code == 0, result.output
    assert run("export", root / "run", "-o", root / "peft").exit_code == 0
    return root


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


DAMAGE = {
    "truncated-weights": lambda f, w: (f / w).write_bytes((f / w).read_bytes()[:100]),
    "only-config": lambda f, w: [p.unlink() for p in f.iterdir() if p.name != "adapter_config.json"],
    "garbled-config": lambda f, w: (f / "adapter_config.json").write_text('{"lora_param'),
}
COMMANDS = {
    "infer": lambda ckpt, tmp: ["infer", "--model.model_name", ckpt, "--input_path", _prompts(tmp)],
    "eval": lambda ckpt, tmp: ["eval", "--model.model_name", ckpt, "--num-samples", "2"],
    "compare": lambda ckpt, tmp: ["compare", ckpt, "tiny://qwen2", "--prompt", "hi"],
    "export": lambda ckpt, tmp: ["export", ckpt, "-o", tmp / "out"],
    "fuse": lambda ckpt, tmp: ["fuse", ckpt, "-o", tmp / "out"],
    "import": lambda ckpt, tmp: ["import", ckpt, "-o", tmp / "out"],
}


def _prompts(tmp: Path) -> str:
    path = tmp / "in.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    return str(path)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_adapter_is_one_line_in_every_command(trained, kind, command, tmp_path):
    """MLX checkpoints for the commands that read them; a PEFT folder (what a torch run writes)
    for import."""
    peft = command == "import"
    folder = _copy(trained / ("peft" if peft else "run/checkpoint-2"), tmp_path / "ckpt")
    DAMAGE[kind](folder, "adapter_model.safetensors" if peft else "adapters.safetensors")
    line = error_line(run(*COMMANDS[command](folder, tmp_path)))
    named = {"truncated-weights": "safetensors: truncated", "only-config": "safetensors: missing",
             "garbled-config": "adapter_config.json"}[kind]
    assert named in line, line
    assert not (tmp_path / "out").exists()


def _pickle_bomb(path: Path, marker: Path) -> None:
    """A pickle that creates `marker` when unpickled."""
    class Bomb:
        def __reduce__(self):
            return (Path.mkdir, (marker,))

    path.write_bytes(pickle.dumps(Bomb()))


def test_pickled_adapter_weights_are_never_read(trained, tmp_path):
    folder = _copy(trained / "peft", tmp_path / "peft")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    _pickle_bomb(folder / "adapter_model.bin", marker)
    for args in (["infer", "--model.model_name", folder, "--input_path", _prompts(tmp_path)],
                 ["import", folder, "-o", tmp_path / "out"],
                 ["train", "--backend", "torch", "-c", DPO, "--model.model_name", folder,
                  "--data.train.datasets[0].dataset_name", PAIRS, "--training.output_dir", tmp_path / "run",
                  "--quiet"]):
        assert "adapter_model.bin" in error_line(run(*args))
    assert not marker.exists()


def test_export_and_fuse_need_overwrite_for_a_folder_in_use(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "is not empty; pass --overwrite" in error_line(run("export", trained / "run", "-o", out))
    (out / "dequantized_base").mkdir()  # what an export of a QLoRA adapter wrote before
    result = run("export", trained / "run", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "note: " in result.stderr and "notes.txt" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "notes.txt"]
    assert "is not empty" in error_line(run("fuse", trained / "run", "-o", out))


def test_ctrl_c_or_a_full_disk_during_fuse_leaves_the_output_as_it_was(trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run("fuse", trained / "run", "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import mlxrl.adapters

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlxrl.adapters, "_copy_tokenizer", interrupted)  # after the weights are written
    result = run("fuse", trained / "run", "-o", out, "--overwrite")
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    def small_files():  # the file-size limit makes MLX's own writer fail, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", "fuse", str(trained / "run"), "-o", str(out),
                           "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=small_files)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"could not write {out}" in lines[0] and "was left as it was" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_import_refuses_a_base_of_another_architecture(trained, tmp_path):
    line = error_line(run("import", trained / "peft", "-o", tmp_path / "out", "--base", "tiny://llama"))
    assert "is another model (model_type qwen2 vs llama)" in line
    line = error_line(run("import", trained / "peft", "-o", tmp_path / "out", "--base",
                          "tiny://qwen2?hidden_size=128"))
    assert "hidden_size 64 vs 128" in line
    assert not (tmp_path / "out").exists()


def test_infer_caps_max_new_tokens_at_the_context(tmp_path):
    """1e8 new tokens ran for 300 s in 1.4 GB; the context is model.model_max_length here (the
    config's max_position_embeddings when it is not set)."""
    out = tmp_path / "out.jsonl"
    result = run("infer", "--model.model_name", "tiny://qwen2", "--model.model_max_length", "40",
                 "--generation.max_new_tokens", "100000000", "--input_path", _prompts(tmp_path),
                 "--output_path", out)
    assert result.exit_code == 0, result.output
    assert "max_new_tokens 100000000 is more than the model's context of 40 tokens" in result.stderr
    from transformers import AutoTokenizer

    from mlxrl.testing import tiny_model

    reply = json.loads(out.read_text())["response"]
    assert len(AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))(reply)["input_ids"]) <= 40


@pytest.mark.parametrize("bad", [["--generation.max_new_tokens", "-1"], ["--generation.temperature", "-0.5"],
                                 ["--generation.top_p", "0"]])
def test_infer_refuses_generation_settings_out_of_range(bad, tmp_path):
    line = error_line(run("infer", "--model.model_name", "tiny://qwen2", "--input_path", _prompts(tmp_path), *bad))
    assert f"override {bad[0][2:]}: generation: {bad[0].split('.')[-1]} must be" in line


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_nan_reward_is_missing_for_that_row(backend, tmp_path):
    """NaN is TRL's 'no reward': the other function's reward stands and the step trains."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text("import math\n"
                       "def half_nan(completions, **kw):\n"
                       "    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]\n")
    result = run("train", "--backend", backend, "-c", GRPO, "--data.train.datasets[0].dataset_path", LETTERS,
                 "--training.output_dir", tmp_path / "run", "--training.max_steps", "1",
                 "--training.reward_functions", f"[count_letters, '{rewards}:half_nan']",
                 "--training.grpo.max_completion_length", "8", "--training.logging_steps", "1")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert record["rewards/half_nan/mean"] == 1.0
    assert np.isfinite(record["reward"]) and np.isfinite(record["loss"])


def test_a_misspelled_hub_id_names_the_cached_one(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "blobs").mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = error_line(run("infer", "--model.model_name", "HuggingFaceTB/SmolLM2-135M-Instrct",
                          "--input_path", _prompts(tmp_path)))
    assert "did you mean 'HuggingFaceTB/SmolLM2-135M-Instruct' (in the cache)?" in line


@pytest.mark.slow
def test_two_evals_writing_one_folder_leave_one_whole_result(tmp_path):
    cmd = [sys.executable, "-m", "mlxrl.cli", "eval", "--model.model_name", "tiny://qwen2", "--output", str(tmp_path),
           "--generation.max_new_tokens", "4"]
    procs = [subprocess.Popen(cmd + ["--num-samples", str(n)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in (40, 41)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    result = json.loads((tmp_path / "eval_results.json").read_text())
    assert result["tasks"]["letter_count"]["num_samples"] in (40, 41)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json", "letter_count_samples.jsonl"]


def test_the_safetensors_check_agrees_with_the_safetensors_library(trained, tmp_path):
    """Cut at every kind of place (in the length, the header, the data, at the end), a file is
    called damaged exactly when safetensors itself cannot load it."""
    from safetensors.numpy import load_file

    from mlxrl.integrity import safetensors_problem

    data = (trained / "run/adapters.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for size in (0, 5, 8, 100, header - 1, header, header + 1, len(data) // 2, len(data) - 1, len(data)):
        path = tmp_path / f"cut{size}.safetensors"
        path.write_bytes(data[:size])
        try:
            load_file(str(path))
            loads = True
        except Exception:  # noqa: BLE001 - any failure of the reference loader
            loads = False
        assert (safetensors_problem(path) is None) == loads, (size, safetensors_problem(path))


def test_texts_cut_before_templating_give_the_same_tokens(tmp_path):
    """A long answer cut to `char_limit` characters encodes, after keep_start truncation, to the
    ids that transformers gives for the whole text."""
    from transformers import AutoTokenizer

    from mlxrl.data.formats import Truncation, encode_preference
    from mlxrl.testing import tiny_model

    tok = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))
    words = np.random.default_rng(0).choice(["alpha", "be", "gamma,", "d\u00e9j\u00e0", "42", "\n", "  "], 60_000)
    row = {"prompt": "Say a lot.", "chosen": "".join(words), "rejected": "No."}
    whole = Truncation(64).preference(encode_preference(row, tok))
    truncation = Truncation(64)
    cut = truncation.preference(encode_preference(truncation.cut(row, tok), tok))
    assert cut == whole and len(whole["chosen_ids"]) + len(whole["prompt_ids"]) == 64
