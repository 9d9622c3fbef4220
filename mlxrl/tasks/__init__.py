"""Tasks: datasets, reward functions, system prompts and evaluations, registered under names.

A config names what it uses: `data.train.datasets[].dataset_name`, `training.reward_functions`,
`mlxrl infer --system-prompt NAME`, `mlxrl eval --task NAME`. Each name is looked up here. The
built-in tasks register themselves through the same functions a user's own task calls:

- `mlxrl.tasks.letter_count`: Oumi's letter-count task (dataset, rewards, eval, system prompt);
- `mlxrl.tasks.oumi`: the hub datasets Oumi's recipes train on and Oumi's reward functions;
- `mlxrl.tasks.chat_formats`: common row formats (alpaca, ShareGPT, preference conversations),
  recognised by their columns.

A user's task is a Python module (or `.py` file) that calls `register_dataset`,
`register_reward`, ... at import. mlxrl imports it when it is named in the environment variable
`MLXRL_TASKS` (comma-separated module names or file paths), or when an installed package declares
it under the entry-point group `mlxrl.tasks`; in Python, importing it is enough. See
docs/internals.md ("Your own task") for an example.

A dataset entry's transform turns one raw row into what the trainer reads (`messages`, `prompt`
+ `completion`, `prompt` + `chosen` + `rejected`, or a GRPO `prompt` plus the columns its reward
functions take). It applies to a dataset named by one of the entry's names, and to any other
dataset (a local file, an unregistered hub name) whose first row has the entry's raw columns.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mlxrl.errors import ConfigError

BUILTIN_MODULES = ("mlxrl.tasks.chat_formats", "mlxrl.tasks.letter_count", "mlxrl.tasks.oumi")
ENTRY_POINT_GROUP = "mlxrl.tasks"
ENV_VAR = "MLXRL_TASKS"


@dataclass
class DatasetEntry:
    """A registered dataset format: which rows it recognises and how it transforms them."""

    name: str
    transform: Callable[..., dict]
    columns: frozenset[str]  # a raw row has all of these
    accepts: Callable[[dict], bool] | None = None  # a finer check of a raw row
    names: tuple[str, ...] = ()  # hub names (and aliases) that select it
    preview: Callable[[dict], list[str] | None] | None = None  # `mlxrl data inspect` lines
    detect: bool = True  # also applied to unnamed data whose rows match

    def is_raw(self, row: dict) -> bool:
        return self.columns <= set(row) and (self.accepts is None or bool(self.accepts(row)))

    def options(self) -> set[str]:
        """Keyword arguments the transform takes (`dataset_kwargs` entries that reach it)."""
        params = list(inspect.signature(self.transform).parameters.values())[1:]
        return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass
class Evaluation:
    """A registered eval task: metrics of a model's answers, and rows to use without a dataset."""

    name: str
    score: Callable[[list[dict], list[str]], tuple[dict, list[dict]]]
    generate: Callable[[int, int], list[dict]] | None = None  # (n, seed) -> raw rows
    aliases: tuple[str, ...] = ()


@dataclass
class _Registry:
    datasets: list[DatasetEntry] = field(default_factory=list)
    rewards: dict[str, Callable] = field(default_factory=dict)
    system_prompts: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    loaded: bool = False


_REGISTRY = _Registry()


# ----------------------------------------------------------------------------- registering


def register_dataset(name: str, *, columns: Iterable[str], accepts: Callable[[dict], bool] | None = None,
                     aliases: Iterable[str] = (), preview: Callable[[dict], list[str] | None] | None = None,
                     detect: bool = True) -> Callable:
    """Decorator: `transform(row, *, option=...) -> dict` is applied to the rows of dataset
    `name` (and `aliases`) and of other data whose rows have all of `columns` (and pass
    `accepts`). Keyword-only parameters of the transform are set from `dataset_kwargs`.
    `preview(transformed_row)` returns the lines `mlxrl data inspect` prints, or None."""

    def deco(transform: Callable[..., dict]) -> Callable[..., dict]:
        entry = DatasetEntry(name, transform, frozenset(columns), accepts, (name, *aliases), preview,
                             detect)
        _REGISTRY.datasets[:] = [d for d in _REGISTRY.datasets if d.name != name] + [entry]
        return transform

    return deco


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn(prompts, completions, **columns) -> list[float | None]` available as
    `name` in `training.reward_functions`."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY.rewards[name] = fn
        return fn

    return deco


def register_system_prompt(name: str, text: str) -> None:
    """`mlxrl infer --system-prompt NAME` (and `compare`) use `text`."""
    _REGISTRY.system_prompts[name] = text


def register_evaluation(name: str, *, generate: Callable[[int, int], list[dict]] | None = None,
                        aliases: Iterable[str] = ()) -> Callable:
    """Decorator: `score(rows, responses) -> (metrics, samples)` becomes `mlxrl eval --task NAME`.
    `generate(n, seed)` gives rows to evaluate on when no dataset is named."""

    def deco(score: Callable) -> Callable:
        evaluation = Evaluation(name, score, generate, tuple(aliases))
        for key in (name, *aliases):
            _REGISTRY.evaluations[key] = evaluation
        return score

    return deco


# ----------------------------------------------------------------------------- looking up


def dataset_named(name: str | None) -> DatasetEntry | None:
    load_plugins()
    return next((d for d in _REGISTRY.datasets if name in d.names), None)


def datasets_matching(row: dict) -> list[DatasetEntry]:
    """The detectable entries whose raw columns `row` has (normally none or one)."""
    load_plugins()
    return [d for d in _REGISTRY.datasets if d.detect and d.is_raw(row)]


def preview(row: dict) -> list[str] | None:
    """Lines showing a transformed row, from the first entry whose preview takes it."""
    load_plugins()
    for entry in _REGISTRY.datasets:
        lines = entry.preview(row) if entry.preview is not None else None
        if lines:
            return lines
    return None


def dataset_names() -> list[str]:
    load_plugins()
    return sorted(n for d in _REGISTRY.datasets for n in d.names)


def reward(name: str) -> Callable | None:
    load_plugins()
    return _REGISTRY.rewards.get(name)


def reward_names() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY.rewards)


def system_prompt(name: str | None) -> str | None:
    load_plugins()
    return _REGISTRY.system_prompts.get(name) if name else None


def evaluation(name: str) -> Evaluation | None:
    load_plugins()
    return _REGISTRY.evaluations.get(name)


def evaluation_names() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY.evaluations)


# ----------------------------------------------------------------------------- plug-ins


def load_plugins() -> None:
    """Import the built-in tasks, installed `mlxrl.tasks` entry points and `$MLXRL_TASKS` (once)."""
    if _REGISTRY.loaded:
        return
    _REGISTRY.loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        _import(point.value, f"entry point {point.name!r}")
    for item in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(","))):
        _import(item, f"${ENV_VAR}")


def _import(spec: str, origin: str) -> None:
    """A module name (`my_pkg.tasks`) or a file (`path/to/task.py`)."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{origin}: task file not found: {spec}")
            name = f"mlxrl_task_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's module can fail in any way; say which
        raise ConfigError(f"{origin}: importing task {spec!r} failed: {type(e).__name__}: {e}") from None
