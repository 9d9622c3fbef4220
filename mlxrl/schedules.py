"""Learning-rate schedules: the `lr_scheduler_type`s of transformers' `get_scheduler`, by update.

Each schedule is a pure function of the 0-based index of the update (`step` 0 is the first
update), the warmup length and the run's total steps, returning the multiplier of
`training.learning_rate`; transformers' `LambdaLR` applies `lambda(0)` at the first update, and so
does the MLX loop, which sets the optimizer's rate from `rate(step)` before each update (so a
skipped non-finite step still advances the schedule, as transformers' scheduler does, and a
resumed run continues from its global step). Both backends log the rate an update applied: the
MLX loop logs `rate(step - 1)` at step `step`, and transformers 5 reads the rate between
`optimizer.step()` and `lr_scheduler.step()`.

`reduce_lr_on_plateau` and `greedy` follow the loss or an eval metric at run time, which the MLX
loop does not feed back; they, unknown types and unknown or missing `lr_scheduler_kwargs` are
refused when the config loads (`check`), not at the first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple


class Shape(NamedTuple):
    warmup: int
    total: int
    peak: float


def _ramp(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _progress(step: int, shape: Shape) -> float:
    return (step - shape.warmup) / max(1, shape.total - shape.warmup)


def _linear(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    return max(0.0, (shape.total - step) / max(1, shape.total - shape.warmup))


def _half_cosine(progress: float, cycles: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress))


def _cosine(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    return max(0.0, _half_cosine(_progress(step, shape), kw.get("num_cycles", 0.5)))


def _cosine_with_restarts(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    progress = _progress(step, shape)
    if progress >= 1.0:
        return 0.0
    within = (kw.get("num_cycles", 1) * progress) % 1.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * within)))


def _polynomial(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    end, power = kw.get("lr_end", 1e-7), kw.get("power", 1.0)
    if step > shape.total:
        return end / shape.peak
    remaining = 1 - (step - shape.warmup) / (shape.total - shape.warmup)
    return ((shape.peak - end) * remaining ** power + end) / shape.peak


def _constant(step, shape, kw):
    return 1.0


def _constant_with_warmup(step, shape, kw):
    return _ramp(step, shape.warmup) if step < shape.warmup else 1.0


def _inverse_sqrt(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    timescale = kw.get("timescale") or shape.warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - shape.warmup) / timescale)


def _min_rate(shape: Shape, kw: dict) -> float:
    return kw["min_lr"] / shape.peak if kw.get("min_lr") is not None else kw["min_lr_rate"]


def _cosine_with_min_lr(step, shape, kw):
    if step < shape.warmup:
        return _ramp(step, shape.warmup)
    floor = _min_rate(shape, kw)
    cosine = _half_cosine(_progress(step, shape), kw.get("num_cycles", 0.5))
    return max(0.0, cosine * (1 - floor) + floor)


def _cosine_warmup_with_min_lr(step, shape, kw):
    """transformers' variant that starts warmup and decay one step later than `cosine_with_min_lr`."""
    if step < shape.warmup:
        start = kw.get("warmup_lr_rate")
        if start is None:
            return (step + 1.0) / max(1.0, shape.warmup)
        return start + (1.0 - start) * step / max(1, shape.warmup - 1)
    floor = _min_rate(shape, kw)
    progress = (step - shape.warmup + 1.0) / max(1.0, shape.total - shape.warmup)
    return max(0.0, _half_cosine(progress, kw.get("num_cycles", 0.5)) * (1 - floor) + floor)


_WSD_SHAPES = {
    "linear": (lambda p: p, lambda p: 1.0 - p),
    "cosine": (lambda p: 0.5 * (1.0 - math.cos(math.pi * p)), None),
    "1-sqrt": (lambda p: 1.0 - math.sqrt(1.0 - p), lambda p: 1.0 - math.sqrt(p)),
}


def _warmup_stable_decay(step, shape, kw):
    floor, decay = kw.get("min_lr_ratio", 0.0), kw["num_decay_steps"]
    stable = kw.get("num_stable_steps")
    stable = shape.total - shape.warmup - decay if stable is None else stable
    if step < shape.warmup:
        rise = _WSD_SHAPES[kw.get("warmup_type", "linear")][0]
        return max(0.0, rise(_ramp(step, shape.warmup)) * (1.0 - floor) + floor)
    if step < shape.warmup + stable:
        return 1.0
    if step < shape.warmup + stable + decay:
        progress = (step - shape.warmup - stable) / max(1, decay)
        kind = kw.get("decay_type", "cosine")
        fall = _WSD_SHAPES[kind][1]
        value = _half_cosine(progress, kw.get("num_cycles", 0.5)) if fall is None else fall(progress)
        return max(0.0, value * (1.0 - floor) + floor)
    return floor


class Schedule(NamedTuple):
    factor: Callable[[int, Shape, dict], float]
    kwargs: frozenset  # the lr_scheduler_kwargs transformers accepts for this type


_MIN_LR = frozenset({"num_cycles", "min_lr", "min_lr_rate"})
SCHEDULES: dict[str, Schedule] = {
    "linear": Schedule(_linear, frozenset()),
    "cosine": Schedule(_cosine, frozenset({"num_cycles"})),
    "cosine_with_restarts": Schedule(_cosine_with_restarts, frozenset({"num_cycles"})),
    "polynomial": Schedule(_polynomial, frozenset({"lr_end", "power"})),
    "constant": Schedule(_constant, frozenset()),
    "constant_with_warmup": Schedule(_constant_with_warmup, frozenset()),
    "inverse_sqrt": Schedule(_inverse_sqrt, frozenset({"timescale"})),
    "cosine_with_min_lr": Schedule(_cosine_with_min_lr, _MIN_LR),
    "cosine_warmup_with_min_lr": Schedule(_cosine_warmup_with_min_lr, _MIN_LR | {"warmup_lr_rate"}),
    "warmup_stable_decay": Schedule(_warmup_stable_decay, frozenset(
        {"num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"})),
}
# transformers ignores lr_scheduler_kwargs for these two (it never passes them on)
_KWARGS_IGNORED = {"constant", "constant_with_warmup"}
_REFUSED = {"reduce_lr_on_plateau": "it steps on an eval metric, which mlxrl's schedules do not follow",
            "greedy": "it adapts to the loss at run time, which only transformers' Trainer feeds it"}


def check(kind: str, kwargs: dict, peak: float) -> None:
    """ValueError (one line) for a type or lr_scheduler_kwargs that transformers would refuse or
    that MLX cannot run; called when the config loads."""
    if kind in _REFUSED:
        raise ValueError(f"lr_scheduler_type {kind!r} is not supported: {_REFUSED[kind]}; "
                         f"use one of {', '.join(SCHEDULES)}")
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type {kind!r} is not one of {', '.join(SCHEDULES)}")
    kwargs = kwargs or {}
    unknown = sorted(set(kwargs) - SCHEDULES[kind].kwargs)
    if unknown and kind not in _KWARGS_IGNORED:
        allowed = ", ".join(sorted(SCHEDULES[kind].kwargs)) or "none"
        raise ValueError(f"lr_scheduler_kwargs {unknown} do not apply to {kind!r} (it takes: {allowed})")
    if "min_lr" in SCHEDULES[kind].kwargs and (kwargs.get("min_lr") is None) == (kwargs.get("min_lr_rate") is None):
        raise ValueError(f"lr_scheduler_type {kind!r} needs exactly one of lr_scheduler_kwargs.min_lr "
                         f"and lr_scheduler_kwargs.min_lr_rate")
    if kind == "polynomial" and not peak > kwargs.get("lr_end", 1e-7):
        raise ValueError(f"lr_scheduler_kwargs.lr_end ({kwargs.get('lr_end', 1e-7)}) must be below "
                         f"learning_rate ({peak})")
    if kind == "warmup_stable_decay":
        if "num_decay_steps" not in kwargs:
            raise ValueError("lr_scheduler_type 'warmup_stable_decay' needs lr_scheduler_kwargs.num_decay_steps")
        for key in ("warmup_type", "decay_type"):
            if kwargs.get(key, "linear") not in _WSD_SHAPES:
                raise ValueError(f"lr_scheduler_kwargs.{key} must be one of {', '.join(_WSD_SHAPES)}")


def warmup_steps(training, total_steps: int) -> int:
    """transformers' `get_warmup_steps`: `warmup_steps`, else ceil(warmup_ratio x total steps)."""
    if training.warmup_steps is not None:
        return int(training.warmup_steps)
    return math.ceil((training.warmup_ratio or 0.0) * total_steps)


def rate_fn(training, total_steps: int) -> Callable[[int], float]:
    """`rate(step)`: the learning rate of the update with 0-based index `step`."""
    kind = training.lr_scheduler_type
    kwargs = dict(training.lr_scheduler_kwargs or {})
    check(kind, kwargs, training.learning_rate)
    shape = Shape(warmup_steps(training, total_steps), total_steps, training.learning_rate)
    factor = SCHEDULES[kind].factor
    return lambda step: training.learning_rate * factor(step, shape, kwargs)
