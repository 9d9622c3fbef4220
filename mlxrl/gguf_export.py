"""`mlxrl fuse --format gguf` and `mlxrl export --format gguf`: models for llama.cpp, Ollama and
LM Studio.

- `fuse_gguf(checkpoint, out, quantize)`: the adapter merged into its base (mlxrl's own fuse, in
  Hugging Face layout) and written as one GGUF, `model-<quantize>.gguf` (`mlxrl.gguf_model`).
- `export_lora_gguf(checkpoint, out, quantize)`: the LoRA adapter alone as a llama.cpp LoRA GGUF,
  `adapter.gguf` (general.type adapter, adapter.type lora, adapter.lora.alpha; tensors
  `<llama.cpp name>.lora_a` [r, in] and `.lora_b` [out, r] in numpy order), taken from the PEFT
  export so that both exports share one translation from mlx-lm's layout. llama.cpp scales the
  product by alpha / r, as PEFT does. It applies on top of the base GGUF: the user's own file when
  the adapter was trained on one (`model.model_name: x.gguf` or gguf://smollm2; with QLoRA too
  when it trained on the file's own quantized tensors), else the base written beside it as
  `base-<quantize>.gguf` (a QLoRA adapter's: its dequantized base).
- Beside either: an Ollama `Modelfile` (FROM, ADAPTER, TEMPLATE for a ChatML template, the
  default system prompt of that template, stop tokens).

Each writes its output folder whole or not at all (`mlxrl.output_folder`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from mlxrl.gguf_model import (
    GgufError,
    chat_template,
    check_arch,
    check_tokenizer,
    tensor_name,
    to_gguf_layout,
)

MODELFILE = "Modelfile"
ADAPTER_GGUF = "adapter.gguf"
GGUF_FILES = ("model-*.gguf", "base-*.gguf", ADAPTER_GGUF, MODELFILE)
LORA_SUFFIXES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}
PEFT_PREFIX = "base_model.model."


def fuse_gguf(checkpoint_dir, output_dir, quantize: str = "f16", overwrite: bool = False,
              system: str | None = None) -> Path:
    """The merged model as `output_dir/model-<quantize>.gguf` plus an Ollama Modelfile (with
    `system` as its SYSTEM prompt when given)."""
    from mlxrl.adapters import fuse
    from mlxrl.gguf_model import write_model
    from mlxrl.output_folder import staged

    out = Path(output_dir)
    _check_base(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="mlxrl-fuse-") as work:
        # A full fine-tune's folder (training.use_peft: false) is already the merged model.
        full = _is_full_model(checkpoint_dir)
        hf = Path(checkpoint_dir) if full else fuse(checkpoint_dir, Path(work) / "hf")
        with staged(out, overwrite, GGUF_FILES, GgufError) as tmp:
            name = f"model-{quantize}.gguf"
            write_model(hf, tmp / name, quantize, name=Path(checkpoint_dir).resolve().name)
            write_modelfile(tmp / MODELFILE, hf, f"./{name}", system=system)
    return out


def export_lora_gguf(checkpoint_dir, output_dir, quantize: str = "f16", overwrite: bool = False,
                     system: str | None = None) -> tuple[Path, Path]:
    """`output_dir/adapter.gguf` + Modelfile (+ `base-<quantize>.gguf` when the base is not a GGUF
    file already); returns (output folder, the base GGUF the adapter applies to)."""
    from mlxrl.adapters import DEQUANTIZED_BASE, PEFT_CONFIG, export_peft
    from mlxrl.gguf_model import write_model
    from mlxrl.model_names import local_model_path
    from mlxrl.output_folder import staged

    out = Path(output_dir)
    base_name = _check_base(checkpoint_dir)
    if _is_full_model(checkpoint_dir):
        raise GgufError(f"{checkpoint_dir} is a full fine-tune (training.use_peft: false), which has "
                        f"no adapter to export; write the whole model with `mlxrl fuse "
                        f"{checkpoint_dir} --format gguf`")
    with tempfile.TemporaryDirectory(prefix="mlxrl-export-") as work:
        peft = export_peft(checkpoint_dir, Path(work) / "peft")
        pcfg = json.loads((peft / PEFT_CONFIG).read_text())
        dequantized = peft / DEQUANTIZED_BASE
        base_folder = dequantized if dequantized.is_dir() else local_model_path(base_name)
        config = json.loads((base_folder / "config.json").read_text())
        arch = check_arch(config, str(checkpoint_dir))
        on_file = not dequantized.is_dir() or _trained_on_file_quantization(checkpoint_dir)
        source = base_gguf_file(base_name) if on_file else None
        with staged(out, overwrite, GGUF_FILES, GgufError) as tmp:
            _write_lora(tmp / ADAPTER_GGUF, peft, pcfg, arch, config, str(checkpoint_dir))
            if source is None:
                base = f"base-{quantize}.gguf"
                write_model(base_folder, tmp / base, quantize, name=Path(base_name).name)
                source, from_line = out / base, f"./{base}"
            else:
                from_line = str(source)
            write_modelfile(tmp / MODELFILE, base_folder, from_line, adapter=f"./{ADAPTER_GGUF}",
                            system=system)
    return out, source


def _check_base(checkpoint_dir) -> str:
    """The adapter's base name, after refusing an architecture GGUF cannot hold (before any work)."""
    from mlxrl.model_names import resolve

    ref = resolve(str(checkpoint_dir))
    config = json.loads((ref.base_path / "config.json").read_text())
    check_arch(config, f"{checkpoint_dir} (base {ref.base_name})")
    check_tokenizer(ref.base_path)
    return ref.base_name


def _is_full_model(checkpoint_dir) -> bool:
    """Is `checkpoint_dir` a model folder itself (a full fine-tune's output), not an adapter?"""
    from mlxrl.model_names import resolve

    return resolve(str(checkpoint_dir)).adapter_path is None


def _trained_on_file_quantization(checkpoint_dir) -> bool:
    """QLoRA on a GGUF base's own Q4_0 / Q4_1 / Q8_0 tensors: the file is the exact base."""
    from mlxrl.model_names import ADAPTER_CONFIG

    config = json.loads((Path(checkpoint_dir) / ADAPTER_CONFIG).read_text())
    return ((config.get("mlxrl") or {}).get("quantization") or {}).get("source") == "gguf"


def base_gguf_file(base_name: str) -> Path | None:
    """The GGUF file a base model name stands for (`x.gguf`, gguf://smollm2, a folder holding
    one), else None."""
    from mlxrl.real_model import gguf_file

    return gguf_file(base_name)


def _lora_alpha(pcfg: dict, where: str) -> float:
    """PEFT's scale as llama.cpp's alpha (llama.cpp multiplies B @ A by alpha / r)."""
    if pcfg.get("use_dora"):
        raise GgufError(f"{where}: a DoRA adapter cannot be applied by llama.cpp; write the merged "
                        "model instead: mlxrl fuse CKPT --format gguf")
    if pcfg.get("rank_pattern") or pcfg.get("alpha_pattern"):
        raise GgufError(f"{where}: per-module ranks or alphas cannot be written to a llama.cpp LoRA")
    rank, alpha = pcfg["r"], float(pcfg["lora_alpha"])
    return alpha * math.sqrt(rank) if pcfg.get("use_rslora") else alpha


def _write_lora(path: Path, peft: Path, pcfg: dict, arch: str, config: dict, where: str) -> None:
    import gguf
    import numpy as np

    from mlxrl.adapters import PEFT_WEIGHTS
    from mlxrl.gguf_model import _write, read_safetensors

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _lora_alpha(pcfg, where))
    writer.add_name(Path(where).resolve().name)
    for key, value in sorted(read_safetensors(peft / PEFT_WEIGHTS).items()):
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        suffix = LORA_SUFFIXES[f"lora_{part}"]
        hf_name = f"{module}.weight"
        value = value.astype(np.float32)
        if suffix == "lora_b":  # B's rows are the weight's output rows: same permutation
            value = to_gguf_layout(arch, config, hf_name, value)
        writer.add_tensor(f"{tensor_name(arch, config, hf_name)}.{suffix}", np.ascontiguousarray(value))
    _write(writer)


# --- Ollama Modelfile ----------------------------------------------------------------------------

CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
             '{{ end }}<|im_start|>assistant\n')


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chatml_system(template: str) -> tuple[bool, str | None]:
    """(the template is ChatML, the system prompt it adds when none is given)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    render = env.from_string(template).render
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    try:
        full = render(messages=chat, add_generation_prompt=True, bos_token="", eos_token="")
        bare = render(messages=chat[1:2], add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - a template that needs more than this is not plain ChatML
        return False, None
    if full != _chatml(chat) + "<|im_start|>assistant\n":
        return False, None
    tail = _chatml(chat[1:2]) + "<|im_start|>assistant\n"
    head = bare.removesuffix(tail)
    if head and head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        return True, head.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    return True, None


def write_modelfile(path: Path, hf_folder: Path, from_line: str, adapter: str | None = None,
                    system: str | None = None) -> None:
    """An Ollama Modelfile for the model in `hf_folder` (its tokenizer and chat template);
    `system` replaces the template's default system prompt."""
    settings = json.loads((Path(hf_folder) / "tokenizer_config.json").read_text())
    template = chat_template(hf_folder)
    is_chatml, default_system = chatml_system(template) if template else (False, None)
    system = system or default_system
    if system and '"""' in system:
        raise GgufError('a system prompt with """ cannot be written to a Modelfile')
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model",
             f"FROM {from_line}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    stops = []
    if is_chatml:
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
        stops = ["<|im_end|>", "<|im_start|>"]
    else:
        lines.append("# TEMPLATE: not ChatML; Ollama reads the chat template in the GGUF metadata")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    eos = settings.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    path.write_text("\n".join(lines) + "\n")
