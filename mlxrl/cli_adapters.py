"""`mlxrl export`, `mlxrl import` and `mlxrl fuse`: adapters to and from Hugging Face.

    mlxrl export CKPT [--format peft|gguf] --output DIR [--overwrite] [--push-to-hub REPO]
    mlxrl import DIR --output CKPT [--base MODEL] [--overwrite]
    mlxrl fuse CKPT --output DIR [--format hf|gguf] [--quantize [f16|q8_0|q4_0]] [--overwrite]

GGUF (llama.cpp, Ollama, LM Studio) is written by `mlxrl.gguf_export`.

Each writes its output folder whole or not at all (`mlxrl.output_folder`): a full disk or Ctrl-C
leaves it as it was. A folder that is not empty needs `--overwrite`.

`register(main)` adds them to the `mlxrl` click group.
"""

from __future__ import annotations

import click

from mlxrl.cli_errors import friendly_errors

_DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
_PUSH = click.option("--push-to-hub", "repo", metavar="REPO",
                     help="Also upload the folder to this Hugging Face repo (owner/name); "
                          "uses your `hf auth login` token.")
_PRIVATE = click.option("--private", is_flag=True, help="Create the hub repo as private.")
_OVERWRITE = click.option("--overwrite", is_flag=True,
                          help="Write into a folder that is not empty: replaces an earlier output "
                               "of this command there and keeps other files.")


_GGUF_TYPES = ["f32", "f16", "q8_0", "q4_0"]
_SYSTEM = click.option("--system-prompt", "system_prompt", default=None,
                       help="gguf only: the Modelfile's SYSTEM prompt (text, or a registered name: "
                            "`letter_count` is the \\boxed{} prompt GRPO trains with).")


def _system_text(system_prompt, fmt):
    if system_prompt and fmt != "gguf":
        raise click.BadParameter("applies to --format gguf only", param_hint="--system-prompt")
    from mlxrl.inference import system_prompt_text

    return system_prompt_text(system_prompt)


def _export_gguf(checkpoint, output, quantize, system, overwrite, repo, private) -> None:
    from mlxrl.gguf_export import export_lora_gguf

    out, base = export_lora_gguf(checkpoint, output, quantize, overwrite=overwrite, system=system)
    click.echo(f"wrote a llama.cpp LoRA adapter to {out / 'adapter.gguf'}; it applies on top of "
               f"the base GGUF {base}")
    click.echo(f"Ollama: ollama create my-model -f {out / 'Modelfile'}   "
               f"llama.cpp: llama-cli -m {base} --lora {out / 'adapter.gguf'}")
    _push(out, repo, private)


def _push(folder, repo, private) -> None:
    if repo:
        from mlxrl.adapters import push_to_hub

        click.echo(f"uploaded to {push_to_hub(folder, repo, private=private)}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["peft", "gguf"]), default="peft",
              show_default=True,
              help="peft: Hugging Face PEFT (adapter_model.safetensors + adapter_config.json). "
                   "gguf: a llama.cpp LoRA (adapter.gguf) + Ollama Modelfile, on the base GGUF.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the adapter (and a README.md model card) to.")
@click.option("--quantize", type=click.Choice(_GGUF_TYPES), default=None,
              help="gguf only: the type of the base GGUF written beside the adapter when the "
                   "base is not a GGUF file already (default f16).")
@_SYSTEM
@_OVERWRITE
@_PUSH
@_PRIVATE
@_DEBUG
@friendly_errors(mlx=True)
def export(checkpoint, fmt, output, quantize, system_prompt, overwrite, repo, private, debug):
    """Export an mlxrl adapter (a training output or checkpoint-N folder) for Hugging Face PEFT
    or llama.cpp / Ollama.

    PEFT: load the result with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
    BASE), OUTPUT)`; the command prints BASE. An adapter trained on a quantized base (QLoRA) is
    exact only on the dequantized base, which is written to OUTPUT/dequantized_base.

    GGUF: OUTPUT/adapter.gguf applies on top of the base GGUF (llama.cpp `--lora`, Ollama
    `ADAPTER`); OUTPUT/Modelfile names both: `ollama create NAME -f OUTPUT/Modelfile`.
    """
    import json

    from mlxrl.adapters import DEQUANTIZED_BASE, export_peft

    system = _system_text(system_prompt, fmt)
    if fmt == "gguf":
        _export_gguf(checkpoint, output, quantize or "f16", system, overwrite, repo, private)
        return
    if quantize:
        raise click.BadParameter("applies to --format gguf only", param_hint="--quantize")

    out = export_peft(checkpoint, output, overwrite=overwrite)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    click.echo(f"wrote a PEFT adapter to {out}")
    if (out / DEQUANTIZED_BASE).is_dir():
        click.echo(f"trained on a quantized base: load it on the dequantized base {base} "
                   "(the original base is only approximate)")
    else:
        click.echo(f"load it on base {base}")
    _push(out, repo, private)


@click.command("import")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the mlxrl adapter (adapters.safetensors + adapter_config.json).")
@click.option("--base", help="Base model (hub id or folder); default: the adapter's "
                             "base_model_name_or_path.")
@_OVERWRITE
@_DEBUG
@friendly_errors(mlx=True)
def import_adapter(peft_dir, output, base, overwrite, debug):
    """Import a Hugging Face PEFT LoRA/DoRA adapter as an mlxrl adapter.

    Use it with `--model.model_name OUTPUT` (train on from it, evaluate) or
    `mlx_lm.load(BASE, adapter_path=OUTPUT)`. Adapters that cannot be converted exactly (per-module
    ranks, embedding LoRA, lora_bias, modules_to_save, ...) are refused with the reason.
    """
    from mlxrl.adapters import import_peft

    out = import_peft(peft_dir, output, base_model=base, overwrite=overwrite)
    click.echo(f"wrote an mlxrl adapter to {out}")


@click.command("fuse")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the merged model to.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf",
              show_default=True,
              help="hf: Hugging Face layout (transformers, mlx-lm). gguf: one GGUF file with the "
                   "tokenizer and chat template (llama.cpp, Ollama, LM Studio) + Modelfile.")
@click.option("--quantize", is_flag=False, flag_value="mlx", default=None,
              metavar="[f32|f16|q8_0|q4_0]",
              help="hf: the bare flag keeps a quantized base quantized (MLX format, for mlx-lm "
                   "only; re-quantizing may erase small adapter deltas); default dequantized. "
                   "gguf: the weight type, default f16.")
@_SYSTEM
@_OVERWRITE
@_PUSH
@_PRIVATE
@_DEBUG
@friendly_errors(mlx=True)
def fuse(checkpoint, output, fmt, quantize, system_prompt, overwrite, repo, private, debug):
    """Merge an mlxrl adapter into its base model.

    The default output is a dequantized model in Hugging Face layout (transformers' tensor names,
    config.json, tokenizer files) that `AutoModelForCausalLM.from_pretrained(OUTPUT)` loads.
    With --format gguf: OUTPUT/model-TYPE.gguf and an Ollama Modelfile
    (`ollama create NAME -f OUTPUT/Modelfile`; LM Studio: `lms import OUTPUT/model-TYPE.gguf`).
    """
    from mlxrl.adapters import fuse as fuse_model

    system = _system_text(system_prompt, fmt)
    if fmt == "gguf":
        _fuse_gguf(checkpoint, output, quantize, system, overwrite, repo, private)
        return
    if quantize not in (None, "mlx"):
        raise click.BadParameter(f"{quantize!r} is a GGUF type: add --format gguf, or pass "
                                 "--quantize alone to keep an MLX-quantized base",
                                 param_hint="--quantize")
    quantize = quantize == "mlx"
    out = fuse_model(checkpoint, output, quantize=quantize, overwrite=overwrite)
    if quantize:
        click.echo(f"wrote an MLX-quantized merged model to {out}: load it with mlx_lm.load; "
                   "transformers cannot load it, and re-quantizing W + dW may erase small deltas")
    else:
        click.echo(f"wrote the merged model to {out} (dequantized; "
                   "transformers.AutoModelForCausalLM.from_pretrained loads it)")
    _push(out, repo, private)


def _fuse_gguf(checkpoint, output, quantize, system, overwrite, repo, private) -> None:
    from mlxrl.gguf_export import fuse_gguf

    quantize = quantize or "f16"
    if quantize not in _GGUF_TYPES:
        raise click.BadParameter(f"use one of {', '.join(_GGUF_TYPES)} with --format gguf",
                                 param_hint="--quantize")
    out = fuse_gguf(checkpoint, output, quantize, overwrite=overwrite, system=system)
    click.echo(f"wrote the merged model to {out / f'model-{quantize}.gguf'} "
               f"(llama.cpp, LM Studio) and {out / 'Modelfile'} "
               f"(Ollama: ollama create my-model -f {out / 'Modelfile'})")
    _push(out, repo, private)


def register(main: click.Group) -> None:
    """Add `export`, `import` and `fuse` to the `mlxrl` command group."""
    for command in (export, import_adapter, fuse):
        main.add_command(command)
