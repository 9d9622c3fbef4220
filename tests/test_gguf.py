"""GGUF out: `mlxrl fuse --format gguf` and `mlxrl export --format gguf` (llama.cpp LoRA), proven
without mlxrl's writer: transformers' own GGUF loader reads the files back (weights, config,
tokenizer, chat template) and `gguf`'s reader (llama.cpp's Python package) reads the adapter.

The reference for the fused GGUF is the fused Hugging Face model (`mlxrl fuse`, itself proven
against transformers + PEFT in test_adapters.py). The LoRA GGUF is checked by llama.cpp's rule for
applying it (W + alpha / r * B @ A on the base GGUF's tensors, in the GGUF's own layout), which
must give the fused GGUF's tensors.
"""

import json

import numpy as np
import pytest
from test_adapters import IDS, make_adapter, tiny_qwen3

from mlxrl import adapters
from mlxrl.gguf_export import export_lora_gguf, fuse_gguf
from mlxrl.gguf_model import write_model
from mlxrl.testing import tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2 3?"},
        {"role": "assistant", "content": "Yes, three."}, {"role": "user", "content": "don't stop"}]


def hf_logits(folder, gguf_file=None) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                              dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS), use_cache=False).logits.numpy()


def read_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in numpy order (llama.cpp's own dequantizers)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
            .astype(np.float32) for t in reader.tensors}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> dict(ckpt, fused HF folder, its logits, f32 GGUF folder): built once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            # head_dim 128, as in every Qwen3: transformers' GGUF loader does not read
            # qwen3.attention.key_length (llama.cpp does) and assumes 128
            base = tiny_qwen3(root / "qwen3-base", head_dim=128) if arch == "qwen3" else None
            ckpt, _ = make_adapter(root / "ckpt", arch, base=base)
            fused = adapters.fuse(ckpt, root / "fused")
            cache[arch] = dict(ckpt=ckpt, fused=fused, logits=hf_logits(fused),
                               gguf=fuse_gguf(ckpt, root / "gguf", "f32"), root=root)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_fused_gguf_is_the_fused_model_for_transformers(built, arch):
    """f32: transformers' GGUF loader gives the fused model's logits (measured: equal, 0.0)."""
    b = built(arch)
    diff = np.abs(hf_logits(b["gguf"], "model-f32.gguf") - b["logits"]).max()
    assert diff < 1e-5, f"{arch}: {diff:.2e}"


def test_quantized_gguf_stays_close(built):
    """f16 within f16 rounding (measured 7.9e-3 on logits of magnitude ~1); q8_0 within 0.5 with
    the same greedy token at >= 95% of positions (measured 0.21 and 98%); q4_0 loads."""
    b = built("llama")
    for quantize, tol, agree in (("f16", 2e-2, 1.0), ("q8_0", 0.5, 0.95)):
        out = fuse_gguf(b["ckpt"], b["root"] / quantize, quantize)
        logits = hf_logits(out, f"model-{quantize}.gguf")
        assert np.abs(logits - b["logits"]).max() < tol, quantize
        assert (logits.argmax(-1) == b["logits"].argmax(-1)).mean() >= agree, quantize
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(out / "model-q8_0.gguf")).tensors}
    assert kinds == {"Q8_0", "F32"}


def test_gguf_metadata_carries_tokenizer_and_chat_template(built):
    b = built("qwen2")
    fields = read_fields(b["gguf"] / "model-f32.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(b["fused"])
    assert fields["general.architecture"] == "qwen2" and fields["general.type"] == "model"
    assert fields["tokenizer.chat_template"] == reference.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == reference.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == reference.pad_token_id
    ours = transformers.AutoTokenizer.from_pretrained(b["gguf"], gguf_file="model-f32.gguf")
    assert (ours.eos_token, ours.pad_token) == (reference.eos_token, reference.pad_token)
    for add in (True, False):
        assert (ours.apply_chat_template(CHAT, add_generation_prompt=add, return_dict=False) ==
                reference.apply_chat_template(CHAT, add_generation_prompt=add, return_dict=False))
    text = "Strawberry has 3 r's, doesn't it?\n  1234567 <|im_end|>"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_gguf_on_the_base_gguf_is_the_fused_gguf(built, arch):
    """llama.cpp's rule: W' = W + (alpha / r) * B @ A per target, with A [r, in] and B [out, r]
    in numpy order (ne: A [in, r], B [r, out]); llama's q/k rows in llama.cpp's RoPE order."""
    b = built(arch)
    out, base = export_lora_gguf(b["ckpt"], b["root"] / "lora", "f32")
    assert base == out / "base-f32.gguf"
    fields = read_fields(out / "adapter.gguf")
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    assert fields["general.architecture"] == arch
    lora, base_w = read_tensors(out / "adapter.gguf"), read_tensors(base)
    fused = read_tensors(b["gguf"] / "model-f32.gguf")
    targets = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert len(targets) >= 2 * 4 and all(f"{t}.lora_b" in lora for t in targets)
    for target in targets:
        a, bb = lora[f"{target}.lora_a"], lora[f"{target}.lora_b"]
        scale = fields["adapter.lora.alpha"] / a.shape[0]
        merged = base_w[target] + scale * (bb @ a)
        assert np.abs(merged - fused[target]).max() < 1e-5, target
    unchanged = [n for n in base_w if n not in targets]
    assert all(np.array_equal(base_w[n], fused[n]) for n in unchanged)
    # the base GGUF is the base model for transformers too
    assert np.abs(hf_logits(out, "base-f32.gguf") - hf_logits(tiny_model(arch))).max() < 1e-5


def test_modelfile_names_the_files_template_and_stops(built):
    b = built("llama")
    out, _ = export_lora_gguf(b["ckpt"], b["root"] / "lora-mf", "f16")
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./base-f16.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = next(line for line in lines if line.startswith("TEMPLATE"))
    assert "{{ range .Messages }}" in template.replace("{{-", "{{") and "<|im_start|>{{ .Role }}" in template
    fused = (b["gguf"] / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in fused and "ADAPTER" not in fused


def test_cli_fuse_and_export_gguf(built, tmp_path):
    from click.testing import CliRunner

    from mlxrl.cli import main

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    ckpt = built("qwen2")["ckpt"]
    result = cli("fuse", ckpt, "--format", "gguf", "--quantize", "q4_0", "--output", tmp_path / "f")
    assert result.exit_code == 0, result.output
    assert "model-q4_0.gguf" in result.output and "ollama create" in result.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["Modelfile", "model-q4_0.gguf"]
    result = cli("export", ckpt, "--format", "gguf", "--output", tmp_path / "e",
                 "--system-prompt", "letter_count")
    assert result.exit_code == 0 and "--lora" in result.output, result.output
    assert 'SYSTEM """' in (tmp_path / "e" / "Modelfile").read_text()
    assert "\\boxed{" in (tmp_path / "e" / "Modelfile").read_text()
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["Modelfile", "adapter.gguf",
                                                                   "base-f16.gguf"]
    result = cli("fuse", ckpt, "--quantize", "q8_0", "--output", tmp_path / "x")
    assert result.exit_code == 2 and "--format gguf" in result.output
    result = cli("fuse", ckpt, "--system-prompt", "hi", "--output", tmp_path / "x")
    assert result.exit_code == 2 and "--format gguf only" in result.output
    assert "gguf" in cli("fuse", "--help").output and "gguf" in cli("export", "--help").output


def test_what_gguf_cannot_hold_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from mlxrl.cli import main

    falcon, _ = make_adapter(tmp_path / "falcon", "falcon_h1", num_layers=1)
    dora, _ = make_adapter(tmp_path / "dora", "qwen2", dora=True, num_layers=1)
    for args, needle in ((["fuse", falcon, "--format", "gguf"], "'falcon_h1' model as GGUF"),
                         (["export", dora, "--format", "gguf"], "DoRA adapter cannot be applied")):
        result = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "out"]])
        assert result.exit_code == 1 and needle in result.output, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert not (tmp_path / "out").exists()
    config = json.loads((falcon / "adapter_config.json").read_text())
    assert config  # the adapter folder is untouched


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path):
    import shutil

    from mlxrl.gguf_model import GgufError, check_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("qwen2"), folder)
    assert check_tokenizer(folder)[1] == "qwen2"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GgufError, match="pre-tokenizer is not one llama.cpp"):
        check_tokenizer(folder)


def test_a_gguf_base_in_a_folder_is_recorded_and_checked(tmp_path):
    """GGUF in: a folder holding one .gguf is a model name (converted through transformers); an
    adapter trained on it records the file's path and sha256 (hashlib's), the LoRA export applies
    on top of that very file, and another file under the same name is refused in one line."""
    import hashlib

    from click.testing import CliRunner

    from mlxrl.cli import main
    from mlxrl.errors import ModelError
    from mlxrl.model_names import local_model_path, resolve

    folder = tmp_path / "base"
    folder.mkdir()
    gguf_path = folder / "tiny-llama.gguf"
    write_model(tiny_model("llama"), gguf_path, "f32")
    converted = local_model_path(str(folder))
    assert np.abs(hf_logits(converted) - hf_logits(tiny_model("llama"))).max() < 1e-5
    ckpt, _ = make_adapter(tmp_path / "ckpt", "llama", base=folder, num_layers=1)
    recorded = json.loads((ckpt / "adapter_config.json").read_text())["mlxrl"]["base_gguf"]
    assert recorded == {"path": str(gguf_path.resolve()),
                        "sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest()}
    out, base = export_lora_gguf(ckpt, tmp_path / "lora")
    assert base == gguf_path.resolve() and not list(out.glob("base-*.gguf"))
    assert f"FROM {gguf_path.resolve()}" in (out / "Modelfile").read_text()

    write_model(tiny_model("qwen2"), folder / "second.gguf", "f32")
    with pytest.raises(ModelError, match="holds 2 GGUF files"):
        resolve(str(ckpt))
    (folder / "second.gguf").replace(gguf_path)  # another model under the recorded name
    result = CliRunner().invoke(main, ["fuse", str(ckpt), "-o", str(tmp_path / "fused")])
    assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    assert "is now another file" in result.output and result.output.count("\n") == 1


def test_bfloat16_weights_are_read_exactly(tmp_path):
    """A model trained in bfloat16 fuses to bfloat16 safetensors, which numpy cannot name: the
    writer reads them as MLX (another safetensors writer) stores them."""
    import mlx.core as mx

    from mlxrl.gguf_model import read_safetensors

    w = mx.random.normal((4, 64)).astype(mx.bfloat16)
    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"w": w, "h": w.astype(mx.float16)})
    read = read_safetensors(tmp_path / "w.safetensors")
    assert np.array_equal(read["w"], np.array(w.astype(mx.float32)))
    assert np.array_equal(read["h"], np.array(w.astype(mx.float16).astype(mx.float32)))


def test_a_full_finetune_is_written_whole_and_has_no_adapter_to_export(tmp_path):
    """A full fine-tune's folder (training.use_peft: false) is the model: `fuse --format gguf`
    writes it as it is (transformers reads back its logits), `export --format gguf` says why not."""
    from click.testing import CliRunner

    from mlxrl.cli import main
    from mlxrl.quickstart import CONFIGS

    out = tmp_path / "full"
    result = CliRunner().invoke(main, [
        "train", "--backend", "mlx", "-c", str(CONFIGS / "sft.yaml"), "--quiet",
        "--data.train.datasets[0].dataset_path", str(CONFIGS / "data" / "sft.jsonl"),
        "--training.use_peft", "false", "--training.max_steps", "2", "--training.save_steps", "0",
        "--training.learning_rate", "1e-2", "--training.output_dir", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["fuse", str(out), "--format", "gguf", "--quantize", "f32",
                                       "--output", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    theirs = hf_logits(tmp_path / "g", gguf_file="model-f32.gguf")
    assert np.abs(theirs - hf_logits(out)).max() < 1e-4
    assert np.abs(hf_logits(out) - hf_logits(tiny_model("qwen2"))).max() > 1e-3  # it trained
    result = CliRunner().invoke(main, ["export", str(out), "--format", "gguf", "--output",
                                       str(tmp_path / "e")])
    assert result.exit_code == 1 and not (tmp_path / "e").exists()
    assert "is a full fine-tune" in result.stderr and "mlxrl fuse" in result.stderr
