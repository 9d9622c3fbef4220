"""Every bad input in docs/errors.md gets one line naming the problem and where, no traceback."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "configs/quickstart/dpo.yaml")
GRPO = str(ROOT / "configs/quickstart/grpo.yaml")
PAIRS = ROOT / "configs/quickstart/data/preferences.jsonl"
LETTERS = ROOT / "configs/quickstart/data/letter_count.jsonl"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _no_template_model(tmp: Path) -> str:
    import shutil

    from mlxrl.testing import tiny_model

    folder = tmp / "no_template"
    shutil.copytree(tiny_model("qwen2"), folder)
    for name in ("chat_template.jinja",):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def _raising_reward(tmp: Path) -> str:
    return _write(tmp / "bad_reward.py", "def boom(completions, **kw):\n    raise ValueError('oops')\n") + ":boom"


def _not_utf8(tmp: Path) -> str:
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                       b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    return str(tmp / "latin1.jsonl")


def _huge_row(tmp: Path) -> str:
    row = {"prompt": "a", "chosen": "word " * (11 * 2**20 // 5), "rejected": "c"}
    return _write(tmp / "huge.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + json.dumps(row) + "\n")


def _copy_of_tiny(tmp: Path, drop: tuple[str, ...]) -> Path:
    import shutil

    from mlxrl.testing import tiny_model

    folder = tmp / "model"
    shutil.copytree(tiny_model("qwen2"), folder)
    for pattern in drop:
        for path in folder.glob(pattern):
            path.unlink()
    return folder


def _pickled_model(tmp: Path) -> str:
    """The tiny model with its weights only as a pickle that would create a file when loaded."""
    import pickle

    folder = _copy_of_tiny(tmp, ("*.safetensors",))

    class Bomb:
        def __reduce__(self):
            return (Path.mkdir, (tmp / "unpickled",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    return str(folder)


def _peft_folder(tmp: Path) -> str:
    """A (zero) PEFT LoRA adapter on the tiny model."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "tiny://qwen2", "r": 8, "lora_alpha": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 64), np.float32)},
              str(folder / "adapter_model.safetensors"))
    return str(folder)


INF = "float('inf')"


def _reward_returning(tmp: Path, value: str) -> str:
    return _write(tmp / "r.py", f"def r(completions, **kw):\n    return [{value}] * len(completions)\n") + ":r"


# id -> (config, extra args given tmp, substring of the one-line message)
CASES = {
    "unknown-key": (DPO, lambda t: ["--training.lerning_rate", "1"], "did you mean 'training.learning_rate'"),
    "wrong-type": (DPO, lambda t: ["--training.max_steps", "ten"], "training.max_steps must be an integer"),
    "unknown-trainer": (DPO, lambda t: ["--training.trainer_type", "TRL_PPO"], "trainer_type 'TRL_PPO' is not supported"),
    "missing-config": ("missing.yaml", lambda t: [], "config file not found: missing.yaml"),
    "missing-data-file": (DPO, lambda t: ["--data.train.datasets[0].dataset_name", "nope.jsonl"], "nope.jsonl"),
    "malformed-jsonl": (DPO, lambda t: ["--data.train.datasets[0].dataset_name",
                                        _write(t / "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')],
                        "bad.jsonl:2"),
    "missing-field": (DPO, lambda t: ["--data.train.datasets[0].dataset_name",
                                      _write(t / "nochosen.jsonl", '{"prompt": "a", "rejected": "c"}\n')], "chosen"),
    "empty-field": (DPO, lambda t: ["--data.train.datasets[0].dataset_name",
                                    _write(t / "empty.jsonl", '{"prompt": "a", "chosen": "", "rejected": "c"}\n')], "chosen"),
    "empty-dataset": (DPO, lambda t: ["--data.train.datasets[0].dataset_name", str(PAIRS),
                                      "--data.train.datasets[0].split", "train[:0]"], "selects no rows"),
    "prompt-too-long": (DPO, lambda t: ["--model.model_max_length", "8"], "no preference pairs left"),
    "no-chat-template": (DPO, lambda t: ["--model.model_name", _no_template_model(t)], "no chat template"),
    "hub-offline": (DPO, lambda t: ["--model.model_name", "nobody/not-a-cached-model"], "not in the local Hugging Face cache"),
    "unknown-reward": (GRPO, lambda t: ["--data.train.datasets[0].dataset_path", str(LETTERS),
                                        "--training.reward_functions", "[count_leters]"], "count_leters"),
    "raising-reward": (GRPO, lambda t: ["--data.train.datasets[0].dataset_path", str(LETTERS),
                                        "--training.reward_functions", f"['{_raising_reward(t)}']"], "boom"),
    "num-generations": (GRPO, lambda t: ["--training.grpo.num_generations", "1"], "at least 2"),
    "generations-batch": (GRPO, lambda t: ["--training.grpo.num_generations", "3"], "multiple of grpo.num_generations"),
    "out-of-range": (DPO, lambda t: ["--training.learning_rate", "-1e-4"], "learning_rate must be at least 0"),
    "grpo-temperature-zero": (GRPO, lambda t: ["--training.grpo.temperature", "0"], "temperature must be above 0"),
    "not-utf8": (DPO, lambda t: ["--data.train.datasets[0].dataset_name", _not_utf8(t)], "latin1.jsonl:2: not UTF-8"),
    "row-too-long": (DPO, lambda t: ["--data.train.datasets[0].dataset_name", _huge_row(t)],
                     "huge.jsonl:2: the row is 11.0 MB"),
    "pickled-weights": (DPO, lambda t: ["--model.model_name", _pickled_model(t)], "pytorch_model.bin"),
    "no-tokenizer": (DPO, lambda t: ["--model.model_name", str(_copy_of_tiny(t, ("tokenizer*", "vocab*", "merges*")))],
                     "has no tokenizer files"),
    "infinite-reward": (GRPO, lambda t: ["--data.train.datasets[0].dataset_path", str(LETTERS), "--training.max_steps", "1",
                                         "--training.reward_functions", f"['{_reward_returning(t, INF)}']"],
                        "returned inf at index 0; rewards must be finite"),
    "unknown-chat-template": (DPO, lambda t: ["--model.chat_template", "qwen2-instruckt"], "not a known template name"),
    "pad-token": (DPO, lambda t: ["--model.tokenizer_pad_token", "<pad>"], "'<pad>' is not a token"),
    "collator": (DPO, lambda t: ["--data.train.collator_name", "text_only"], "collator_name 'text_only' is not one of"),
    "freeze-everything": (DPO, lambda t: ["--model.freeze_layers", "[model]"], "freezes every trainable parameter"),
    "lr-scheduler": (DPO, lambda t: ["--training.lr_scheduler_type", "reduce_lr_on_plateau"], "is not supported"),
    "loss-option": (DPO, lambda t: ["--training.trainer_kwargs", "{loss_type: [sigmoid, hinge], use_weighting: true}"],
                    "use_weighting does not work with loss_type hinge"),
    "eval-without-validation": (DPO, lambda t: ["--training.eval_strategy", "steps"],
                                "evaluates on data.validation, which names no dataset"),
    "grpo-eval-batch": (GRPO, lambda t: ["--training.eval_strategy", "steps", "--training.per_device_eval_batch_size", "6",
                                         "--data.validation.datasets", f"[{{dataset_path: {LETTERS}}}]"],
                        "per_device_eval_batch_size (6) to be a multiple of grpo.num_generations (4)"),
    "full-finetune-adapter": (DPO, lambda t: ["--training.use_peft", "false", "--model.model_name", _peft_folder(t)],
                              "is an adapter: merge it into its base first (`mlxrl fuse"),
    "full-finetune-qlora": (DPO, lambda t: ["--training.use_peft", "false", "--peft.q_lora", "true"],
                            "peft.q_lora: a quantized base trains only through an adapter"),
}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line(case, backend, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, extra, needle = CASES[case]
    args = ["train", "--backend", backend, "-c", config, "--training.output_dir", str(tmp_path / "out"), *extra(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unpickled").exists()  # no pickle was loaded
    # Nothing left by a run that stopped before its first step, not even the TensorBoard folder
    # TRL opens at train start (a reward returning inf or raising fails inside step 1).
    assert not (tmp_path / "out").exists()


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs/errors.md").read_text()
    ids = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M))
    tested_elsewhere = {  # test_resume.py, test_run_folder.py, test_faults.py, and MLX's alone (above)
        "unfinished-run", "finished-run", "run-in-progress", "another-run", "other-backend", "changed-settings",
        "damaged-checkpoint", "output-dir-not-a-folder", "output-dir-not-writable", "disk-full", "non-finite",
        "interrupted", "pickle-checkpoint", "chosen-equals-rejected", "damaged-adapter", "pickled-adapter",
        "output-not-empty", "output-write-failed", "import-other-base", "max-new-tokens", "nan-reward",
        "hub-misspelled", "shared-output-file", "infer-out-of-range",
        "refused-setting", "untrained-arch", "task-import", "ambiguous-format", "wandb-no-login",
        "rope-unsupported", "real-model-missing",  # test_model_config.py, test_real_model.py
        "gguf-unsupported", "gguf-dora"}  # test_gguf.py
    assert ids == set(CASES) | tested_elsewhere
