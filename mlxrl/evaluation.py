"""Evaluation after training: letter counting, preference accuracy, mean rewards.

    mlxrl eval --model.model_name output/learn_grpo/checkpoint-30            # letter_count
    mlxrl eval --model.model_name output/learn_dpo --task preference --dataset pairs.jsonl
    mlxrl eval --model.model_name CKPT --task reward --reward count_letters --output DIR

Tasks (`--task`, or `tasks:` in a config, Oumi's `EvaluationConfig` shape):
- `letter_count` (Oumi's `count_letters`, registered by `mlxrl.tasks.letter_count`): greedy
  answers to letter-count prompts (with the `\\boxed{}` system prompt); an answer is exactly one
  `\\boxed{int}`. Metrics, as Oumi's: `accuracy` = correct / all, `properly_extracted_accuracy`
  = correct / parsed (0 if none), `num_samples`, `num_correct_answers`, `num_incorrect_answers`,
  `num_invalid_answers`. Any task registered with `mlxrl.tasks.register_evaluation` runs the same way.
- `preference`: on held-out pairs, the policy against its adapter-off reference (a full
  fine-tune's folder: the model its run started from, named in its `mlxrl_run.json`) (TRL's DPO
  metrics): `preference_accuracy` (pairs whose chosen reward beats the rejected one),
  `mean_reward_margin`, `mean_reward_chosen`, `mean_reward_rejected`, `loss`, `num_pairs`.
- `reward`: the mean (and std) of each reward function over the model's answers to the prompts.

Datasets: a hub name or a local file (`--dataset`, `--split`), transformed as registered
(`mlxrl.tasks`: raw letter-count rows are recognised by their columns). Without one, a generated held-out set (seed 1234) is used, so eval runs offline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxrl import config_ranges
from mlxrl.config import DatasetParams, GenerationParams, ModelParams, load_config
from mlxrl.errors import ConfigError

logger = logging.getLogger(__name__)

BUILTIN_TASKS = {"preference": "preference", "dpo": "preference", "reward": "reward",
                 "rewards": "reward"}
EVAL_SEED = 1234  # generated sets: distinct from the seeds the quickstart data uses
DEFAULT_SAMPLES = {"preference": 64}
DEFAULT_SAMPLE_COUNT = 200


def task_kind(name: str) -> str:
    """'preference', 'reward', or the name of a registered evaluation (`mlxrl.tasks`)."""
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    from mlxrl import tasks

    found = tasks.evaluation(name)
    if found is None:
        raise ValueError(f"task_name {name!r} is not one of "
                         f"{sorted([*BUILTIN_TASKS, *tasks.evaluation_names()])}")
    return found.name


@dataclass
class EvalTaskParams:
    task_name: str = "letter_count"
    dataset_name: str | None = None
    dataset_path: str | None = None
    split: str = "train"
    num_samples: int | None = None
    reward_functions: list[str] | None = None
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    beta: float = 0.1
    evaluation_backend: str | None = None  # Oumi's; every task here runs on MLX
    eval_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        task_kind(self.task_name)
        config_ranges.check(self)

    @property
    def task(self) -> str:
        return task_kind(self.task_name)


@dataclass
class EvalConfig:
    model: ModelParams = field(default_factory=ModelParams)
    generation: GenerationParams = field(default_factory=GenerationParams)
    tasks: list[EvalTaskParams] = field(default_factory=list)
    output_dir: str | None = None
    run_name: str | None = None
    enable_wandb: bool = False
    inference_engine: str | None = None
    inference_remote_params: dict[str, Any] = field(default_factory=dict)


def load_eval_config(path=None, overrides=None) -> EvalConfig:
    cfg = load_config(path, overrides, cls=EvalConfig)
    if not cfg.model.model_name:
        raise ConfigError("model.model_name is required (-c CONFIG or --model.model_name NAME)")
    return cfg


# ----------------------------------------------------------------------------- datasets


def task_rows(task: EvalTaskParams) -> list[dict]:
    """The task's rows: its dataset (first num_samples rows, transformed as registered) or a
    generated held-out set."""
    n = task.num_samples
    if task.dataset_name or task.dataset_path:
        from mlxrl.data.loading import load_one

        params = DatasetParams(dataset_name=task.dataset_name, dataset_path=task.dataset_path,
                               split=task.split)
        dataset = load_one(params, where=f"{task.task_name} dataset")
        return [dict(r) for r in dataset.select(range(min(n or len(dataset), len(dataset))))]
    n = n or DEFAULT_SAMPLES.get(task.task, DEFAULT_SAMPLE_COUNT)
    rows = _generated(task.task, n)
    logger.warning(f"note: {task.task}: {n} generated held-out rows (seed {EVAL_SEED}); "
        f"--dataset NAME for another set")
    return rows


def _generated(task: str, n: int) -> list[dict]:
    """Held-out rows without a dataset: preference pairs, or the task's own generator (the
    `reward` task scores answers to letter-count prompts)."""
    from mlxrl import tasks

    if task == "preference":
        from mlxrl.data.synthetic import preference_rows

        return preference_rows(n, seed=EVAL_SEED)
    found = tasks.evaluation("letter_count" if task == "reward" else task)
    if found is None or found.generate is None:
        raise ConfigError(f"eval task {task!r} generates no rows; name a dataset (--dataset)")
    return found.generate(n, EVAL_SEED)


# ----------------------------------------------------------------------------- metrics


def reward_metrics(task: EvalTaskParams, rows: list[dict], responses: list[str], tokenizer) -> dict:
    """Mean and std of each reward function over the responses (TRL's reward contract)."""
    from mlxrl.reward_metrics import reward_metrics as trl_reward_metrics
    from mlxrl.rewards import load_rewards

    names = task.reward_functions or ["count_letters", "letter_count"]
    rewards = load_rewards(names, task.reward_function_kwargs)
    conversational = isinstance(rows[0].get("prompt"), list)
    completions = [[{"role": "assistant", "content": r}] for r in responses] if conversational \
        else responses
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in ("prompt", "completion")}
    scores = rewards.score([row.get("prompt") for row in rows], completions, ids, columns)
    out = trl_reward_metrics(rewards.names, scores, rewards.total(scores))  # as GRPO logs them
    out = {k: None if v != v else v for k, v in out.items()}  # NaN (no value) -> null, as TRL's log
    out["num_samples"] = len(rows)
    return out


def preference_metrics(engine, task: EvalTaskParams, rows: list[dict]) -> dict:
    """Held-out pairs: the model against the same model with its adapter off, or a full
    fine-tune against the model its run started from."""
    import datasets

    from mlxrl.config import DpoSettings
    from mlxrl.mlx.dpo import preference_eval

    reference = None
    if engine.loaded.adapter_path is None:
        reference = _full_finetune_start(engine.loaded.base_path)
        if reference is None:
            logger.warning(f"note: {engine.name} has no adapter: policy == reference, so margins are 0")
    settings = DpoSettings(beta=task.beta, max_length=engine.model_params.model_max_length or 1024)
    m = preference_eval(engine.loaded.model, engine.tokenizer, datasets.Dataset.from_list(rows), settings,
                        reference=reference)
    return {"preference_accuracy": m["rewards/accuracies"], "mean_reward_margin": m["rewards/margins"],
            "mean_reward_chosen": m["rewards/chosen"], "mean_reward_rejected": m["rewards/rejected"],
            "loss": m["loss"], "num_pairs": m["num_pairs"]}


def _full_finetune_start(folder: Path):
    """The model a full fine-tune (`training.use_peft: false`) in `folder` started from, loaded
    as its run loaded it; None when `folder` is not one or that model cannot be loaded (noted)."""
    from mlxrl.errors import MlxrlError
    from mlxrl.mlx import model as mlx_model
    from mlxrl.run_plan import read_record

    config = (read_record(folder) or {}).get("config") or {}
    section = config.get("model") or {}
    if (config.get("training") or {}).get("use_peft", True) or not section.get("model_name"):
        return None
    names = {f.name for f in dataclasses.fields(ModelParams)}
    try:
        start = ModelParams(**{k: v for k, v in section.items() if k in names})
        return mlx_model.load(start).model
    except MlxrlError as e:
        logger.warning(f"note: the reference of a full fine-tune is the model it started from, "
                       f"{section['model_name']}, which cannot be loaded here ({e})")
        return None


# ----------------------------------------------------------------------------- running


class Evaluator:
    """Runs tasks on one model; answers to the same prompts are generated once."""

    def __init__(self, cfg: EvalConfig, engine=None):
        from mlxrl.capabilities import check_inference
        from mlxrl.inference import Engine

        self.cfg = cfg
        for line in check_inference(cfg.generation):
            logger.warning(line)
        self.engine = engine or Engine(cfg.model, cfg.generation)
        self._answers: dict[str, tuple[list[dict], list[str]]] = {}

    def answers(self, task: EvalTaskParams) -> tuple[list[dict], list[str]]:
        from mlxrl.inference import as_messages

        key = json.dumps([task.dataset_name, task.dataset_path, task.split, task.num_samples])
        if key not in self._answers:
            rows = task_rows(task)
            conversations = [as_messages(r, where=f"row {i}") for i, r in enumerate(rows)]
            self._answers[key] = (rows, self.engine.generate(conversations, progress=True))
        return self._answers[key]

    def run_task(self, task: EvalTaskParams) -> tuple[dict, list[dict]]:
        """(metrics, per-row samples) of one task."""
        from mlxrl import tasks

        if task.task == "preference":
            return preference_metrics(self.engine, task, task_rows(task)), []
        rows, responses = self.answers(task)
        if task.task == "reward":
            return reward_metrics(task, rows, responses, self.engine.hf_tokenizer), []
        return tasks.evaluation(task.task).score(rows, responses)

    def run(self) -> dict:
        tasks = self.cfg.tasks or [EvalTaskParams()]
        results: dict[str, dict] = {}
        samples: dict[str, list] = {}
        started = time.perf_counter()
        for task in tasks:
            metrics, rows = self.run_task(task)
            name = task.task if task.task not in results else f"{task.task}_{len(results)}"
            results[name], samples[name] = metrics, rows
        out = {"model": self.cfg.model.model_name, "tasks": results,
               "generation": dataclasses.asdict(self.cfg.generation),
               "seconds": round(time.perf_counter() - started, 2)}
        if self.cfg.output_dir:
            write_results(Path(self.cfg.output_dir), out, samples)
        return out


def write_results(folder: Path, results: dict, samples: dict[str, list]) -> Path:
    """`eval_results.json` and `<task>_samples.jsonl` in `folder`, each replaced whole."""
    from mlxrl.output_folder import write_text_atomic

    path = folder / "eval_results.json"
    for name, rows in samples.items():
        if rows:
            write_text_atomic(folder / f"{name}_samples.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")
    return path


def format_table(results: list[dict], labels: list[str] | None = None) -> str:
    """Metrics of one or more models, one column each, one row per task/metric."""
    labels = labels or [r["model"] for r in results]
    keys: list[tuple[str, str]] = []
    for r in results:
        for task, metrics in r["tasks"].items():
            keys += [(task, m) for m in metrics if (task, m) not in keys]
    width = max([len(f"{t}  {m}") for t, m in keys] + [6])
    cols = [max(10, len(label)) for label in labels]
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{lb:>{c}}" for lb, c in zip(labels, cols))]
    for task, metric in keys:
        cells = [_cell(r["tasks"].get(task, {}).get(metric)) for r in results]
        lines.append(f"{task + '  ' + metric:<{width}}  " +
                     "  ".join(f"{v:>{c}}" for v, c in zip(cells, cols)))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def make_tasks(tasks=("letter_count",), *, dataset=None, dataset_path=None, split=None,
               num_samples=None, reward_functions=None) -> list[EvalTaskParams]:
    """EvalTaskParams for task names with shared dataset options."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out = []
    for name in tasks:
        try:
            out.append(EvalTaskParams(task_name=name, dataset_name=dataset, dataset_path=dataset_path,
                                      split=split or "train", num_samples=num_samples,
                                      reward_functions=list(reward_functions) if reward_functions else None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out


def evaluate(model: str | None = None, tasks=("letter_count",), *, config=None, dataset=None,
             dataset_path=None, split=None, num_samples=None, reward_functions=None,
             output_dir=None, overrides=None, **generation) -> dict:
    """Evaluate `model` (hub id, folder, checkpoint or tiny://) on `tasks`; returns
    `{"model", "tasks": {task: metrics}, ...}` and writes it to `output_dir` when given.

    `tasks`: names from `letter_count`, `preference`, `reward` (used when `config` has none);
    `config`: an EvalConfig or YAML path; `**generation`: `GenerationParams` fields.
    """
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(
        config, (["--model.model_name", model] if model else []) + list(overrides or []))
    if model:
        cfg.model = dataclasses.replace(cfg.model, model_name=model)
    if not cfg.tasks:
        cfg.tasks = make_tasks(tasks, dataset=dataset, dataset_path=dataset_path, split=split,
                               num_samples=num_samples, reward_functions=reward_functions)
    cfg.generation = dataclasses.replace(cfg.generation, **generation)
    if output_dir:
        cfg.output_dir = str(output_dir)
    return Evaluator(cfg).run()


def compare_models(models: list[str], prompts: list, *, overrides=None, system_prompt=None,
                   tasks=(), num_samples=None, output=None, echo=print) -> dict:
    """Each model's replies to the same prompts (and its eval metrics), printed side by side."""
    from mlxrl.inference import (
        Engine,
        as_messages,
        load_inference_config,
        load_model,
        system_prompt_text,
    )

    system = system_prompt_text(system_prompt)
    conversations = [as_messages(p, system, f"prompt {i}") for i, p in enumerate(prompts)]
    labels = [f"{chr(65 + i)}" if i < 26 else str(i) for i in range(len(models))]
    answers, results = [], []
    for label, name in zip(labels, models):
        cfg, notes = load_inference_config(None, ["--model.model_name", name, *(overrides or [])])
        logger.info(f"[{label}] {name}")
        engine = Engine(cfg.model, cfg.generation, loaded=load_model(cfg.model, cache=False))
        answers.append(engine.generate(conversations))
        if tasks:
            eval_cfg = EvalConfig(model=cfg.model, generation=cfg.generation,
                                  tasks=make_tasks(tasks, num_samples=num_samples))
            results.append(Evaluator(eval_cfg, engine=engine).run())
    for i, messages in enumerate(conversations):
        echo(f"=== prompt {i + 1}: {messages[-1]['content']}")
        for label, name, replies in zip(labels, models, answers):
            echo(f"[{label}] {name}:\n    " + replies[i].strip().replace("\n", "\n    "))
    if results:
        echo(format_table(results, [f"[{lb}]" for lb in labels]))
    out = {"models": list(models), "prompts": [c[-1]["content"] for c in conversations],
           "answers": {name: a for name, a in zip(models, answers)}, "metrics": results}
    if output:
        from mlxrl.output_folder import write_text_atomic

        write_text_atomic(Path(output) / "compare.json", json.dumps(out, indent=2) + "\n")
        logger.info(f"wrote {Path(output) / 'compare.json'}")
    return out

