"""The `mlxrl` command line.

    mlxrl train -c CONFIG [--backend mlx|torch|auto] [--section.key VALUE ...]
    mlxrl env
    mlxrl data make letter-count --output FILE [--n N] [--seed S]

Config overrides follow Oumi: `--training.max_steps 10`, `--training.max_steps=10` or
`training.max_steps=10`; list items as `--data.train.datasets[0].dataset_path FILE`.
Errors in the user's input print one line (no traceback unless `--debug`) and exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import os

import click

import mlxrl
from mlxrl.cli_errors import friendly_errors
from mlxrl.errors import MlxrlError

OVERRIDES = dict(ignore_unknown_options=True, allow_extra_args=True)
logger = logging.getLogger("mlxrl.cli")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlxrl.__version__, prog_name="mlxrl")
def main():
    """Align language models on your Mac: SFT, DPO and GRPO with LoRA on MLX.

    The same YAML config runs on NVIDIA GPUs through PyTorch/TRL with `--backend torch`.
    """


def pick_backend(requested: str, explain: bool = False):
    """`mlx` always forces MLX; `torch` needs the torch extra; `auto`: $MLXRL_BACKEND (mlx|torch)
    when set, else MLX on Apple Silicon, torch where it has a CUDA GPU (and is installed), else
    MLX (`mlxrl.torch.auto_backend`). With `explain`: (backend, why)."""
    from mlxrl.torch import auto_backend, missing_packages

    env = os.environ.get("MLXRL_BACKEND", "").lower()
    if requested == "auto" and env in ("mlx", "torch"):
        backend = pick_backend(env)
        return (backend, f"MLXRL_BACKEND={env}") if explain else backend
    if requested == "torch":
        missing = missing_packages()
        if missing:
            raise MlxrlError(f"--backend torch needs {', '.join(missing)}: pip install 'mlxrl[torch]'")
        choice = ("torch", "--backend torch")
    elif requested == "mlx":
        choice = ("mlx", "--backend mlx")
    else:
        backend, why = auto_backend()
        choice = (backend, f"--backend auto: {why}")
    return choice if explain else choice[0]


@main.command(context_settings=OVERRIDES)
@click.option("-c", "--config", "config_path", type=click.Path(), help="YAML config (Oumi's schema).")
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]), default="auto", show_default=True,
              help="mlx: Apple's MLX (any OS); torch: PyTorch + TRL (CUDA/CPU); auto: pick the best here.")
@click.option("--resume", is_flag=True,
              help="Continue the run in training.output_dir from its newest complete and readable "
                   "checkpoint; changed settings (learning rate, max_steps, ...) apply from there on.")
@click.option("--overwrite", is_flag=True,
              help="Start over: remove what an earlier run wrote in training.output_dir "
                   "(checkpoints, adapter, logs); other files stay.")
@click.option("--quiet", is_flag=True, help="Errors and the final line only.")
@click.option("-v", "--verbose", is_flag=True, help="Also print debugging details.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
@friendly_errors
def train(ctx, config_path, backend, resume, overwrite, quiet, verbose, debug):
    """Train a LoRA adapter, or every weight with training.use_peft: false (SFT, DPO or GRPO,
    from training.trainer_type).

    Any config field can be overridden after the options, e.g.
    `--training.max_steps 10 --model.model_name path/to/model`.
    Checkpoints go to training.output_dir/checkpoint-<step>, the final adapter (or Hugging Face
    model folder) to training.output_dir, metrics to training.output_dir/metrics.jsonl (and
    TensorBoard logs to training.output_dir/runs/, W&B with training.enable_wandb). On a terminal
    a live bar sits under one line per logging step; piped, the lines alone. The run ends with a
    summary and the commands to try the result.
    """
    import datasets

    from mlxrl.config import load_config

    datasets.disable_progress_bars()
    cfg = load_config(config_path, list(ctx.args))
    if resume:
        cfg.training.try_resume_from_last_checkpoint = True
    chosen, why = pick_backend(backend, explain=True)
    on_mlx = chosen == "mlx"
    main_process = os.environ.get("RANK", "0") == "0"  # once under `accelerate launch`
    if main_process:
        logger.info(f"backend: {'MLX' if on_mlx else 'torch'} ({why})")
    with _mlx_runtime() if on_mlx else contextlib.nullcontext():  # OpenBLAS for MLX alone
        if on_mlx:
            from mlxrl.mlx.train import train as run
        else:
            from mlxrl.torch.train import train as run
        state = run(cfg, quiet=quiet, overwrite=overwrite)
    if main_process:
        what = "adapter" if cfg.training.use_peft else "model"  # use_peft: false trains every weight
        click.echo(f"done: {state['global_step']} steps; {what} in {cfg.training.output_dir}", err=True)


def _mlx_runtime():
    from mlxrl.runtime import mlx_runtime

    return mlx_runtime()


@main.command()
@friendly_errors(mlx=True)
def env():
    """Versions, the backend `auto` picks, the device, and the BLAS and JIT flags MLX work gets."""
    import platform

    from mlxrl import runtime

    lines = [f"mlxrl {mlxrl.__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for name in ("mlx", "mlx_lm", "transformers", "datasets", "torch", "trl", "peft"):
        lines.append(f"{name:13s} {_version(name)}")
    try:
        import mlx.core as mx

        lines.append(f"mlx device    {mx.default_device()}")
    except ImportError:
        lines.append("mlx device    (mlx not installed)")
    lines += [f"{name:13s} {value}" for name, value in runtime.status().items()]
    chosen, why = pick_backend("auto", explain=True)
    lines.append(f"backend auto  -> {chosen} ({why.removeprefix('--backend auto: ')})")
    click.echo("\n".join(lines))


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


@main.group()
def data():
    """Make and inspect datasets."""


@data.group()
def make():
    """Generate datasets offline."""


@make.command("letter-count")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--n", default=1000, show_default=True, help="Number of rows.")
@click.option("--seed", default=0, show_default=True)
@friendly_errors
def make_letter_count(output, n, seed, debug=False):
    """Rows in oumi-ai/oumi-letter-count's raw format (conversation_id, messages, metadata)."""
    from mlxrl.tasks.letter_count import write_jsonl

    path = write_jsonl(output, n, seed)
    click.echo(f"wrote {n} rows to {path}")


def _register_commands() -> None:
    """Commands that live in their own modules (each module has `register(main)`)."""
    import importlib

    for module in ("mlxrl.cli_adapters", "mlxrl.cli_infer"):
        try:
            importlib.import_module(module).register(main)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


_register_commands()

if __name__ == "__main__":
    main()
