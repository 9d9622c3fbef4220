"""Every command of docs/walkthrough.md, in order, on tiny models and local data.

The commands are read from the page's ```bash blocks, so the page cannot drift from what runs.
Each gets the overrides CI needs (no network): hub models become embedded tiny models, hub
datasets local copies, long runs shorter (QLoRA off, shorter GRPO answers, fewer eval rows);
`mlxrl train` runs with `--backend mlx` (the Mac path the page describes; on Linux `auto` would
pick torch, which has its own tests). Each must exit 0 and leave what the page says it leaves.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxrl.cli import main
from mlxrl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
PREFS, LETTERS = str(DATA / "preferences.jsonl"), str(DATA / "letter_count.jsonl")
MODELS = {"tiiuae/Falcon-H1-0.5B-Instruct": "tiny://llama", "Qwen/Qwen2-0.5B-Instruct": "tiny://qwen2"}
SHORTER = {"test[:100]": "test[:8]", "--num-samples 100": "--num-samples 8",
           "train[-100:]": "train[-16:]"}
GEN = ["--generation.max_new_tokens", "8"]
CHAT = "Explain quantum computing to a 5-year-old\n/quit\n"


def walkthrough_commands() -> list[str]:
    """The commands of the page's bash blocks: continuations joined, comments dropped, a
    heredoc kept whole."""
    text = (ROOT / "docs/walkthrough.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            while line.endswith("\\"):
                line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            if "<<'EOF'" in line:
                end = lines.index("EOF", i)
                line, i = "\n".join([line, *lines[i:end], "EOF"]), end + 1
            commands.append(line)
    return commands


def plan(command: str) -> tuple[list[str] | str, str | None]:
    """(argv for `mlxrl`, or a shell script; stdin) with CI's overrides; KeyError if unknown."""
    if "<<'EOF'" in command or command.startswith("python"):
        return command, None
    for old, new in {**MODELS, **SHORTER}.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == "mlxrl", command
    head = " ".join(argv[1:3])
    extra, stdin = [], None
    if head == "data inspect":
        extra = ["--dataset_path", PREFS if "DPO" in argv[3] else LETTERS]
    elif head == "train -c":
        dpo = "learn_dpo" in argv[3]
        extra = ["--backend", "mlx", "--model.model_name",
                 "tiny://llama" if dpo else "tiny://qwen2",
                 "--data.train.datasets[0].dataset_path", PREFS if dpo else LETTERS]
        # QLoRA's quantized matmuls are slow on MLX's CPU backend; test_train_mlx covers QLoRA
        extra += ["--peft.q_lora", "false"] if dpo else ["--training.grpo.max_completion_length", "16"]
    elif argv[1] == "infer":
        extra, stdin = GEN, CHAT
    elif argv[1] in ("eval", "compare"):
        extra = GEN + (["--dataset-path", LETTERS] if "letter-count-clean" in command else [])
        extra += ["--dataset-path", PREFS] if "Human-Like" in command else []
    elif argv[1] == "quickstart":
        extra = ["--scale", "0.05"]
    elif argv[1] not in ("env", "plot", "fuse", "export") and head != "data make":
        raise KeyError(command)
    return argv[1:] + extra, stdin


def run(command: str, cwd: Path) -> str:
    todo, stdin = plan(command)
    if isinstance(todo, str):  # python scripts and heredocs run in a shell, on this interpreter
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        script = todo.replace("python examples/test_both_models.py",
                              "python examples/test_both_models.py --max-new-tokens 8")
        proc = subprocess.run(["bash", "-c", script.replace("python ", f"{sys.executable} ", 1)],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr
    result = CliRunner().invoke(main, todo, input=stdin)
    assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    return result.output


def test_every_command_has_a_plan():
    commands = walkthrough_commands()
    assert len(commands) >= 18
    for command in commands:
        plan(command)  # raises for a command the test does not know how to run offline


def check(command: str, out: str, cwd: Path) -> None:
    """What the page says each command produces."""
    o = cwd / "output"
    if "data inspect HumanLLMs" in command:
        assert out.count("PROMPT:") == 5 and "\u2705 CHOSEN:" in out and "\u274c REJECTED:" in out
    elif "data inspect oumi" in command:
        assert out.count("PROMPT:") == 5 and out.count("ANSWER:") == 5
    elif "learn_dpo_laptop" in command:
        for folder in (o / "learn_dpo/checkpoint-25", o / "learn_dpo/checkpoint-50", o / "learn_dpo"):
            assert (folder / "adapter_config.json").is_file(), folder
        last = json.loads((o / "learn_dpo/metrics.jsonl").read_text().splitlines()[-1])
        assert {"loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"} <= set(last)
    elif "learn_grpo_laptop" in command:  # no use_peft there: Oumi's false, a full fine-tune
        for folder in (o / "learn_grpo/checkpoint-15", o / "learn_grpo/checkpoint-30"):
            assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file(), folder
        last = json.loads((o / "learn_grpo/metrics.jsonl").read_text().splitlines()[-1])
        assert {"reward", "rewards/count_letters/mean", "frac_reward_zero_std"} <= set(last)
    elif command.startswith("mlxrl plot output/learn_dpo"):
        assert (o / "learn_dpo/curves.png").stat().st_size > 1000
    elif "eval_dpo_results.yaml" in command:
        assert "ignoring data, evaluation" in out and ">>> " in out
    elif "--task preference" in command:
        assert "preference_accuracy" in out and "mean_reward_margin" in out
    elif "<<'EOF'" in command:
        assert "count_letters +0.00   letter_count 1.0" in out and "count_letters -3.00" in out
    elif command.startswith("mlxrl eval"):
        folder = o / ("eval_base" if "Qwen" in command else "eval_grpo")
        metrics = json.loads((folder / "eval_results.json").read_text())["tasks"]["letter_count"]
        assert metrics["num_samples"] == 8 and set(metrics) == {
            "accuracy", "properly_extracted_accuracy", "num_samples", "num_correct_answers",
            "num_incorrect_answers", "num_invalid_answers"}
        assert len((folder / "letter_count_samples.jsonl").read_text().splitlines()) == 8
    elif command.startswith("mlxrl compare"):
        assert "[A] tiny://" in out and "[B] output/" in out
        assert ("letter_count  accuracy" in out) == ("--eval" in command)
    elif "test_both_models" in command:
        assert "TEST 1" in out and "TEST 2" in out and "KEY INSIGHT" in out
    elif command.startswith("mlxrl quickstart"):
        check_quickstart_report(o / "quickstart")
    elif "sft_vs_grpo" in command:
        assert (o / "quickstart/sft_vs_grpo.png").stat().st_size > 1000
    elif "--format gguf" in command:
        check_gguf(command, cwd)
    elif "data make" in command:
        assert len((cwd / "my_letters.jsonl").read_text().splitlines()) == 500


def check_gguf(command: str, cwd: Path) -> None:
    """The GGUF files and Modelfile the page names; transformers' own GGUF loader reads the
    fused file (weights and tokenizer) and its chat template is the base's."""
    import gguf
    from transformers import AutoTokenizer

    assert command.startswith("mlxrl fuse"), command  # the page's LoRA export is a text block
    folder = cwd / "output/grpo_gguf"
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and "\\boxed{" in modelfile
    reader = gguf.GGUFReader(str(folder / "model-q8_0.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    ours = AutoTokenizer.from_pretrained(folder, gguf_file="model-q8_0.gguf")
    chat = [{"role": "user", "content": "How many 'l's are in 'hello'?"}]
    base = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))
    assert ours.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == \
        base.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def check_quickstart_report(folder: Path) -> None:
    """The report states the numbers this run measured: the table cells are the evaluations'
    values, and the run rows are the means of the logged metrics."""
    summary = json.loads((folder / "quickstart_results.json").read_text())
    report = (folder / "report.md").read_text()
    evals = summary["evals"]
    assert set(evals) == {"base", "SFT", "DPO", "GRPO"}
    invalid = [evals[n]["letter_count"]["num_invalid_answers"] for n in ("base", "SFT", "DPO", "GRPO")]
    assert f"| answers without one \\boxed{{int}} | {' | '.join(map(str, invalid))} |" in report
    acc = [evals[n]["letter_count"]["accuracy"] for n in ("base", "SFT", "DPO", "GRPO")]
    assert "| letter-count accuracy (greedy) | " + " | ".join(f"{a:.3f}" for a in acc) in report
    pref = [evals[n]["preference"]["preference_accuracy"] for n in ("base", "DPO")]
    assert f"held-out preference accuracy {pref[0]:.3f} -> {pref[1]:.3f}" in report
    for name, run in summary["runs"].items():
        rows = [json.loads(line) for line in
                (folder / name.lower() / "metrics.jsonl").read_text().splitlines()]
        quarter = max(1, len(rows) // 4)
        first = sum(r[run["curve"]] for r in rows[:quarter]) / quarter
        assert run["first"] == pytest.approx(first)
        assert f"| {name} | `{run['from']}` | {run['steps']} |" in report
    assert evals["base"]["letter_count"]["num_invalid_answers"] == evals["base"]["letter_count"]["num_samples"]
    for png in ("sft_curves.png", "dpo_curves.png", "grpo_curves.png"):
        assert (folder / png).stat().st_size > 1000 and f"]({png})" in report


def test_the_walkthrough_end_to_end(tmp_path, monkeypatch):
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    for command in walkthrough_commands():
        out = run(command, tmp_path)
        check(command, out, tmp_path)


@pytest.mark.slow
def test_full_quickstart_learns_what_the_page_says(tmp_path):
    """The full-size quickstart (a few minutes): the claims of the page's "Combine all three"."""
    from mlxrl.quickstart import run_quickstart

    run_quickstart(tmp_path, quiet=True)
    s = json.loads((tmp_path / "quickstart_results.json").read_text())
    lc = {name: e["letter_count"] for name, e in s["evals"].items()}
    sampled = {name: e["sampled_reward"]["rewards/letter_count/mean"] for name, e in s["evals"].items()}
    assert lc["base"]["num_invalid_answers"] == lc["base"]["num_samples"]
    assert lc["SFT"]["num_invalid_answers"] <= 0.1 * lc["SFT"]["num_samples"]
    assert s["evals"]["DPO"]["preference"]["preference_accuracy"] >= 0.9
    assert s["runs"]["GRPO"]["last"] > s["runs"]["GRPO"]["first"]
    assert sampled["GRPO"] > sampled["SFT"]
    assert lc["GRPO"]["accuracy"] >= s["majority_baseline"]["accuracy"] - 0.05
