"""Settings the capability table marks honoured on MLX, checked against transformers / TRL:
packing (TRL's bfd), the SFT collators, the GRPO repetition penalty (transformers' generate),
load_pretrained_weights: false (transformers' from_config), the tokenizer settings and
model.chat_template_kwargs."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxrl.cli import main
from mlxrl.config import ModelParams
from mlxrl.data import collators
from mlxrl.data.formats import encode_sft
from mlxrl.data.loading import with_chat_template_kwargs
from mlxrl.mlx import model as mlx_model
from mlxrl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
datasets.disable_progress_bars()


def test_bins_are_trls_bfd_bins():
    from trl import pack_dataset

    rng = np.random.default_rng(0)
    for _ in range(8):
        lengths = rng.integers(1, 80, size=rng.integers(1, 40)).tolist()
        max_length = int(rng.integers(4, 64))
        ds = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
        packed = pack_dataset(ds, max_length, strategy="bfd")
        theirs = [[row[sum(sl[:k])] for k in range(len(sl))] for row, sl in
                  zip(packed["input_ids"], packed["seq_lengths"])]
        assert collators.pack_bfd(lengths, max_length) == theirs, (lengths, max_length)


def test_train_targets():
    enc = {"input_ids": list(range(10)), "completion_mask": [0, 0, 1, 1, 0, 0, 1, 1, 1, 0]}
    assert collators.apply_target(enc, "all")["completion_mask"] == [1] * 10
    assert collators.apply_target(enc, "final_assistant_turn")["completion_mask"] == [0] * 6 + [1, 1, 1, 0]
    assert collators.apply_target(enc, "completion") == enc


def _first_loss(backend, out, *extra):
    sft = ["--data.train.datasets", "[{dataset_name: configs/quickstart/data/sft.jsonl, sample_count: 12}]",
           "--model.model_max_length", "512", "--training.max_steps", "1", "--training.save_steps", "0",
           "--training.per_device_train_batch_size", "4", "--training.logging_steps", "1"]
    result = CliRunner().invoke(main, ["train", "-c", str(ROOT / "configs/quickstart/sft.yaml"), "--backend",
                                       backend, "--training.output_dir", str(out), *sft, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"], result.stderr


def test_packing_gives_trls_packed_loss(tmp_path):
    """12 rows of ~150 tokens in bins of 512: 4 bins, one step of all 4. At step 1 the adapter is
    zero on both backends, so the loss is the base model's: TRL's packed sequences (position ids
    restarting per row) and MLX's bins of separate rows must give the same number."""
    pytest.importorskip("trl")
    mlx_loss, mlx_err = _first_loss("mlx", tmp_path / "mlx", "--data.train.pack", "true")
    torch_loss, torch_err = _first_loss("torch", tmp_path / "torch", "--data.train.pack", "true")
    assert ", 4 examples," in mlx_err and ", 4 examples," in torch_err
    assert mlx_loss == pytest.approx(torch_loss, rel=1e-5)


def test_repetition_penalty_samples_as_transformers_generate():
    """Greedy decoding with repetition_penalty 1.8: mlxrl's sampler and transformers' generate on
    the same tiny model (the same fp32 logits) pick the same tokens."""
    import torch

    from mlxrl.mlx.sampling import sample

    path = tiny_model("qwen2")
    loaded = mlx_model.load(ModelParams(model_name=str(path)))
    prompt = loaded.tokenizer.encode("How many 'l's are in 'hello'? The answer is")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for penalty in (1.0, 1.8):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        ours = sample(loaded.model, [prompt], max_tokens=16, temperature=0.0, eos_token_ids=[],
                      repetition_penalty=penalty)
        assert ours.tokens[0].tolist() == theirs.tolist(), penalty
    assert len(set(ours.tokens[0].tolist())) > len(set(hf.generate(
        torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
        pad_token_id=0)[0, len(prompt):].tolist()))  # the penalty changed what was generated


def test_untrained_weights_are_drawn_as_transformers_from_config():
    import torch

    path = tiny_model("llama")
    config = transformers.AutoConfig.from_pretrained(path)
    pretrained = mlx_model.load(ModelParams(model_name=str(path))).model
    fresh = mlx_model.load(ModelParams(model_name=str(path), load_pretrained_weights=False)).model
    theirs = dict(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).named_parameters())
    ours, base = dict(tree_flatten(fresh.parameters())), dict(tree_flatten(pretrained.parameters()))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        std = float(np.std(np.array(ours[name])))
        assert std == pytest.approx(float(theirs[name].detach().std()), rel=0.1)
        assert std == pytest.approx(config.initializer_range, rel=0.1)
        assert not np.allclose(np.array(ours[name]), np.array(base[name]))
    assert np.all(np.array(ours["model.norm.weight"]) == 1.0) and torch.all(theirs["model.norm.weight"] == 1.0)


def test_untrained_weights_refused_where_mlx_lm_needs_weights():
    from mlxrl.errors import ModelError

    with pytest.raises(ModelError, match="load_pretrained_weights: false is not supported for .* on MLX .*"
                                         "use --backend torch"):
        mlx_model.load(ModelParams(model_name="tiny://falcon_h1", load_pretrained_weights=False))


def test_tokenizer_name_and_kwargs_on_mlx_as_on_torch():
    from mlxrl.torch.model import load_tokenizer

    llama = str(tiny_model("llama"))
    params = ModelParams(model_name="tiny://qwen2", tokenizer_name=llama, tokenizer_kwargs={"model_max_length": 77})
    mlx_tok = mlx_model.load(params).tokenizer._tokenizer
    torch_tok = load_tokenizer(params, str(tiny_model("qwen2")))
    assert mlx_tok.model_max_length == torch_tok.model_max_length == 77
    assert mlx_tok.name_or_path == torch_tok.name_or_path == llama


def test_chat_template_kwargs_reach_the_template():
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] }}{% if shout %}!{% endif %}"
                         "<|im_end|>{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                        "completion": [{"role": "assistant", "content": "yo"}]}])
    rows = with_chat_template_kwargs(rows, {"shout": True})
    encoded = encode_sft(rows[0], tok)
    assert tok.decode(encoded["input_ids"]) == "u:hi!<|im_end|>a:yo!<|im_end|>"
    own = with_chat_template_kwargs(datasets.Dataset.from_list(
        [{"prompt": "hi", "completion": "yo", "chat_template_kwargs": {"shout": False}}]), {"shout": True})
    assert own[0]["chat_template_kwargs"] == {"shout": False}  # a row's own setting wins
