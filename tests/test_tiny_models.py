"""mlxrl.tiny_models: tiny HF-format models load in mlx-lm and transformers with the same logits."""

import json

import mlx.core as mx  # conftest.py has bound OpenBLAS first (mlxrl.runtime)
import mlx_lm
import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxrl import tiny_models

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How many 'r's are in 'strawberry'?"},
    {"role": "assistant", "content": "\\boxed{3}"},
]
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHow many 'r's are in 'strawberry'?<|im_end|>\n"
    "<|im_start|>assistant\n\\boxed{3}<|im_end|>\n"
)
TEXTS = [
    "Hello world!  How are you?\n\n  3+4=7 and 1234",
    "How many 'r's are in 'strawberry'? \\boxed{3}",
    "ünïcödé 日本語 tabs\tand trailing space ",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_models.build_tiny_model(root / arch, arch) for arch in tiny_models.ARCHS}


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_mlx_and_transformers_logits_agree(models, arch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = models[arch]
    # 24 tokens: falcon_h1's mamba_chunk_size is 16, so the chunked scan crosses a boundary.
    ids = np.random.default_rng(0).integers(3, 700, size=(2, 24))
    model, _ = mlx_lm.load(str(path))
    mlx_logits = np.array(model(mx.array(ids)).astype(mx.float32))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids), use_cache=False).logits.numpy()

    config = json.loads((path / "config.json").read_text())
    assert mlx_logits.shape == (2, 24, config["vocab_size"])
    assert np.abs(mlx_logits - hf_logits).max() < 1e-4
    assert mlx_logits.std(axis=-1).min() > 0.5  # not near-uniform next-token distributions
    assert np.abs(mlx_logits[0] - mlx_logits[1]).max() > 0.1  # depends on the input


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_folder_contents(models, arch):
    path = models[arch]
    config = json.loads((path / "config.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    assert config["model_type"] == arch
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 0)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 64)
    assert ("lm_head.weight" in weights) == (not config["tie_word_embeddings"])
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == tiny_models.CHAT_TEMPLATE


def test_falcon_h1_multipliers(models):
    config = json.loads((models["falcon_h1"] / "config.json").read_text())
    assert config["embedding_multiplier"] != 1.0 and config["lm_head_multiplier"] != 1.0
    assert all(m != 1.0 for m in config["mlp_multipliers"] + config["ssm_multipliers"])
    # mlx-lm folds these two differently from transformers (see the module docstring).
    assert config["key_multiplier"] == config["attention_in_multiplier"] == 1.0
    weights = load_file(str(models["falcon_h1"] / "model.safetensors"))
    assert weights["model.layers.0.mamba.conv1d.weight"].shape == (128 + 2 * 16, 1, 4)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_tokenizer(models, arch):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = models[arch]
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text).ids  # transformers' per-model class keeps the pipeline
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert (ids[0], ids[-1], ids.count(1), ids.count(2)) == (1, 2, 1, 1)
    assert len(tok) == json.loads((path / "config.json").read_text())["vocab_size"]
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_mlx_lm_tokenizer(models):
    _, tok = mlx_lm.load(str(models["qwen2"]))
    assert tok.eos_token_ids == {2}
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML


def test_build_is_deterministic(tmp_path, models):
    path = tiny_models.build_tiny_model(tmp_path / "again", "qwen2")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (path / name).read_bytes() == (models["qwen2"] / name).read_bytes()
    other = tiny_models.build_tiny_model(tmp_path / "seed1", "qwen2", seed=1)
    assert (other / "model.safetensors").read_bytes() != (path / "model.safetensors").read_bytes()


def test_bench_size_parameter_count():
    config = tiny_models.make_config(
        "qwen2", 736, hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8,
        num_kv_heads=2,
    )  # fmt: skip
    shapes = tiny_models.make_weights(config)
    assert 20e6 < sum(w.size for w in shapes.values()) < 30e6


def test_tiny_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXRL_CACHE", str(tmp_path))
    calls = []
    build = tiny_models.build_tiny_model

    def counting_build(*args, **kwargs):
        calls.append(args)
        return build(*args, **kwargs)

    monkeypatch.setattr(tiny_models, "build_tiny_model", counting_build)
    first = tiny_models.tiny_model("qwen2")
    assert tiny_models.tiny_model("qwen2") == first
    assert len(calls) == 1
    assert first.parent.parent == tmp_path and (first / "config.json").exists()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp folder left
    assert tiny_models.tiny_model("qwen2", num_layers=1) != first
    assert len(calls) == 2
