"""GRPO's `num_iterations` (TRL's μ) on MLX: each rollout batch serves μ optimizer steps.

As TRL does: the batch is sampled, scored and its advantages fixed once; the log-probs of the
policy that sampled it (`old_logps`, a forward pass right after sampling, before any update on
it) are stored with it; then μ optimizer steps run on the same micro-batches. The first step's
ratio `exp(logp - old_logp)` is 1; later steps see the updated policy, so epsilon's clipping
takes effect. With μ = 1 nothing here runs (old = stop_gradient(logp), as before).

A checkpoint inside a cycle stores the cached batch in the trainer state, so a resumed run
continues with the same batch and old log-probs.
"""

from __future__ import annotations

import mlx.core as mx

from mlxrl.mlx.logprobs import per_token_logps, scored_from
from mlxrl.mlx.trainer import StepBatch

_DTYPES = {"int32": mx.int32, "float32": mx.float32}


class RolloutReuse:
    def __init__(self, method, iterations: int):
        self.method, self.iterations = method, iterations
        self.steps = 0  # optimizer steps taken
        self.cached: StepBatch | None = None

    def next_step(self) -> StepBatch:
        if self.steps % self.iterations == 0 or self.cached is None:
            batch = self.method.rollout_step()
            batch.micro_batches = [(*arrays, self._old_logps(*arrays[:2])) for arrays in batch.micro_batches]
            self.cached = batch
        self.steps += 1
        return self.cached

    def _old_logps(self, input_ids: mx.array, mask: mx.array) -> mx.array:
        logps = mx.stop_gradient(per_token_logps(self.method.model, input_ids, self.method.settings.temperature,
                                                 scored_from(input_ids, mask)))
        mx.eval(logps)
        return logps

    def state(self) -> dict:
        inside = self.steps % self.iterations != 0 and self.cached is not None
        return {"steps": self.steps, "cached": _to_json(self.cached) if inside else None}

    def restore(self, state: dict) -> None:
        self.steps = state["steps"]
        self.cached = _from_json(state["cached"]) if state.get("cached") else None


def _to_json(batch: StepBatch) -> dict:
    micro = [[_array_to_json(a) for a in arrays] for arrays in batch.micro_batches]
    return {"micro_batches": micro, "metrics": batch.metrics, "num_tokens": batch.num_tokens}


def _from_json(saved: dict) -> StepBatch:
    micro = [tuple(_array_from_json(a) for a in arrays) for arrays in saved["micro_batches"]]
    return StepBatch(micro, saved["metrics"], saved["num_tokens"])


def _array_to_json(a) -> dict:
    """An array, or a tuple of them (rows that share prompts, `shared_prefix`)."""
    if isinstance(a, tuple):
        return {"tuple": [_array_to_json(x) for x in a]}
    return {"dtype": str(a.dtype).split(".")[-1], "shape": list(a.shape), "data": a.reshape(-1).tolist()}


def _array_from_json(saved: dict):
    if "tuple" in saved:
        return tuple(_array_from_json(x) for x in saved["tuple"])
    return mx.array(saved["data"], dtype=_DTYPES[saved["dtype"]]).reshape(saved["shape"])
