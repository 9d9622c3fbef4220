"""`mlxrl infer`: the chat through a real pseudo-terminal, batch files, configs, the Python API."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny://qwen2"


# ----------------------------------------------------------------------------- the chat in a pty


class Terminal:
    """`mlxrl ...` on a pseudo-terminal: stdin, stdout and stderr are all the pty's slave."""

    def __init__(self, *args):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxrl.cli", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.fd, self.seen = master, ""

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        """Read until `pattern` (a regex) appears after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while not re.search(pattern, self.seen[start:]):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.fd], [], [], 0)[0]:
                raise AssertionError(f"no {pattern!r} in:\n{self.seen[start:]}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the pty
                    pass
        return self.seen[start:]

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.fd)
        return code


def _prompts(text: str) -> list[tuple[int, str]]:
    """(token count, decoded prompt) of each `[prompt: N tokens] '...'` line of -v."""
    return [(int(n), p) for n, p in re.findall(r"\[prompt: (\d+) tokens\] (.*)", text)]


def test_chat_in_a_terminal_keeps_history_and_quits():
    term = Terminal("infer", "--model.model_name", TINY, "--interactive", "-v",
                    "--generation.max_new_tokens", "6")
    term.expect(r">>> ")
    term.send("hello there")
    first = term.expect(r">>> ")
    term.send("how many l in hello?")
    second = term.expect(r">>> ")
    term.send("/quit")
    assert term.close() == 0
    (n1, p1), = _prompts(first)
    (n2, p2), = _prompts(second)
    assert "hello there" in p1 and "how many l in hello?" not in p1
    # the second prompt holds the first turn (question and the model's reply) before the new one
    assert p2.index("hello there") < p2.index("how many l in hello?")
    assert p2.count("<|im_start|>assistant") == 2
    assert n2 > n1 + 6


def _engine():
    from mlxrl.config import GenerationParams, ModelParams
    from mlxrl.inference import Engine

    return Engine(ModelParams(model_name=TINY), GenerationParams(max_new_tokens=5))


def test_chat_commands_reset_system_and_end_of_input():
    from test_terminal import run_chat

    lines = ["hi", "/system Be brief.", "again", "/reset", "fresh", "/help"]
    code, _, err = run_chat(_engine(), lines, verbose=True)
    assert code == 0
    prompts = [p for _, p in _prompts(err)]
    assert len(prompts) == 3
    assert "system" not in prompts[0]
    assert "Be brief." in prompts[1] and "hi" in prompts[1]  # system prompt set, history kept
    assert "Be brief." in prompts[2] and "again" not in prompts[2]  # /reset: history gone
    assert "[history cleared]" in err and "/quit (/bye) exits" in err


def test_without_interactive_or_input_path_it_chats_as_oumi_does():
    result = CliRunner().invoke(main, ["infer", "--model.model_name", TINY,
                                       "--generation.max_new_tokens", "4"], input="hi\n")
    assert result.exit_code == 0, result.output
    assert "starting an interactive chat" in result.output


# ----------------------------------------------------------------------------- configs


def test_the_walkthroughs_eval_config_loads_as_it_is():
    from mlxrl.inference import load_inference_config

    path = ROOT / "configs/examples/eval_dpo_results.yaml"
    cfg, notes = load_inference_config(path, ["--model.model_name", "ckpt"])
    assert (cfg.model.model_name, cfg.model.torch_dtype_str) == ("ckpt", "bfloat16")
    assert (cfg.generation.max_new_tokens, cfg.generation.temperature) == (128, 0.7)
    assert len(notes) == 1 and "ignoring data, evaluation" in notes[0]
    cfg, _ = load_inference_config(path, ["--generation.temperature", "0"])
    assert cfg.generation.temperature == 0.0  # an override beats inference.temperature
    cfg, notes = load_inference_config(ROOT / "configs/quickstart/sft.yaml", [])  # a training config
    assert cfg.model.model_name == TINY and "ignoring data, training, peft" in notes[0]


def test_infer_needs_a_model_and_names_unknown_keys():
    runner = CliRunner()
    result = runner.invoke(main, ["infer"])
    assert result.exit_code == 1 and "model.model_name is required" in result.output
    result = runner.invoke(main, ["infer", "--model.model_name", TINY, "--generation.temprature", "1"])
    assert result.exit_code == 1 and "did you mean 'generation.temperature'" in result.output


def test_tiny_uri_sizes():
    from mlxrl.errors import ModelError
    from mlxrl.model_names import resolve

    ref = resolve("tiny://qwen2?hidden_size=32&num_layers=1")
    config = json.loads((ref.base_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert ref.base_name == "tiny://qwen2?hidden_size=32&num_layers=1" and ref.adapter_path is None
    with pytest.raises(ModelError, match="hidden_size"):
        resolve("tiny://qwen2?width=3")


# ----------------------------------------------------------------------------- batch and API


def test_batch_file_through_the_sampler(tmp_path):
    rows = [{"prompt": "hello"}, {"messages": [{"role": "user", "content": "How many r?"},
                                               {"role": "assistant", "content": "reference"}]},
            {"prompt": "a much longer prompt than the others, to pad the batch", "id": 7}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["infer", "--model.model_name", TINY, "--input_path", str(src),
                                       "--output_path", str(dst), "--generation.max_new_tokens", "5",
                                       "--interactive", "--system-prompt", "letter_count"])
    assert result.exit_code == 0, result.output
    assert "--interactive is ignored" in result.output
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == 3 and out[2]["id"] == 7
    for row in out:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]  # the reference answer was replaced
        assert row["messages"][-1]["content"] == row["response"]
        assert "\\boxed{" in row["messages"][0]["content"]


def test_greedy_batch_matches_mlx_lm_one_prompt_at_a_time():
    """Prompts of different lengths in one padded batch give mlx-lm's own greedy tokens."""
    from mlx_lm import generate

    engine = _engine()
    engine.generation.max_new_tokens = 12
    conversations = [[{"role": "user", "content": t}] for t in
                     ("hi", "How many 'r's are in 'strawberry'?", "The quick brown fox jumps")]
    batched = engine.generate(conversations)
    for messages, text in zip(conversations, batched):
        ids = engine.prompt_ids(messages)
        alone = generate(engine.loaded.model, engine.tokenizer, ids, max_tokens=12)
        assert text == alone


def test_python_api_stays_callable_after_the_module_import():
    import mlxrl
    from mlxrl import infer

    reply = infer("hello", TINY, max_new_tokens=4)
    assert isinstance(reply, str)
    import mlxrl.inference  # noqa: F401  (the module has its own name: mlxrl.infer stays the function)

    assert mlxrl.infer("hello", TINY, max_new_tokens=4) == reply  # greedy: the same reply
    replies = mlxrl.infer(["hello", [{"role": "user", "content": "hello"}]], TINY, max_new_tokens=4)
    assert replies == [reply, reply]
    with pytest.raises(mlxrl.errors.ConfigError, match="max_tokens"):
        mlxrl.infer("hello", TINY, max_tokens=4)
