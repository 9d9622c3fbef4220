"""Reward functions: resolving names (registered, `module:function`, `file.py:function`) and
scoring a batch. The functions themselves live with their tasks (`mlxrl/tasks/`).

A reward function has TRL's signature, so one file serves the MLX and the TRL backends:

    fn(prompts, completions, completion_ids=..., **columns) -> list[float | None]

`completions` are strings (standard data) or `[{"role": "assistant", "content": text}]`
(conversational data); `columns` are the dataset's other columns, one value per completion.
`None` (or NaN) means "no opinion": that function's reward is missing for that completion, as in
TRL (the others' weighted sum stands; with none, its advantage is 0). An infinite reward is an
error naming the function.

In a config, `training.reward_functions` names each function as one of:
- a registered name (Oumi's `count_letters`, `countdown`, `gsm8k`, `soft_20tokens_completions`,
  ..., mlxrl's `letter_count`, or one a task registers with `mlxrl.tasks.register_reward`),
- `package.module:function` (imported when named),
- `path/to/file.py:function` (relative paths from the working directory, then from `base_dir`,
  the config's folder).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mlxrl import tasks
from mlxrl.errors import RewardError

register = tasks.register_reward  # decorator: make `fn` available as `name` in reward_functions


def registered_names() -> list[str]:
    return tasks.reward_names()


# ----------------------------------------------------------------------------- resolving names


def _import_from_file(file_part: str, base_dir: Path | None) -> object:
    candidates = [Path(file_part)]
    if base_dir is not None and not Path(file_part).is_absolute():
        candidates.append(Path(base_dir) / file_part)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RewardError(f"reward file not found: {file_part}")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    mod_name = f"mlxrl_user_rewards_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardError(f"importing reward file {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise RewardError(
            f"cannot import reward module {module_name!r}: {type(e).__name__}: {e}"
        ) from e


def get_reward(name: str, base_dir: str | Path | None = None) -> Callable:
    """The function for a registered name, `module:function` or `path/to/file.py:function`.

    A dotted `package.module.function` (TRL's form) also works when it is not registered.
    """
    registered = tasks.reward(name)
    if registered is not None:
        return registered
    if ":" in name:
        where, func_name = name.rsplit(":", 1)
        is_file = where.endswith(".py") or "/" in where or "\\" in where
        base = Path(base_dir) if base_dir is not None else None
        module = _import_from_file(where, base) if is_file else _import_module(where)
    elif "." in name:
        where, func_name = name.rsplit(".", 1)
        module = _import_module(where)
    else:
        raise RewardError(
            f"unknown reward function {name!r}; registered: {', '.join(registered_names())}; "
            "or name your own as module:function or path/to/file.py:function"
        )
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"reward function {func_name!r} not found in {where}")
    return fn


# ----------------------------------------------------------------------------- scoring


def _accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
    """All of `kwargs` if `fn` takes **kwargs, else only the names it declares."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def _to_floats(name: str, values, n: int) -> list[float]:
    if not isinstance(values, Iterable) or isinstance(values, (str, bytes, Mapping)):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, "
                          f"expected a list of {n} numbers")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for "
                          f"{n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) or (isinstance(v, np.ndarray) and v.ndim == 0):
            if math.isinf(float(v)):
                raise RewardError(f"reward function {name!r} returned {float(v)} at index {i}; rewards "
                                  f"must be finite (None or NaN means no reward for that completion)")
            out.append(float(v))
        else:
            raise RewardError(f"reward function {name!r} returned {v!r} "
                              f"({type(v).__name__}) at index {i}; expected a number or None")
    return out


class RewardSet:
    """The configured reward functions, their fixed keyword arguments and weights."""

    def __init__(self, names: list[str], fns: list[Callable], kwargs: list[dict],
                 weights: list[float]):
        self.names = names
        self.fns = fns
        self.kwargs = kwargs
        self.weights = np.asarray(weights, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.fns)

    def score(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence,
              columns: Mapping[str, Sequence] | None = None) -> np.ndarray:
        """`[N, F]` float64 rewards; None -> NaN. Raises RewardError naming a failing function."""
        n = len(completions)
        base = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        out = np.empty((n, len(self.fns)), dtype=np.float64)
        for j, (name, fn, fixed) in enumerate(zip(self.names, self.fns, self.kwargs)):
            call_kwargs = _accepted_kwargs(fn, {**base, **(columns or {}), **fixed})
            try:
                values = fn(**call_kwargs)
            except Exception as e:
                raise RewardError(
                    f"reward function {name!r} raised {type(e).__name__}: {e}"
                ) from e
            out[:, j] = _to_floats(name, values, n)
        return out

    def total(self, scores: np.ndarray) -> np.ndarray:
        """`[N]` weighted sum over functions, ignoring NaN; NaN where every function gave None."""
        weighted = np.asarray(scores, dtype=np.float64) * self.weights[None, :]
        total = np.nansum(weighted, axis=1)
        total[np.all(np.isnan(weighted), axis=1)] = np.nan
        return total


def _display_name(name: str, fn: Callable) -> str:
    """The name used for `rewards/<name>/mean`: the config name, or the function's own name."""
    if tasks.reward(name) is not None:
        return name
    return getattr(fn, "__name__", name.rsplit(":", 1)[-1])


def load_rewards(names: Sequence[str], kwargs: Mapping | None = None,
                 weights: Sequence[float] | None = None,
                 base_dir: str | Path | None = None) -> RewardSet:
    """Resolve `names` (training.reward_functions) into a RewardSet.

    `kwargs` is Oumi's `reward_function_kwargs`: `{function name: {arg: value}}`; configured
    values override dataset columns of the same name. `weights` default to 1.0 each.
    """
    names = [n for n in (names or []) if n]
    if not names:
        raise RewardError("no reward functions configured (training.reward_functions is empty)")
    kwargs = dict(kwargs or {})
    for key, value in kwargs.items():
        if key not in names:
            raise RewardError(f"reward_function_kwargs has key {key!r}, which is not in "
                              f"reward_functions {names}; key it by function name")
        if not isinstance(value, Mapping):
            raise RewardError(f"reward_function_kwargs[{key!r}] must be a mapping of "
                              f"argument: value, got {type(value).__name__}")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise RewardError(f"{len(weights)} reward weights for {len(names)} reward functions")
    fns = [get_reward(n, base_dir) for n in names]
    display = [_display_name(n, f) for n, f in zip(names, fns)]
    display = [d if display.count(d) == 1 else n for d, n in zip(display, names)]
    return RewardSet(display, fns, [dict(kwargs.get(n, {})) for n in names],
                     [float(w) for w in weights])
