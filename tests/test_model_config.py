"""Model folders written by transformers 5's own `save_pretrained` load on MLX with transformers'
logits (1e-4 in float32), for every supported architecture and every RoPE type mlx-lm can compute;
the others stop with one line.

transformers 5 writes `rope_parameters` and no top-level `rope_theta`; read as they are, these
folders give mlx-lm logits that differ by 0.1-1.6 here (falcon_h1 does not even load: its head_dim
is left out). The configs are built by transformers' own config classes, not written by hand.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxrl.config import ModelParams
from mlxrl.errors import ModelError
from mlxrl.mlx import model as mlx_model
from mlxrl.testing import build_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

THETA = 500.0  # non-default everywhere (transformers' default is 10^4, mlx-lm's 10^4..10^11)
FACTORS = [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]  # one per rotated pair of a 16-wide head


def _rope(rope_type="default", **extra):
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": THETA, **extra}}


FALCON_H1 = {"mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
             "mamba_chunk_size": 16}
# id -> (config class name, extra config). max_position_embeddings is 64 and sequences are 24
# tokens, past the original length of 16 given to the scaled types, so the scaling acts.
CASES = {
    "qwen2": ("Qwen2Config", _rope()),
    "qwen3": ("Qwen3Config", {"head_dim": 16, **_rope()}),
    "llama": ("LlamaConfig", _rope()),
    "falcon_h1": ("FalconH1Config", {**FALCON_H1, **_rope()}),
    "llama-linear": ("LlamaConfig", _rope("linear", factor=4.0)),
    "falcon_h1-linear": ("FalconH1Config", {**FALCON_H1, **_rope("linear", factor=2.0)}),
    "llama-dynamic": ("LlamaConfig", {"max_position_embeddings": 8, **_rope("dynamic", factor=4.0)}),
    "llama-llama3": ("LlamaConfig", _rope("llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama-yarn": ("LlamaConfig", _rope("yarn", factor=4.0, original_max_position_embeddings=16)),
    # mscale alone: transformers ignores it, mlx-lm's own reading would not.
    "llama-yarn-mscale": ("LlamaConfig", _rope("yarn", factor=4.0, original_max_position_embeddings=16,
                                               mscale=0.7, beta_fast=8, beta_slow=2)),
    "qwen2-yarn-attention": ("Qwen2Config", _rope("yarn", factor=4.0, attention_factor=1.3,
                                                  original_max_position_embeddings=16)),
    "qwen3-yarn-mscales": ("Qwen3Config", {"head_dim": 16, **_rope(
        "yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.7, mscale_all_dim=0.5)}),
    "llama-longrope": ("LlamaConfig", _rope("longrope", original_max_position_embeddings=16,
                                            short_factor=FACTORS, long_factor=FACTORS)),
    "llama-proportional": ("LlamaConfig", _rope("proportional", factor=2.0, partial_rotary_factor=0.5)),
    # An architecture mlxrl does not translate fully (mlx-lm runs it as llama): its default-type
    # rope_parameters still reach mlx-lm's top-level rope_theta.
    "mistral": ("MistralConfig", _rope()),
}
IDS = np.random.default_rng(0).integers(3, 700, size=(2, 24))


def _save(folder, class_name, extra, seed=0):
    """A random model of transformers' own classes, saved by its save_pretrained; its logits."""
    tokenizer = build_tokenizer()
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 64}
    config = getattr(transformers, class_name)(**{**sizes, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # the init's std 0.02 gives near-uniform logits
            p.normal_(0.0, 0.3)
        logits = model(torch.tensor(IDS)).logits.numpy()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return logits


def _mlxrl_logits(folder) -> np.ndarray:
    loaded = mlx_model.load(ModelParams(model_name=str(folder)))
    return np.array(loaded.model(mx.array(IDS)).astype(mx.float32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers5_folder_gives_transformers_logits(case, tmp_path):
    class_name, extra = CASES[case]
    hf_logits = _save(tmp_path, class_name, extra)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == THETA
    logits = _mlxrl_logits(tmp_path)
    assert np.abs(logits - hf_logits).max() < 1e-4, case
    assert hf_logits.std(axis=-1).min() > 0.3  # not near-uniform: a RoPE error would show


def test_missing_tie_word_embeddings_follows_the_weights(tmp_path):
    """mlx-lm's llama defaults to tied embeddings, transformers' to untied: decide by lm_head."""
    hf_logits = _save(tmp_path, "LlamaConfig", _rope())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert np.abs(_mlxrl_logits(tmp_path) - hf_logits).max() < 1e-4


# id -> (config class, extra config, edit of the saved config.json, substring of the message)
REFUSED = {
    "longrope-short-long": ("LlamaConfig", _rope("longrope", original_max_position_embeddings=16,
                                                 short_factor=FACTORS, long_factor=FACTORS[::-1]),
                            None, "short_factor differs from long_factor"),
    "yarn-no-truncate": ("LlamaConfig", _rope("yarn", factor=4.0, original_max_position_embeddings=16),
                         lambda c: c["rope_parameters"].update(truncate=False), "truncate: false"),
    "unknown-type": ("LlamaConfig", _rope(), lambda c: c["rope_parameters"].update(rope_type="mrope"),
                     "rope_type 'mrope' cannot run on MLX"),
    "partial-rotary": ("LlamaConfig", _rope(), lambda c: c["rope_parameters"].update(
        partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    "per-layer-rope": ("Qwen2Config", _rope(), lambda c: c.update(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": THETA},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}),
        "rope_parameters differ between layer types"),
    "mistral-linear": ("MistralConfig", _rope("linear", factor=4.0), None,
                       "rope_parameters of type 'linear', which mlxrl translates for mlx-lm only on"),
    "sliding-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8,
                                       "max_window_layers": 1, **_rope()},
                       None, "layers 1..1 use sliding-window attention (window 8)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_mlx_lm_cannot_run_stops_with_one_line(case, tmp_path):
    class_name, extra, edit, needle = REFUSED[case]
    _save(tmp_path, class_name, extra)
    if edit:
        config = json.loads((tmp_path / "config.json").read_text())
        edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as err:
        mlx_model.load(ModelParams(model_name=str(tmp_path)))
    message = str(err.value)
    assert needle in message and "config.json" in message and "\n" not in message, message
