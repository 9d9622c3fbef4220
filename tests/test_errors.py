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
    "unknown-chat-template": (DPO, lambda t: ["--model.chat_template", "qwen2-instruckt"], "not a known template name"),
    "pad-token": (DPO, lambda t: ["--model.tokenizer_pad_token", "<pad>"], "'<pad>' is not a token"),
    "collator": (DPO, lambda t: ["--data.train.collator_name", "text_only"], "collator_name 'text_only' is not one of"),
    "freeze-everything": (DPO, lambda t: ["--model.freeze_layers", "[model]"], "freezes every trainable parameter"),
}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line(case, backend, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, extra, needle = CASES[case]
    args = ["train", "--backend", backend, "-c", config, "--training.output_dir", str(tmp_path / "out"), "--quiet", *extra(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs/errors.md").read_text()
    ids = set(re.findall(r"^\| `([a-z-]+)` \|", doc, re.M))
    tested_elsewhere = {"output-dir-in-use", "disk-full", "non-finite", "interrupted", "pickle-checkpoint",
                        "refused-setting", "untrained-arch", "task-import", "ambiguous-format",
                        "rope-unsupported", "real-model-missing"}  # test_model_config, test_real_model
    assert ids == set(CASES) | tested_elsewhere
