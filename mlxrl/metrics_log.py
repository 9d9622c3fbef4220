"""Training metrics: a progress bar with live values, `metrics.jsonl` (one line per log step), and
GRPO's `completions.jsonl` (`log_completions`, the one writer for both backends)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

# What the progress bar shows, by metric name, in this order (when present).
_BAR_FIELDS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
               ("reward", "reward"), ("tokens_per_second", "tok/s"), ("peak_memory_gb", "mem_gb"))


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, initial_step: int = 0, desc: str = "train",
                 quiet: bool = False):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.history: list[dict] = []
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                        dynamic_ncols=True, disable=quiet, file=sys.stderr)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = {short: f"{record[name]:.4g}" for name, short in _BAR_FIELDS
                 if isinstance(record.get(name), float)}
        self.bar.set_postfix(shown, refresh=False)

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
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


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


def log_completions(path: Path, step: int, prompts, completions, reward_names, scores) -> None:
    """Append one line per completion to `path` (GRPO's `completions.jsonl`): `step`, `prompt`,
    `completion` (its text, also for a conversational completion) and `rewards` (name -> value)."""
    with open(path, "a") as f:
        for prompt, completion, score in zip(prompts, completions, scores):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            record = {"step": step, "prompt": prompt, "completion": text,
                      "rewards": dict(zip(reward_names, map(float, score)))}
            f.write(json.dumps(record) + "\n")
