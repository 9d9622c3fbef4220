"""Training metrics, the same on both backends: `metrics.jsonl` (one record per logging step and
per evaluation), a line per record on the terminal (kept in the scrollback, under the live bar),
the reporters (TensorBoard, W&B: `mlxrl.reporters`), and GRPO's `completions.jsonl`
(`log_completions`, the one writer for both backends).

A line reads `step 10/40  loss 0.4656  rewards/accuracies 0.6  ...  learning_rate 4.8e-03
tokens/s 462  elapsed 5.1s`: the step, the loss and the method's key metrics under TRL's names, the
rate, the speed and the time since the run (or its resume) started. An evaluation's line starts
`eval step 10/40` and shows its `eval_*` metrics. The live bar is drawn only on a terminal
(`mlxrl.console.live_bars`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from mlxrl.console import format_seconds, live_bars

logger = logging.getLogger(__name__)

# What a line shows after the loss, by TRL's metric names, in this order (when present).
KEY_METRICS = ("rewards/accuracies", "rewards/margins", "reward", "reward_std", "kl",
               "completions/mean_length", "mean_token_accuracy")
# A run's headline metric, and whether higher is better (the summary's "best").
HEADLINE = {"loss": False, "reward": True, "rewards/accuracies": True, "rewards/margins": True,
            "eval_loss": False, "eval_reward": True, "eval_rewards/accuracies": True,
            "eval_rewards/margins": True}


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if not _number(value):
        return "-"
    return f"{value:.4g}"


def key_metrics(record: dict, prefix: str = "") -> list[str]:
    """The names of the record's key metrics (`prefix` "eval_" for an evaluation's), in order."""
    keys = [prefix + k for k in KEY_METRICS if prefix + k in record]
    if prefix + "rewards/accuracies" in record and prefix + "mean_token_accuracy" in keys:
        keys.remove(prefix + "mean_token_accuracy")  # TRL's DPO logs it too: DPO's are the rewards
    return keys


def metrics_line(record: dict, total_steps: int, elapsed: float | None = None) -> str:
    """The terminal line of one metrics.jsonl record."""
    step = f"{record['step']}/{total_steps}"
    evaluated = [k for k in record if k.startswith("eval_")]
    if evaluated:
        keys = [k for k in ("eval_loss",) if k in record] + key_metrics(record, "eval_")
        parts = [f"eval step {step}"] + [f"{k} {_fmt(record[k])}" for k in keys]
        if _number(record.get("eval_runtime")):
            parts.append(f"({format_seconds(record['eval_runtime'])})")
        return "  ".join(parts)
    parts = [f"step {step}", f"loss {_fmt(record.get('loss'))}"]
    parts += [f"{k} {_fmt(record[k])}" for k in key_metrics(record)]
    if _number(record.get("learning_rate")):
        parts.append(f"learning_rate {record['learning_rate']:.2e}")
    if _number(record.get("rollout_time")):  # GRPO: sampling apart from the update
        speed = record.get("rollout_tokens_per_second")
        parts.append(f"rollout {format_seconds(record['rollout_time'])}"
                     + (f" ({speed:.0f} tok/s)" if _number(speed) else ""))
        if _number(record.get("update_time")):
            parts.append(f"update {format_seconds(record['update_time'])}")
    elif _number(record.get("tokens_per_second")):
        parts.append(f"tokens/s {record['tokens_per_second']:.0f}")
    if elapsed is not None:
        parts.append(f"elapsed {format_seconds(elapsed)}")
    return "  ".join(parts)


def sample_line(sample: dict, width: int = 160) -> str:
    """A GRPO completion and its rewards (`log_completions`), as one line."""
    def short(text, limit):
        text = " ".join(str(text).split())
        return text if len(text) <= limit else text[:limit - 3] + "..."

    prompt = sample["prompt"]
    if isinstance(prompt, list) and prompt:
        prompt = prompt[-1].get("content", "")
    rewards = "  ".join(f"{k} {_fmt(v)}" for k, v in sample["rewards"].items())
    return (f"  sample: {short(prompt, width // 3)!r} -> {short(sample['completion'], width)!r}  "
            f"rewards: {rewards}")


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, initial_step: int = 0, desc: str = "train",
                 quiet: bool = False, reporters=None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.history: list[dict] = []
        self.reporters = reporters
        self.started = time.perf_counter()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                        dynamic_ncols=True, disable=quiet or not live_bars(), file=sys.stderr)

    def log(self, step: int, metrics: dict, sample: dict | None = None) -> None:
        """One record: into metrics.jsonl, the reporters and a line on the terminal (with a
        GRPO `sample` completion when given)."""
        record = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.reporters is not None:
            self.reporters.log(step, record)
        logger.info(metrics_line(record, self.total_steps, time.perf_counter() - self.started))
        if sample is not None:
            logger.info(sample_line(sample))

    def checkpoint(self, step: int, folder: Path) -> None:
        logger.info(f"checkpoint {step}/{self.total_steps} written: {folder}")

    def restore(self, history: list[dict], step: int) -> None:
        """Resume: keep the history up to `step` and rewrite metrics.jsonl to match it."""
        self.history = [r for r in history if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        self.bar.reset(total=self.bar.total)
        self.bar.update(step)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def write(self, line: str) -> None:
        logger.warning(line)

    def close(self, summary: dict | None = None) -> None:
        """End the bar; `summary` (train_runtime, ...) goes to the reporters, as TRL logs it."""
        self.bar.close()
        if self.reporters is not None:
            if summary:
                self.reporters.log(self.history[-1]["step"] if self.history else 0, summary)
            self.reporters.close()


def read_metrics(output_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut off by a killed run is left out."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return records


def log_completions(path: Path, step: int, prompts, completions, reward_names, scores) -> dict | None:
    """Append one line per completion to `path` (GRPO's `completions.jsonl`): `step`, `prompt`,
    `completion` (its text, also for a conversational completion) and `rewards` (name -> value).
    Returns the first record (the sample a logging step shows), None when there is none."""
    first = None
    with open(path, "a") as f:
        for prompt, completion, score in zip(prompts, completions, scores):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            record = {"step": step, "prompt": prompt, "completion": text,
                      "rewards": dict(zip(reward_names, map(float, score)))}
            f.write(json.dumps(record) + "\n")
            first = first or record
    return first
