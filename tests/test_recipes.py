"""Recipes in the shapes of Oumi's (tests/recipes/*.yaml, written for these tests): each loads,
trains two steps through `mlxrl train` on a tiny model with local data, and trains on the text
the user meant. The encoders are watched while the command runs, so the assertions are on the
rows the run itself encoded, decoded back to text."""

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxrl import chat_templates
from mlxrl.cli import main
from mlxrl.config import load_config
from mlxrl.data import collators, formats

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "tests/recipes"


def _rows(name):
    return [json.loads(x) for x in (RECIPES / "data" / f"{name}.jsonl").read_text().splitlines()]


class Watch:
    """Records what an encoder returns during a run (the tokenizer comes with it)."""

    def __init__(self, monkeypatch, module, name):
        self.calls, inner = [], getattr(module, name)

        def spy(row, tokenizer, index=None):
            out = inner(row, tokenizer, index)
            self.calls.append((formats.unwrap(tokenizer), out))
            return out

        monkeypatch.setattr(module, name, spy)


def train(recipe, out, *extra, backend="mlx"):
    result = CliRunner().invoke(main, ["train", "-c", str(RECIPES / recipe), "--backend", backend,
                                       "--training.output_dir", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.stderr


def notes(stderr):
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def test_sft_alpaca_with_llama3_template_name(tmp_path, monkeypatch):
    from mlxrl.mlx import sft

    watch = Watch(monkeypatch, sft, "encode_sft")
    stderr = train("sft_alpaca.yaml", tmp_path)
    # the notes: one line for each setting MLX cannot honour, nothing for the ones it does
    said = "\n".join(notes(stderr))
    for field in ("fsdp: single device; for several GPUs use --backend torch", "model.enable_liger_kernel",
                  "training.optimizer: adamw_torch_fused", "model.attn_implementation",
                  "data.train.target_col", "training.gradient_checkpointing_kwargs"):
        assert field in said, (field, said)
    for honoured in ("chat_template", "freeze_layers", "tokenizer_pad_token", "collator_name"):
        assert honoured not in said, said
    tok, first = watch.calls[0]
    rows = _rows("alpaca")
    text = tok.decode(first["input_ids"])
    # Llama 3's format around Oumi's alpaca conversation: system prompt, instruction, answer
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nBelow is an instruction")
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{rows[0]['instruction']}<|eot_id|>" in text
    trained = tok.decode([t for t, m in zip(first["input_ids"], first["completion_mask"]) if m])
    assert trained.startswith(rows[0]["output"]) and rows[0]["instruction"] not in trained
    with_input = next(tok.decode(o["input_ids"]) for _, o in watch.calls if "### Input:" in tok.decode(o["input_ids"]))
    assert "paired with an input" in with_input
    # freeze_layers: layer 0 trains nothing, layer 1 does
    from mlx.core import load

    saved = load(str(tmp_path / "adapters.safetensors"))
    assert saved and not any(".layers.0." in k for k in saved)
    assert any(".layers.1." in k and "lora_b" in k and float(abs(v).max()) > 0 for k, v in saved.items())


def test_sft_sharegpt_whole_text_packed(tmp_path, monkeypatch):
    from mlxrl.mlx import sft

    watch = Watch(monkeypatch, sft, "encode_sft")
    targets = []
    monkeypatch.setattr(sft, "apply_target", lambda enc, target: targets.append(target) or
                        collators.apply_target(enc, target))
    stderr = train("sft_sharegpt.yaml", tmp_path)
    assert "rows have the columns of sharegpt" in stderr
    assert "data.train.stream" not in stderr  # set to its default: no word
    tok, first = watch.calls[0]
    text = tok.decode(first["input_ids"])
    assert text.startswith("<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nWhich animal")
    assert set(targets) == {"all"}  # text_with_padding: system and user tokens are trained too
    bins = collators.pack_bfd([len(o["input_ids"]) for _, o in watch.calls], 128)
    assert len(bins) < len(watch.calls) == 8 and f", {len(bins)} examples," in stderr
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


def test_dpo_ultrafeedback_prompt_taken_from_the_conversations(tmp_path, monkeypatch):
    from mlxrl.mlx import dpo

    watch = Watch(monkeypatch, dpo, "encode_preference")
    stderr = train("dpo_ultrafeedback.yaml", tmp_path)
    assert "note: deepspeed: single device" in stderr
    assert "rows have the columns of preference_conversations" in stderr
    tok, first = watch.calls[0]
    row = _rows("ultrafeedback")[0]
    prompt = tok.decode(first["prompt_ids"])
    # Qwen2's default system prompt, then the question once (not once from `prompt` and again
    # from the conversation, which a plain concatenation would give)
    assert prompt == (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      f"{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")
    # TRL scores the template's text after the end-of-turn token too
    assert tok.decode(first["chosen_ids"]) == row["chosen"][1]["content"] + "<|im_end|>\n"
    assert tok.decode(first["rejected_ids"]) == row["rejected"][1]["content"] + "<|im_end|>\n"


def test_grpo_with_oumi_reward_name(tmp_path):
    stderr = train("grpo_tldr.yaml", tmp_path)
    assert any("training.grpo.use_vllm" in x and "MLX has no vLLM" in x for x in notes(stderr))
    assert "repetition_penalty" not in stderr  # honoured by the sampler
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/soft_20tokens_completions/mean" in logged[-1]
    done = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert {d["prompt"] for d in done} <= {r["prompt"] for r in _rows("tldr")}  # the posts, as strings
    for d in done:  # Oumi's soft reward: x e^(1-x), x = whitespace pieces / 20
        x = len(re.split(r"\s+", d["completion"])) / 20
        assert d["rewards"]["soft_20tokens_completions"] == pytest.approx(x * math.exp(1 - x))


def test_letter_count_grpo_local_file_as_dataset_name(tmp_path):
    stderr = train("grpo_letter_count.yaml", tmp_path)
    assert "rows have the columns of oumi-ai/oumi-letter-count" in stderr
    done = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    raw = [json.loads(x) for x in (ROOT / "configs/quickstart/data/letter_count.jsonl").read_text().splitlines()]
    questions = {r["messages"][0]["content"] for r in raw[:16]}
    for d in done:  # Oumi's transform: the \boxed{} system prompt, then the row's question
        system, user = d["prompt"]
        assert "\\boxed{your_answer}" in system["content"] and user["content"] in questions
    assert "rewards/count_letters/mean" in (tmp_path / "metrics.jsonl").read_text()


NUM_ITERATIONS = ["--training.trainer_kwargs", "{vllm_mode: colocate, num_iterations: 2}",
                  "--training.grpo.epsilon", "1e-4", "--training.max_steps", "3",
                  "--training.save_steps", "1", "--training.learning_rate", "1e-2"]


def test_num_iterations_reuses_each_rollout_against_old_logprobs(tmp_path):
    """TRL's num_iterations = 2: steps 1 and 2 train on one rollout (ratio 1, then the updated
    policy against the stored old log-probs, clipped at epsilon 1e-4); step 3 samples anew. A
    checkpoint between the two steps carries the rollout: resuming there gives the same adapter."""
    import shutil

    import mlx.core as mx

    full = tmp_path / "full"
    train("grpo_tldr.yaml", full, *NUM_ITERATIONS)
    logged = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    done = [json.loads(x) for x in (full / "completions.jsonl").read_text().splitlines()]
    assert sorted({d["step"] for d in done}) == [1, 2]  # rollouts 1 and 2 (steps 1 and 3)
    assert logged[0]["clip_ratio/region_mean"] == 0.0 < logged[1]["clip_ratio/region_mean"]
    assert logged[0]["reward"] == logged[1]["reward"] != logged[2]["reward"]
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoint-1", cut / "checkpoint-1")
    assert json.loads((cut / "checkpoint-1/trainer_state.json").read_text())["data"]["reuse"]["cached"]
    train("grpo_tldr.yaml", cut, *NUM_ITERATIONS, "--resume")
    a, b = (mx.load(str(d / "adapters.safetensors")) for d in (full, cut))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_recipe_on_torch_trains_on_the_same_text(tmp_path, monkeypatch):
    """The alpaca recipe on the torch backend: the same template and rows reach TRL, and
    freeze_layers keeps layer 0's adapter at its initial (zero) B."""
    pytest.importorskip("trl")
    from safetensors.numpy import load_file

    from mlxrl.torch import methods

    watch = Watch(monkeypatch, methods, "encode_sft")
    stderr = train("sft_alpaca.yaml", tmp_path, backend="torch")
    assert "note: fsdp: not read; configure it with `accelerate config`" in stderr
    assert "model.enable_liger_kernel" in stderr
    tok, first = watch.calls[0]
    assert f"user<|end_header_id|>\n\n{_rows('alpaca')[0]['instruction']}<|eot_id|>" in tok.decode(first["input_ids"])
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    layer0 = [v for k, v in weights.items() if ".layers.0." in k and "lora_B" in k]
    layer1 = [v for k, v in weights.items() if ".layers.1." in k and "lora_B" in k]
    assert layer0 and all(abs(v).max() == 0 for v in layer0)
    assert any(abs(v).max() > 0 for v in layer1)


def test_freezing_everything_stops_with_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "-c", str(RECIPES / "sft_alpaca.yaml"), "--backend", "mlx", "--quiet",
                                       "--training.output_dir", str(tmp_path), "--model.freeze_layers", "[model]"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: model.freeze_layers ['model'] freezes every trainable parameter"


def test_every_recipe_loads_and_names_its_template():
    for path in sorted(RECIPES.glob("*.yaml")):
        cfg = load_config(path)
        assert chat_templates.resolve(cfg.model.chat_template) is None or cfg.model.chat_template in \
            chat_templates.TEMPLATES, path


def test_mlx_adapter_has_no_layer0_params_after_freeze():
    from mlxrl.config import ModelParams, PeftParams
    from mlxrl.mlx import model as mlx_model

    loaded = mlx_model.load(ModelParams(model_name="tiny://qwen2"), PeftParams(), for_training=True)
    assert mlx_model.freeze_layers(loaded.model, ["model.layers.0", "vision_tower"]) == ["vision_tower"]
    keys = [k for k, _ in tree_flatten(loaded.model.trainable_parameters())]
    assert keys and all(".layers.1." in k for k in keys)


def test_infer_with_a_recipe_renders_its_template_name():
    """The issue's case: `printf 'hello there\\n' | mlxrl infer -c <qwen2 recipe> --model.model_name
    tiny://llama --interactive -v` showed `[prompt: 10 tokens] 'qwen2-instruct'`."""
    result = CliRunner().invoke(main, ["infer", "-c", str(RECIPES / "dpo_ultrafeedback.yaml"), "--model.model_name",
                                       "tiny://llama", "--interactive", "-v", "--generation.max_new_tokens", "4"],
                                input="hello there\n")
    assert result.exit_code == 0, result.output
    (prompt,) = re.findall(r"\[prompt: \d+ tokens\] (.*)", result.output)
    assert prompt == repr("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                          "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
