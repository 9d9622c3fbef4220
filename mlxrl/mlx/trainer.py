"""The training loop shared by SFT, DPO and GRPO on MLX.

A method supplies `loss(*arrays) -> (loss, metrics)` (differentiable, pure MLX, closing over its
model) and `next_step() -> StepBatch` (its micro-batches for one optimizer step, plus host-side
metrics such as rewards). The loop:

    for each optimizer step:
        grads = sum over micro-batches of grad(loss)      # methods scale their own loss
        clip to max_grad_norm; AdamW update; one mx.eval
        log every logging_steps, evaluate per eval_strategy, checkpoint every save_steps

A method may also supply `evaluation(dataset) -> (() -> metrics)`: its metrics on
`data.validation` (TRL's names; the loop adds the `eval_` prefix and transformers' timing fields).

The gradient function is `nn.value_and_grad` inside `mx.compile`; methods pad their arrays to
bucketed widths (multiples of 8) so the compiled function is traced for a bounded set of shapes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxrl import reporters, schedules
from mlxrl.errors import MlxrlError
from mlxrl.metrics_log import MetricsLog
from mlxrl.mlx import checkpoint
from mlxrl.run_dir import read_state
from mlxrl.stopping import StopOnSignal, interrupted, non_finite


@dataclass
class StepBatch:
    micro_batches: list[tuple]  # each a tuple of mx arrays passed to the method's loss
    metrics: dict = field(default_factory=dict)  # host-side metrics (floats)
    num_tokens: int = 0  # tokens processed this step, for tokens/s


class IndexStream:
    """Dataset indices, reshuffled each epoch from (seed, epoch): resumable from a position."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, position: int = 0):
        self.size, self.seed, self.shuffle, self.position = size, seed, shuffle, position

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.size)
            order = self._order(epoch)
            chunk = order[offset:offset + count - len(out)]
            out.extend(int(i) for i in chunk)
            self.position += len(chunk)
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.size


class StreamPosition:
    """For methods that read their data through `self.stream`: epoch, and state to resume."""

    @property
    def epoch(self) -> float:
        return self.stream.epoch

    def state(self) -> dict:
        return {"position": self.stream.position}

    def restore(self, state: dict) -> None:
        self.stream.position = state["position"]


def bucket(length: int, multiple: int = 8) -> int:
    """Pad widths up to a multiple of 8 so the compiled step sees a bounded set of shapes.

    Padding costs in proportion (a step's time is linear in width: +20% at 128 vs 110 columns on
    the 25M bench model), while a new width costs one retrace (50-90 ms there; the fused kernels
    do not depend on the width). Multiples of 32 padded bench batches ~10-14% past their longest
    row; multiples of 8, ~3%.
    """
    return max(multiple, multiple * math.ceil(length / multiple))


def row_width(length: int) -> int:
    """The padded width of token rows up to `length` long whose last column is only a target:
    the body reads the other columns (`logprobs.next_token_logits`), `bucket(length - 1)` of
    them. GRPO's completions often stop at `max_completion_length`, a multiple of 8: a suffix of
    that and the prompt's last token is 65 columns at 64, and `bucket(65)` (72) cost the update
    11% more work than the 64 the body needs."""
    return 1 + bucket(length - 1)


def make_optimizer(training):
    """The optimizer; the loop sets the rate of each update (`mlxrl.schedules`)."""
    lr = 0.0
    name = training.optimizer.lower()
    if name == "adafactor":
        return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)
    if name == "sgd":
        return optim.SGD(learning_rate=lr, momentum=training.sgd_momentum,
                         weight_decay=training.weight_decay)
    if "adam" not in name:
        raise MlxrlError(f"training.optimizer {training.optimizer!r} is not supported on MLX; "
                         f"use adamw_torch, adafactor or sgd")
    # other AdamW variants (adamw_torch_fused, ...) get a note from mlxrl.capabilities
    return optim.AdamW(learning_rate=lr, betas=[training.adam_beta1, training.adam_beta2],
                       eps=training.adam_epsilon, weight_decay=training.weight_decay,
                       bias_correction=True)


def total_steps_for(training, examples_per_step: int, dataset_size: int) -> int:
    if training.max_steps > 0:
        return training.max_steps
    return max(1, math.ceil(dataset_size / examples_per_step) * training.num_train_epochs)


class Trainer:
    def __init__(self, cfg, loaded, method, adapter_config: dict | None, total_steps: int, quiet=False,
                 run_record: dict | None = None, evaluation=None, files=None):
        """`files` writes and reads the model's files (`checkpoint.AdapterFiles` of
        `adapter_config` by default; a full fine-tune's `full_model.FullModelFiles`)."""
        self.cfg, self.training = cfg, cfg.training
        self.model, self.method = loaded.model, method
        self.files = files or checkpoint.AdapterFiles(self.model, adapter_config)
        self.run_record = run_record or {}
        self.total_steps = total_steps
        self.output_dir = Path(self.training.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.output_dir, total_steps, desc=f"{method.name} ", quiet=quiet,
                              reporters=reporters.for_run(cfg))
        self.optimizer = make_optimizer(self.training)
        self.evaluation = evaluation
        self._losses: list[float] = []  # every step's loss, for the run's train_loss
        self.rate = schedules.rate_fn(self.training, total_steps)
        self.step = 0
        self.skipped_steps = 0
        self._values: dict[str, list[float]] = {}
        self._count = 0
        loss_and_grad = nn.value_and_grad(self.model, method.loss)
        state = [self.model.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def grad_step(*arrays):
            (loss, metrics), grads = loss_and_grad(*arrays)
            return loss, metrics, grads

        self._grad_step = grad_step
        max_norm = self.training.max_grad_norm or float("inf")
        self._clip = mx.compile(lambda grads: optim.clip_grad_norm(grads, max_norm))
        self._update = None  # compiled on first use, over the optimizer state of that moment

    def _gradients(self, batch: StepBatch):
        """Summed gradients, summed losses and summed metrics over the micro-batches, clipped to
        max_grad_norm, and their norm. One micro-batch stays a lazy graph until the caller's one
        evaluation; with several, each is evaluated in turn (memory stays one micro-batch's)."""
        grads, loss, metric_sums = None, mx.array(0.0), {}
        for arrays in batch.micro_batches:
            micro_loss, metrics, g = self._grad_step(*arrays)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + micro_loss  # each micro-batch loss is already scaled by its method
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            if len(batch.micro_batches) > 1:
                mx.eval(grads, loss, metric_sums)
        grads, grad_norm = self._clip(grads)
        return grads, grad_norm, loss, metric_sums

    def _apply(self, grads) -> None:
        """The optimizer update as one compiled function over the model's and optimizer's state
        (AdamW on every adapter matrix is thousands of small ops uncompiled)."""
        if self._update is None:
            self.optimizer.init(self.model.trainable_parameters())
            state = [self.model.state, self.optimizer.state]

            @partial(mx.compile, inputs=state, outputs=state)
            def update(grads):
                self.optimizer.update(self.model, grads)

            self._update = update
        self._update(grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)

    def train_step(self) -> dict | None:
        """One optimizer step; None when a non-finite step was skipped."""
        started = time.perf_counter()
        # The RNG (dropout) is a function of (seed, step), so a resumed run draws the same numbers.
        mx.random.seed(self.training.seed * 1_000_003 + self.step)
        batch = self.method.next_step()
        prepared = time.perf_counter()
        grads, grad_norm, loss, metric_sums = self._gradients(batch)
        mx.eval(grads, grad_norm, loss, metric_sums)
        loss_value, norm_value = float(loss), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return self._non_finite(loss_value, norm_value)
        # By global step, not the optimizer's count: a skipped step still moves the schedule.
        self.optimizer.learning_rate = self.rate(self.step)
        self._apply(grads)
        elapsed = time.perf_counter() - started
        n = len(batch.micro_batches)
        out = {"loss": loss_value, "grad_norm": norm_value}
        out.update({k: float(v) / n for k, v in metric_sums.items()})
        out.update(batch.metrics)
        out["learning_rate"] = float(self.optimizer.learning_rate)  # the rate this update applied
        out["step_time"] = elapsed
        out["update_time"] = elapsed - (prepared - started)  # GRPO: without the rollout
        out["tokens_per_second"] = batch.num_tokens / elapsed if elapsed > 0 else 0.0
        return out

    def _non_finite(self, loss_value: float, norm_value: float) -> None:
        what = f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} " \
               f"(loss {loss_value}, grad norm {norm_value}) at step {self.step + 1}"
        if not self.training.skip_non_finite_steps:
            raise non_finite(what, self.output_dir)
        self.skipped_steps += 1
        self.log.write(f"warning: {what}; step skipped (no update)")
        return None

    # Logged as the logging step's own value, not averaged over the steps since the last log line.
    _POINT_METRICS = frozenset({"learning_rate"})

    def _accumulate(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self._values.setdefault(k, []).append(v)
        self._count += 1

    def _flush(self) -> None:
        """Log the steps since the last log line: each metric averaged over them, NaNs left out
        (None when every value was NaN), as TRL's trainers log theirs."""
        if not self._count:
            return
        averaged = {}
        for k, values in self._values.items():
            valid = [v for v in values if not math.isnan(v)]
            if k in self._POINT_METRICS:
                valid = valid[-1:]
            averaged[k] = sum(valid) / len(valid) if valid else None
        averaged["epoch"] = self.method.epoch
        averaged["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        sample = getattr(self.method, "last_sample", None)
        if sample is not None:  # GRPO with log_completions: shown once, at its logging step
            self.method.last_sample = None
        self.log.log(self.step, averaged, sample=sample)
        self._values, self._count = {}, 0

    def _evaluate_now(self) -> bool:
        t = self.training
        if self.evaluation is None or t.eval_strategy == "no":
            return False
        if t.eval_strategy == "epoch":
            per_epoch = math.ceil(self.method.dataset_size / self.method.examples_per_step)
            return self.step % max(1, per_epoch) == 0
        return t.eval_steps > 0 and self.step % t.eval_steps == 0

    def evaluate(self) -> dict:
        """The method's metrics on data.validation, logged as TRL logs them (`eval_*`)."""
        started = time.perf_counter()
        metrics = self.evaluation()
        seconds = time.perf_counter() - started
        rows, batches = metrics.pop("num_samples", 0), metrics.pop("num_batches", 1)
        out = {f"eval_{k}": v for k, v in metrics.items()}
        out.update(eval_runtime=seconds, eval_samples_per_second=rows / seconds if seconds else 0.0,
                   eval_steps_per_second=batches / seconds if seconds else 0.0,
                   epoch=self.method.epoch)
        self.log.log(self.step, out)
        return out

    def state(self) -> dict:
        return {"global_step": self.step, "max_steps": self.total_steps, "epoch": self.method.epoch,
                "method": self.method.name, "data": self.method.state(),
                "skipped_steps": self.skipped_steps,
                "log_history": self.log.history}

    def restore(self, folder: Path) -> None:
        """Continue exactly from a checkpoint: adapter (or model), optimizer, schedule, data order,
        logs (the RNG follows from the step)."""
        state = read_state(folder)
        self.files.read(folder)
        saved = checkpoint.load_optimizer_state(folder)
        if saved is not None:
            self.optimizer.state = saved
            self._update = None  # the compiled update holds the state it was built over
        self.optimizer.init(self.model.trainable_parameters())
        self.method.restore(state["data"])
        self.step = state["global_step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.log.restore(state["log_history"], self.step)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def save_checkpoint(self) -> Path:
        return checkpoint.write_checkpoint(self.output_dir, self.step, self.files, self.optimizer,
                                           self.state(), self.run_record)

    def run(self) -> dict:
        training = self.training
        started, first = time.perf_counter(), self.step
        with StopOnSignal() as stop:
            try:
                while self.step < self.total_steps:
                    metrics = self.train_step()
                    self.step += 1
                    if metrics is not None:
                        self._accumulate(metrics)
                        self._losses.append(metrics["loss"])
                    self.log.advance()
                    self._after_step(stop)
                if training.save_final_model:
                    checkpoint.write_final(self.output_dir, self.files, self.state(), self.run_record)
            finally:
                self.log.close(self._run_summary(time.perf_counter() - started, self.step - first))
        return self.state()

    def _after_step(self, stop) -> None:
        """Log, evaluate, save (transformers' order), then stop on a signal."""
        training = self.training
        if self.step % training.logging_steps == 0 or self.step == self.total_steps \
                or (self.step == 1 and training.logging_first_step):
            self._flush()
        if self._evaluate_now():
            self.evaluate()
        saved = training.save_steps > 0 and self.step % training.save_steps == 0
        if saved:
            self.log.checkpoint(self.step, self.save_checkpoint())
        if stop.signum is not None:
            self._stop(stop.signum, saved)

    def _run_summary(self, seconds: float, steps: int) -> dict:
        """transformers' end-of-training record (its reporters put it in the run summary)."""
        if not steps:
            return {}
        examples = steps * self.method.examples_per_step
        out = {"train_runtime": seconds, "train_samples_per_second": examples / seconds,
               "train_steps_per_second": steps / seconds}
        if self._losses:
            out["train_loss"] = sum(self._losses) / len(self._losses)
        return out

    def _stop(self, signum: int, saved: bool):
        self._flush()
        folder = self.output_dir / f"checkpoint-{self.step}"
        if not saved:
            folder = self.save_checkpoint()
        raise interrupted(signum, self.step, self.total_steps, folder)


def pad_rows(rows: list[list[int]], width: int, pad: int = 0) -> mx.array:
    """Right-pad token rows into an int32 [len(rows), width] array."""
    out = np.full((len(rows), width), pad, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return mx.array(out)
