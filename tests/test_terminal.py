"""What a user sees while training: the lines through a pipe and on a terminal, the summary,
`--quiet`, the logging module, and the rough edges of the command line (issue 13)."""

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DPO = ["train", "--backend", "mlx", "-c", "configs/quickstart/dpo.yaml", "--training.max_steps", "4",
       "--training.logging_steps", "2", "--training.save_steps", "2"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _pty_run(args: list[str], timeout: float = 240) -> str:
    """`mlxrl ARGS` with stdout and stderr on a pseudo-terminal: everything it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "mlxrl.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, cwd=ROOT, env={**ENV, "TERM": "xterm"},
                            close_fds=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


def _assert_run_lines(text: str, out: Path, backend: str = "mlx") -> None:
    lines = text.splitlines()
    shown = {"mlx": "MLX", "torch": "torch"}[backend]
    assert any(x.startswith(f"backend: {shown} (--backend {backend})") for x in lines), text
    # no silent minutes: what takes time is said before it starts
    assert lines.index("loading tiny://qwen2") < next(i for i, x in enumerate(lines) if x.startswith("tokenizing 256 "))
    assert any(re.match(rf"mlxrl dpo on {shown}( \(cpu\))?: tiny://qwen2, 19,456 trainable of 165,440 ", x)
               for x in lines), text
    steps = [x for x in lines if re.match(r"step [24]/4  loss \S+  rewards/accuracies \S+  "
                                          r"rewards/margins \S+  learning_rate \S+  tokens/s \d+  "
                                          r"elapsed \S+$", x.strip("\r"))]
    assert len(steps) == 2, text
    assert f"checkpoint 2/4 written: {out / 'checkpoint-2'}" in text
    # the summary: steps, last and best metrics, the adapter, the next commands
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert re.search(r"finished: 4 steps \(4 in this run: \S+ of training, \S+ s/step; \S+ in all\)", text)
    assert f"  last (step 4): loss {history[-1]['loss']:.4g}" in text
    best = min(history, key=lambda r: r["loss"])
    assert f"best: loss {best['loss']:.4g} (step {best['step']})" in text
    assert f"  {'PEFT adapter' if backend == 'torch' else 'adapter'}: {out}" in text
    commands = [f"mlxrl infer --model.model_name {out} --interactive",
                f"mlxrl eval --model.model_name {out} --task preference", f"mlxrl compare tiny://qwen2 {out}"]
    if backend == "mlx":  # a torch run's adapter is a PEFT one already
        commands.append(f"mlxrl export {out} --output {out}-peft")
    for command in commands:
        assert f"  {command}" in text
    assert lines[-1].strip() == f"done: 4 steps; adapter in {out}"


def test_piped_output_is_plain_lines_and_a_summary(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", *DPO, "--training.output_dir", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # no progress-bar frames
    assert proc.stdout == ""
    _assert_run_lines(proc.stderr, out)
    # the commands the summary suggests work as printed
    export = subprocess.run([sys.executable, "-m", "mlxrl.cli", "export", str(out), "--output",
                             f"{out}-peft"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert export.returncode == 0 and (Path(f"{out}-peft") / "adapter_model.safetensors").is_file()


def test_torch_backend_prints_the_same_lines(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "run"
    args = [a if a != "mlx" else "torch" for a in DPO]
    proc = subprocess.run([sys.executable, "-m", "mlxrl.cli", *args, "--training.output_dir", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr and proc.stdout == ""
    _assert_run_lines(proc.stderr, out, "torch")


def test_terminal_output_keeps_the_lines_under_a_live_bar(tmp_path):
    out = tmp_path / "run"
    text = _pty_run([*DPO, "--training.output_dir", str(out)])
    assert "\r" in text and re.search(r"dpo :\s+\d+%\|", text)  # the live bar, redrawn in place
    # each metrics line is written whole on its own line (the bar is cleared and redrawn below it)
    _assert_run_lines("\n".join(x.split("\r")[-1] for x in text.replace("\r\n", "\n").split("\n")), out)


def test_quiet_prints_errors_and_the_final_line_only(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*DPO, "--training.max_steps", "2", "--quiet",
                                       "--training.output_dir", str(out), "--training.optimizer", "adamw_torch_fused"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"done: 2 steps; adapter in {out}\n"  # not even the optimizer note
    bad = CliRunner().invoke(main, [*DPO, "--quiet", "--training.output_dir", str(out / "x"),
                                    "--training.learning_rate", "-1"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


API_SCRIPT = """
import logging, sys
import mlxrl
mode = sys.argv[1]
if mode == "own":
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s: %(message)s")
root = list(logging.getLogger().handlers), logging.getLogger().level
mlxrl.train("configs/quickstart/sft.yaml", ["--training.max_steps", "1", "--training.output_dir",
            sys.argv[2], "--training.optimizer", "adamw_torch_fused"])
assert (list(logging.getLogger().handlers), logging.getLogger().level) == root
assert not logging.getLogger("mlxrl").handlers
print("ok")
"""


def test_python_api_logs_through_the_programs_logging(tmp_path):
    def run(mode):
        return subprocess.run([sys.executable, "-c", API_SCRIPT, mode, str(tmp_path / mode)], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=300)

    plain, own = run("plain"), run("own")
    assert plain.returncode == own.returncode == 0, plain.stderr + own.stderr
    # no logging set-up: mlxrl's lines on stderr, as the CLI prints them
    assert "note: training.optimizer: adamw_torch_fused: MLX runs its own AdamW" in plain.stderr
    assert "step 1/1  loss" in plain.stderr and "finished: 1 steps" in plain.stderr
    # the program's own set-up: its format and level (WARNING: the notes, not the progress)
    assert "LOG WARNING mlxrl.capabilities: note: training.optimizer" in own.stderr
    assert "step 1/1" not in own.stderr and own.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- the rough edges


def test_a_typo_on_the_command_line_is_named_there():
    result = CliRunner().invoke(main, ["train", "-c", "configs/quickstart/dpo.yaml", "--trainig.max_steps", "3"])
    assert result.exit_code == 1
    assert result.stderr == ("error: override trainig.max_steps: unknown key 'trainig'; "
                             "did you mean 'training'?\n")
    hyphens = CliRunner().invoke(main, ["train", "-c", "configs/quickstart/dpo.yaml",
                                        "--training.max-stepz", "3"])
    assert "unknown key 'training.max_stepz'; did you mean 'training.max_steps'?" in hyphens.stderr


def test_hyphenated_override_is_the_field(tmp_path):
    from mlxrl.config import load_config

    cfg = load_config(ROOT / "configs/quickstart/dpo.yaml", ["--training.max-steps", "3",
                                                              "--training.output_dir", str(tmp_path)])
    assert cfg.training.max_steps == 3


@pytest.mark.parametrize("spelling", ["--dataset_path", "--dataset-path"])
def test_eval_takes_a_data_file_in_both_spellings(tmp_path, spelling):
    pairs = ROOT / "configs/quickstart/data/preferences_heldout.jsonl"
    result = CliRunner().invoke(main, ["eval", "--model.model_name", "tiny://qwen2", "--task", "preference",
                                       spelling, str(pairs), "--num_samples", "4"])
    assert result.exit_code == 0, result.output
    assert re.search(r"preference  num_pairs\s+4", result.stdout)


def _engine(**generation):
    from mlxrl.config import GenerationParams, ModelParams
    from mlxrl.inference import Engine

    return Engine(ModelParams(model_name="tiny://qwen2", model_max_length=generation.pop("context", None)),
                  GenerationParams(**{"max_new_tokens": 5, **generation}))


def run_chat(engine, lines, verbose=False):
    """(exit code, stdout, stderr) of a chat fed `lines`, then end of input."""
    from mlxrl.cli_infer import chat

    lines = iter(lines)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    code = chat(engine, None, verbose=verbose, read=read, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_chat_takes_ollamas_commands_and_shows_speed():
    code, out, err = run_chat(_engine(), ["hi", "/clear", "again", "/bye", "never sent"], verbose=True)
    assert code == 0 and "[history cleared]" in err
    prompts = re.findall(r"\[prompt: \d+ tokens\] (.*)", err)
    assert len(prompts) == 2 and "hi" not in prompts[1]  # /clear emptied the history; /bye ended it
    speeds = re.findall(r"\[(\d+) tokens, ([\d.]+) tokens/s; prompt (\d+) tokens", err)
    assert len(speeds) == 2 and all(int(n) > 0 and float(s) > 0 for n, s, _ in speeds)


def test_chat_warns_when_the_conversation_passes_the_context():
    engine = _engine(max_new_tokens=8, context=48)
    code, _, err = run_chat(engine, ["a first question, long enough", "a second one", "a third one"])
    assert code == 0
    assert "passes the model's context of 48 tokens; the oldest turn was dropped" in err


# ----------------------------------------------------------------------------- QLoRA's header


def test_qlora_counts_the_models_parameters_not_packed_words():
    import mlx.core as mx
    from transformers import AutoModelForCausalLM

    from mlxrl.config import ModelParams, PeftParams
    from mlxrl.mlx import model as mlx_model
    from mlxrl.testing import capture_lines, tiny_model

    folder = tiny_model("qwen2", hidden_size=128)  # every linear layer's input is a multiple of 64
    hf_count = AutoModelForCausalLM.from_pretrained(folder).num_parameters()
    params = ModelParams(model_name=str(folder))
    plain = mlx_model.load(params, PeftParams(), for_training=True)
    with capture_lines() as lines:
        quant = mlx_model.load(params, PeftParams(q_lora=True), for_training=True)
    assert lines == [f"loading {folder}", "quantizing the base to 4 bits (QLoRA)"]  # said, not silent
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in quant.model.named_modules())
    lora, total = mlx_model.trainable_count(plain.model)
    assert total == hf_count + lora  # the model's parameters and the adapter's
    assert mlx_model.trainable_count(quant.model) == (lora, total)
    mx.clear_cache()


# ----------------------------------------------------------------------------- plots


def _run_folder(folder: Path, method: str, losses: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, **({"reward": v / 10} if method == "grpo" else {})}
            for i, v in enumerate(losses)]
    rows.append({"step": len(losses), "eval_loss": losses[-1] * 1.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "trainer_state.json").write_text(json.dumps({"method": method, "global_step": len(losses)}))
    return folder


def test_plots_keep_a_runs_colour_and_give_each_method_its_loss_axis(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlxrl import plot

    sft = _run_folder(tmp_path / "sft", "sft", [2.5, 1.5, 1.0])
    grpo = _run_folder(tmp_path / "grpo", "grpo", [0.01, -0.02, 0.0])
    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return real_savefig(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        plot.plot_runs([sft, grpo], tmp_path / "both.png")
        plot.plot_runs([grpo], tmp_path / "one.png")
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    both, one = drawn
    titles = [ax.get_title() for ax in both.axes]
    assert titles == ["loss (SFT)", "loss (GRPO)", "reward (GRPO)"]  # own y axis per method
    colours = {}
    for ax in both.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label().removesuffix(" (eval)"), set()).add(line.get_color())
    assert colours.keys() == {"sft", "grpo"} and all(len(c) == 1 for c in colours.values())
    assert colours["sft"] != colours["grpo"]
    assert [x.get_linestyle() for x in both.axes[0].get_lines()] == ["-", "--"]  # eval_loss dashed
    assert one._suptitle.get_text() == "grpo (GRPO)"
    plt.close("all")
