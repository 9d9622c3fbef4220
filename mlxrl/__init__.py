"""mlxrl: DPO, GRPO and SFT with LoRA on MLX, with a PyTorch/TRL backend for CUDA.

The Python API (imports are lazy: `import mlxrl` stays light):

    from mlxrl import infer, train, evaluate

    train("configs/quickstart/sft.yaml", ["--training.max_steps", "50"])
    infer("How many 'r's are in 'strawberry'?", "output/quickstart_sft", system_prompt="letter_count")
    evaluate("output/quickstart_sft", ["letter_count", "preference"], num_samples=100)

Messages go to the `mlxrl` logger (standard `logging`): a program with its own logging set-up
gets them through it; otherwise these functions print them as plain lines on stderr while they
run (`mlxrl.console.api_logging`). The root logger is never configured.

Importing mlxrl changes nothing in the process. `train`, `infer` and `evaluate` do the set-up MLX
needs (`mlxrl.runtime.mlx_runtime`): the system OpenBLAS bound before `mlx.core` is first imported
(on Linux), and MLX's JIT kernels built with the CPU's vector flags while they run. A program
that imports `mlx.core` itself before calling them can call `mlxrl.bind_openblas()` first.
"""

__version__ = "0.1.0"


def bind_openblas() -> str | None:
    """Bind the system OpenBLAS for MLX (Linux); call before the first `import mlx.core`.
    Returns the library bound, or None (see `mlxrl.runtime.status()`)."""
    from mlxrl import _blas

    return _blas.bind_openblas()


def train(config, overrides=None, *, quiet: bool = False) -> dict:
    """Train per `config` (a YAML path or a `mlxrl.config.TrainConfig`), with Oumi-style
    `overrides` such as `["--training.max_steps", "10"]`; returns the final trainer state
    (`global_step`, `log_history`, ...). Checkpoints and the adapter go to training.output_dir.
    `quiet`: no progress bar, and (without a logging set-up of your own) errors only."""
    from mlxrl.config import TrainConfig, load_config
    from mlxrl.console import api_logging
    from mlxrl.runtime import mlx_runtime

    if isinstance(config, TrainConfig):
        if overrides:
            raise TypeError("train(): overrides apply to a YAML path, not to a TrainConfig")
        cfg = config
    else:
        cfg = load_config(config, list(overrides or []))
    with api_logging(quiet), mlx_runtime():
        from mlxrl.mlx.train import train as mlx_train

        return mlx_train(cfg, quiet=quiet)


def infer(inputs, model=None, *, config=None, system_prompt=None, overrides=None, **generation):
    """Replies of `model` to `inputs` (greedy unless `temperature > 0`).

    `inputs`: a prompt string (returns a string), or a list of prompt strings, message lists or
    `{"prompt"|"messages": ...}` rows (returns a list of strings). `model`: a hub id, a local
    folder, a checkpoint folder or `tiny://qwen2`. `config`: an inference YAML path or an
    `mlxrl.inference.InferenceConfig`. `system_prompt`: text, or `"letter_count"` for the `\\boxed{}`
    prompt. `**generation`: `GenerationParams` fields such as `max_new_tokens=64, temperature=0.7`.
    """
    from mlxrl.console import api_logging
    from mlxrl.inference import infer as _infer
    from mlxrl.runtime import mlx_runtime

    with api_logging(), mlx_runtime():
        return _infer(inputs, model, config=config, system_prompt=system_prompt, overrides=overrides,
                      **generation)


def evaluate(model=None, tasks=("letter_count",), **kwargs) -> dict:
    """Evaluate `model` on `tasks` (`letter_count`, `preference`, `reward`); returns
    `{"model", "tasks": {task: metrics}, ...}`. Keyword arguments: `dataset`, `dataset_path`,
    `split`, `num_samples`, `reward_functions`, `output_dir` (writes eval_results.json),
    `config` (an eval YAML path or `mlxrl.evaluation.EvalConfig`), `overrides`, and
    `GenerationParams` fields (`max_new_tokens=32`)."""
    from mlxrl.console import api_logging
    from mlxrl.evaluation import evaluate as _evaluate
    from mlxrl.runtime import mlx_runtime

    with api_logging(), mlx_runtime():
        return _evaluate(model, tasks, **kwargs)
