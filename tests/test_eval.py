"""`mlxrl eval`, `compare` and `data inspect`: metrics checked against hand computations."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxrl.cli import main
from mlxrl.evaluation import EvalConfig, EvalTaskParams, Evaluator
from mlxrl.tasks.letter_count import SYSTEM_PROMPT, letter_count_metrics, make_row

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny://qwen2"
PAIRS = [
    {"prompt": "How many 'l's are in 'hello'?", "chosen": "It has 2. \\boxed{2}", "rejected": "Maybe 5."},
    {"prompt": "Count the 'a's in 'banana'.", "chosen": "\\boxed{3}", "rejected": "I am not sure."},
    {"prompt": "Hello!", "chosen": "Hi, how are you?", "rejected": "Greetings."},
]


def test_letter_count_metrics_by_hand():
    responses = ["so \\boxed{3}", "\\boxed{2}", "three", "\\boxed{1} or \\boxed{1}", "\\boxed{+2}",
                 "\\boxed{two}"]
    targets = [3, 3, 1, 1, 2, 2]
    # correct: rows 0 and 4 (+2 is 2); parsed: rows 0, 1, 4; invalid: no box, two boxes, a word
    assert letter_count_metrics(responses, targets) == {
        "accuracy": 2 / 6, "properly_extracted_accuracy": 2 / 3, "num_samples": 6,
        "num_correct_answers": 2, "num_incorrect_answers": 1, "num_invalid_answers": 3}
    assert letter_count_metrics(["none"], [0])["properly_extracted_accuracy"] == 0.0


class CannedEngine:
    """An engine whose answers are fixed: the eval's data handling is what is under test."""

    name = "canned"

    def __init__(self, answers):
        from transformers import AutoTokenizer

        from mlxrl.testing import tiny_model

        self.answers, self.seen = answers, []
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))

    def generate(self, conversations, progress=False):
        self.seen += conversations
        return self.answers[: len(conversations)]


@pytest.fixture
def letter_file(tmp_path):
    rows = [make_row(0, "hello", "l", "How many {letter}s are in {word}?"),
            make_row(1, "banana", "a", "Count the {letter}s in {word}."),
            make_row(2, "sky", "z", "How many {letter}s are in {word}?"),
            make_row(3, "tennessee", "e", "How many {letter}s are in {word}?")]
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path  # counts 2, 3, 0, 4


def test_letter_count_and_reward_tasks_on_fixed_data(letter_file, tmp_path):
    engine = CannedEngine(["\\boxed{2}", "\\boxed{2}", "no idea", "\\boxed{4}"])
    tasks = [EvalTaskParams("letter_count", dataset_name=str(letter_file), split="train[:4]"),
             EvalTaskParams("reward", dataset_name=str(letter_file), split="train[:4]",
                            reward_functions=["count_letters", "letter_count"])]
    cfg = EvalConfig(tasks=tasks, output_dir=str(tmp_path / "out"))
    results = Evaluator(cfg, engine=engine).run()["tasks"]
    assert results["letter_count"] == {
        "accuracy": 0.5, "properly_extracted_accuracy": 2 / 3, "num_samples": 4,
        "num_correct_answers": 2, "num_incorrect_answers": 1, "num_invalid_answers": 1}
    # count_letters: exact 0, off by one 1/1.5 - 2, no box -3, exact 0; letter_count: 1, 0, 0, 1
    count_letters = [0.0, 1 / 1.5 - 2, -3.0, 0.0]
    assert results["reward"]["rewards/count_letters/mean"] == pytest.approx(np.mean(count_letters))
    assert results["reward"]["rewards/letter_count/mean"] == pytest.approx(0.5)
    assert results["reward"]["reward"] == pytest.approx(np.mean(np.array(count_letters) + [1, 0, 0, 1]))
    assert len(engine.seen) == 4  # both tasks share one generation of the same prompts
    assert engine.seen[0][0] == {"role": "system", "content": SYSTEM_PROMPT}  # Oumi's transform
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["tasks"]["letter_count"]["num_correct_answers"] == 2
    samples = (tmp_path / "out" / "letter_count_samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["target"] for s in samples] == [2, 3, 0, 4]


# ----------------------------------------------------------------------------- preference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model with a random (nonzero) LoRA adapter, saved as an mlxrl checkpoint."""
    from mlx.utils import tree_flatten

    from mlxrl.config import ModelParams, PeftParams
    from mlxrl.mlx import model as mlx_model

    folder = tmp_path_factory.mktemp("ckpt")
    loaded = mlx_model.load(ModelParams(model_name=TINY), PeftParams(lora_r=4, lora_alpha=8),
                            for_training=True)
    rng = np.random.default_rng(0)
    updates = [(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
               for k, v in tree_flatten(loaded.model.trainable_parameters()) if k.endswith("lora_b")]
    loaded.model.load_weights(updates, strict=False)
    mlx_model.save_adapter(loaded.model, folder, mlx_model.adapter_config_for(loaded))
    return folder


def _completion_logps(model, tok, prompt: str, answer: str) -> float:
    """Summed log-probs of the answer's tokens and the EOS after the prompt: string pairs are
    TRL's standard format (plain text, no chat template)."""
    ids = tok(prompt + answer + "<|im_end|>")["input_ids"]
    head = tok(prompt)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(sum(logp[t - 1, ids[t]] for t in range(n, len(ids))))


def test_preference_metrics_match_a_hand_computation(checkpoint, tmp_path):
    from mlx_lm import load

    from mlxrl.evaluation import evaluate
    from mlxrl.testing import tiny_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    result = evaluate(str(checkpoint), ["preference"], dataset=str(pairs))
    got = result["tasks"]["preference"]

    base, tok = load(str(tiny_model("qwen2")))
    tok = tok._tokenizer
    policy, _ = load(str(tiny_model("qwen2")), adapter_path=str(checkpoint))
    beta, margins, wins = 0.1, [], []
    for p in PAIRS:
        chosen = [_completion_logps(m, tok, p["prompt"], p["chosen"]) for m in (policy, base)]
        rejected = [_completion_logps(m, tok, p["prompt"], p["rejected"]) for m in (policy, base)]
        reward_c, reward_r = beta * (chosen[0] - chosen[1]), beta * (rejected[0] - rejected[1])
        margins.append(reward_c - reward_r)
        wins.append(reward_c > reward_r)
    assert got["num_pairs"] == 3
    assert got["mean_reward_margin"] == pytest.approx(np.mean(margins), abs=1e-4)
    assert got["preference_accuracy"] == pytest.approx(np.mean(wins))
    assert abs(got["mean_reward_margin"]) > 1e-3  # the adapter does change the model


def test_a_peft_checkpoint_answers_as_the_mlx_one(checkpoint, tmp_path):
    """A `--backend torch` checkpoint is a PEFT folder: it is converted once and loaded."""
    from mlxrl import infer
    from mlxrl.adapters import export_peft

    peft = export_peft(checkpoint, tmp_path / "peft")
    assert (peft / "adapter_model.safetensors").is_file()
    prompts = ["hello", "How many 'l's are in 'hello'?"]
    mlx_replies = infer(prompts, str(checkpoint), max_new_tokens=8)
    assert infer(prompts, str(peft), max_new_tokens=8) == mlx_replies
    assert infer(prompts, TINY, max_new_tokens=8) != mlx_replies  # the adapter matters


def test_base_model_preference_is_zero_and_says_why(caplog):
    from mlxrl.evaluation import evaluate

    got = evaluate(TINY, "preference", num_samples=4)["tasks"]["preference"]
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("mlxrl")]
    assert got["mean_reward_margin"] == 0.0 and got["preference_accuracy"] == 0.0
    assert any("no adapter" in n for n in notes) and any("generated" in n for n in notes)


# ----------------------------------------------------------------------------- command line


def test_eval_cli_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--model.model_name", TINY, "--num-samples", "8",
                                       "--task", "letter_count", "--task", "reward", "--output", str(out),
                                       "--generation.max_new_tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "letter_count  properly_extracted_accuracy" in result.output
    metrics = json.loads((out / "eval_results.json").read_text())["tasks"]["letter_count"]
    assert metrics["num_samples"] == 8
    assert metrics["num_correct_answers"] + metrics["num_incorrect_answers"] \
        + metrics["num_invalid_answers"] == 8


def test_eval_reads_oumi_style_task_configs(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {{model_name: '{TINY}'}}\ngeneration: {{max_new_tokens: 4}}\n"
                      "tasks:\n  - {evaluation_backend: custom, task_name: count_letters, num_samples: 6}\n")
    result = CliRunner().invoke(main, ["evaluate", "-c", str(config), "--tasks.0.num_samples", "3"])
    assert result.exit_code == 0, result.output
    assert "letter_count  num_samples" in result.output and " 3\n" in result.output


def test_compare_two_models_side_by_side(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["compare", TINY, str(checkpoint), "--prompt", "hello",
                                       "--prompt", "How many 'l's are in 'hello'?", "--eval",
                                       "letter_count", "--num-samples", "4", "--output", str(tmp_path),
                                       "--generation.max_new_tokens", "5"])
    assert result.exit_code == 0, result.output
    for text in ("=== prompt 1: hello", "=== prompt 2:", f"[A] {TINY}:", f"[B] {checkpoint}:",
                 "letter_count  accuracy"):
        assert text in result.output, text
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["models"] == [TINY, str(checkpoint)] and len(saved["metrics"]) == 2
    assert all(len(a) == 2 for a in saved["answers"].values())


def test_data_inspect_prints_the_walkthrough_layout(letter_file):
    runner = CliRunner()
    pairs = ROOT / "configs/quickstart/data/preferences.jsonl"
    result = runner.invoke(main, ["data", "inspect", str(pairs), "--split", "train[:2]"])
    assert result.exit_code == 0, result.output
    assert result.output.count("PROMPT:") == 2 and "\u2705 CHOSEN:" in result.output
    assert "\u274c REJECTED:" in result.output
    registered = ["oumi-ai/oumi-letter-count", "--dataset_path", str(letter_file)]
    for args in (registered, [str(letter_file)]):  # raw rows are transformed either way
        result = runner.invoke(main, ["data", "inspect", *args, "--split", "train[:3]"])
        assert result.exit_code == 0, result.output
        assert "PROMPT: How many 'l's are in 'hello'?\nANSWER: 2" in result.output
        assert "ANSWER: 3" in result.output and "ANSWER: 0" in result.output
