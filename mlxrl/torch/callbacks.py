"""What a torch run shows and writes, as an MLX run does: `metrics.jsonl` with the MLX loop's metric
names and timing fields, a checkpoint only every `save_steps` (TRL's Trainer also saves at the
last step), a log line at the last step, and mlxrl's progress bar and terminal lines
(`mlxrl.metrics_log`): one per logging step and evaluation, one per checkpoint, a GRPO sample.

TRL already logs `loss`, `grad_norm`, `learning_rate`, `epoch` and each method's metrics under
the names the MLX backend uses (`rewards/chosen`, `reward`, `completions/mean_length`, ...), and
its evaluations as `eval_*`; this callback adds `step_time`, `tokens_per_second` and
`peak_memory_gb`, averaged over the steps since the previous log line as on MLX, and keeps TRL's
extra metrics (`entropy`, `num_tokens`, ...). It runs first among the callbacks (`train.build`)
and adds its fields to the record itself, so TensorBoard and W&B get them as on MLX.

With a `StopOnSignal` attached (`stop`), a SIGINT / SIGTERM makes the step that is running the last:
it is logged and saved, and `interrupted_at` says which step that was (on every process, when
distributed).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from mlxrl.metrics_log import MetricsLog, read_metrics

_SUMMARY_KEYS = ("train_runtime", "train_loss", "total_flos")


def peak_memory_gb() -> float:
    """Peak accelerator memory (CUDA / MPS), else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.mps.driver_allocated_memory() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


class RolloutClock:
    """A torch GRPO run's time making rollouts (sampling and scoring: TRL's
    `_generate_and_score_completions`) and its sampled tokens, counted by the trainer
    (`methods.build_trainer`) so that the log line gives the rollout apart from the update, as the
    MLX loop's does."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds, self.sampling_seconds, self.tokens = 0.0, 0.0, 0

    def metrics(self, steps: int, step_time: float) -> dict:
        """The MLX loop's fields, averaged over the `steps` since the last log line."""
        rollout = self.seconds / steps
        speed = self.tokens / self.sampling_seconds if self.sampling_seconds > 0 else 0.0
        return {"rollout_time": rollout, "rollout_tokens_per_second": speed,
                "update_time": max(step_time - rollout, 0.0)}


class MlxrlCallback(TrainerCallback):
    def __init__(self, output_dir: str, save_steps: int, quiet: bool = False, desc: str = "train",
                 reporters=None):
        self.output_dir, self.save_steps = Path(output_dir), save_steps
        self.quiet, self.desc, self.reporters = quiet, desc, reporters
        self.sample: dict | None = None  # GRPO's latest completion (log_completions)
        self.rollouts = RolloutClock()  # GRPO: filled by the trainer
        self._summary: dict = {}
        self.log: MetricsLog | None = None
        self._started = 0.0
        self._seconds: list[float] = []
        self._tokens_seen = 0.0
        self.stop = None  # a StopOnSignal
        self.interrupted_at: int | None = None
        self.signum: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.log = MetricsLog(self.output_dir, state.max_steps, initial_step=state.global_step,
                                  desc=self.desc, quiet=self.quiet, reporters=self.reporters)
            if state.global_step:  # resumed: drop the lines logged after the checkpoint
                self.log.restore(read_metrics(self.output_dir), state.global_step)
        if state.log_history:  # resumed: count tokens from where the last log line left off
            self._tokens_seen = float(state.log_history[-1].get("num_tokens", 0.0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._seconds.append(time.perf_counter() - self._started)
        if self.log is not None:
            self.log.advance()
        if state.global_step >= state.max_steps:
            control.should_log = True  # the MLX loop logs its last step
            if self.save_steps <= 0 or state.global_step % self.save_steps:
                control.should_save = False  # the final adapter goes to output_dir instead
        elif self._signal_seen(args):
            control.should_log = control.should_save = control.should_training_stop = True
            self.interrupted_at = state.global_step

    def _signal_seen(self, args) -> bool:
        """Whether any process got SIGINT / SIGTERM: processes must stop at the same step, or the
        ones still training wait forever on the others in their next collective."""
        self.signum = self.stop.signum if self.stop is not None else None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([self.signum or 0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None

    def set_sample(self, sample: dict) -> None:
        self.sample = sample

    def on_save(self, args, state, control, **kwargs):
        if self.log is not None:
            self.log.checkpoint(state.global_step, self.output_dir / f"checkpoint-{state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Adds the timing fields to `logs` itself (the callbacks after this one report it)."""
        if logs is None or self.log is None:
            return
        if any(k in logs for k in _SUMMARY_KEYS):
            self._summary = dict(logs)
            return
        if any(k.startswith("eval_") for k in logs):
            self.log.log(state.global_step, dict(logs))
            return
        if "loss" not in logs:
            return
        seconds = sum(self._seconds)
        steps = max(len(self._seconds), 1)
        tokens = float(logs.get("num_tokens", self._tokens_seen))
        new = tokens - self._tokens_seen if tokens >= self._tokens_seen else tokens  # DPO restarts its count
        logs["step_time"] = seconds / steps
        logs["tokens_per_second"] = new / seconds if seconds > 0 else 0.0
        logs["peak_memory_gb"] = peak_memory_gb()
        if self.rollouts.seconds > 0:
            logs.update(self.rollouts.metrics(steps, logs["step_time"]))
            self.rollouts.reset()
        self._tokens_seen, self._seconds = tokens, []
        sample, self.sample = self.sample, None
        self.log.log(state.global_step, dict(logs), sample=sample)

    def on_train_end(self, args, state, control, **kwargs):
        if self.log is not None:
            self.log.close(self._summary)
