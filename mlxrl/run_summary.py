"""The summary a finished training run prints (both backends): steps and time, the last and best
metrics, where the adapter is, and the commands that come next (infer, eval, compare, export).

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import shlex

from mlxrl.console import format_seconds
from mlxrl.metrics_log import HEADLINE, key_metrics


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _last(history: list[dict], evaluation: bool) -> dict | None:
    rows = [r for r in history if any(k.startswith("eval_") for k in r) == evaluation]
    return rows[-1] if rows else None


def _metric_text(record: dict, keys) -> str:
    return "  ".join(f"{k} {_value(record[k])}" for k in keys
                     if isinstance(record.get(k), (int, float)))


def best_metrics(history: list[dict]) -> dict[str, tuple[float, int]]:
    """{headline metric: (best value, its step)} over the run's records."""
    best: dict[str, tuple[float, int]] = {}
    for record in history:
        for key, higher in HEADLINE.items():
            value = record.get(key)
            if not isinstance(value, (int, float)) or value != value:
                continue
            if key not in best or (value > best[key][0] if higher else value < best[key][0]):
                best[key] = (value, record["step"])
    return best


def next_commands(method: str, output_dir: str, start_model: str, backend: str,
                  reward_functions=None) -> list[str]:
    out, start = shlex.quote(str(output_dir)), shlex.quote(str(start_model))
    rewards = "".join(f" --reward {shlex.quote(r)}" for r in reward_functions or [])
    evaluation = {"dpo": " --task preference", "grpo": f" --task reward{rewards}"}
    lines = [f"mlxrl infer --model.model_name {out} --interactive",
             f"mlxrl eval --model.model_name {out}{evaluation.get(method, '')}",
             f"mlxrl compare {start} {out}"]
    if backend == "mlx":
        lines.append(f"mlxrl export {out} --output {shlex.quote(str(output_dir) + '-peft')}")
    return lines


def summary_lines(history: list[dict], *, steps: int, seconds: float, output_dir: str,
                  method: str, start_model: str, backend: str, saved: bool = True,
                  reward_functions=None, training_seconds: float | None = None,
                  trained_steps: int | None = None) -> list[str]:
    """The end-of-run summary, one string per line: `seconds` in all, `training_seconds` for
    the `trained_steps` this command ran (a resumed run ran fewer than `steps`)."""
    timing = f"in {format_seconds(seconds)}"
    if training_seconds and trained_steps:
        timing = (f"({trained_steps} in this run: {format_seconds(training_seconds)} of training, "
                  f"{training_seconds / trained_steps:.2f} s/step; {format_seconds(seconds)} in all)")
    lines = [f"finished: {steps} steps {timing}"]
    last = _last(history, evaluation=False)
    if last is not None:
        lines.append(f"  last (step {last['step']}): "
                     + _metric_text(last, ["loss", *key_metrics(last)]))
    last_eval = _last(history, evaluation=True)
    if last_eval is not None:
        keys = ["eval_loss", *key_metrics(last_eval, "eval_")]
        lines.append(f"  last eval (step {last_eval['step']}): " + _metric_text(last_eval, keys))
    best = best_metrics(history)
    if best:
        lines.append("  best: " + "  ".join(f"{k} {_value(v)} (step {s})" for k, (v, s) in best.items()))
    if saved:
        kind = "PEFT adapter" if backend == "torch" else "adapter"
        lines.append(f"  {kind}: {output_dir}")
        lines.append("next:")
        lines += [f"  {c}" for c in next_commands(method, output_dir, start_model, backend,
                                                  reward_functions)]
    return lines
