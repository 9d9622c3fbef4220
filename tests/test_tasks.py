"""The task registry (mlxrl.tasks): Oumi's datasets and rewards under their names, row formats
recognised by their columns, and a user's own task loaded from a file (docs/examples)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from mlxrl import tasks
from mlxrl.data.formats import encode_preference
from mlxrl.data.loading import load_one
from mlxrl.errors import DataError
from mlxrl.rewards import get_reward, load_rewards
from mlxrl.tasks import oumi
from mlxrl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def params(**kw):
    base = dict(dataset_name=None, dataset_path=None, subset=None, split="train", sample_count=None,
                shuffle=False, seed=None, dataset_kwargs={})
    return SimpleNamespace(**{**base, **kw})


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- Oumi's rewards


def test_oumi_reward_names_are_registered():
    for name in ("count_letters", "countdown", "gsm8k", "soft_5tokens_completions", "soft_10tokens_completions",
                 "soft_20tokens_completions", "sharp_5tokens_completions", "sharp_10tokens_completions",
                 "sharp_20tokens_completions"):
        assert callable(get_reward(name)), name


def test_length_rewards():
    """Oumi's completion_length_rewards: n = len(re.split(r"\\s+", text)); soft = x e^(1-x) with
    x = n / target (1.0 at the target); sharp = -|n - target|."""
    soft, sharp = get_reward("soft_10tokens_completions"), get_reward("sharp_5tokens_completions")
    ten = " ".join(["w"] * 10)
    five = " ".join(["w"] * 5)
    assert soft([ten, five, ""]) == pytest.approx([1.0, 0.5 * math.exp(0.5), 0.1 * math.exp(0.9)])
    assert sharp([five, ten, " w "]) == [0.0, -5.0, -2.0]  # " w " splits into "", "w", ""
    conversational = [[{"role": "assistant", "content": ten}]]
    assert soft(conversational) == pytest.approx([1.0])


def test_gsm8k_reward():
    """Oumi's gsm8k (VERL's): strict takes the last `#### n` (commas removed), flexible the last
    number; score 1.0 when it equals the ground truth as text, format_score (0.0) when it does
    not, 0 when there is none."""
    truth = [{"ground_truth": "72"}] * 4
    answers = ["so #### 72", "#### 7,2", "72 clips", "no answer"]
    assert get_reward("gsm8k")(answers, reward_model=truth) == [1.0, 1.0, 0.0, 0.0]
    assert get_reward("gsm8k")(answers, reward_model=truth, method="flexible") == [1.0, 0.0, 1.0, 0.0]
    scored = load_rewards(["gsm8k"], {"gsm8k": {"format_score": 0.1}})
    values = scored.score(["q"] * 2, ["#### 71", "#### 72"], [[1], [1]], {"reward_model": truth[:2]})
    assert values[:, 0].tolist() == [0.1, 1.0]
    raw = get_reward("gsm8k")(["#### 18"], answer=["3 + 15 = 18\n#### 18"])  # the raw dataset's column
    assert raw == [1.0]


def test_countdown_reward():
    """Oumi's countdown (TinyZero's): the last <answer> on the last line; each number used once;
    1.0 when it evaluates to the target (1e-5), format_score (0.0) otherwise, 0 without one."""
    truth = [{"ground_truth": {"target": 24, "numbers": [3, 8, 1]}}]
    fn = get_reward("countdown")
    assert fn(["thinking\n<answer> 3 * 8 * 1 </answer>"], reward_model=truth) == [1.0]
    assert fn(["<answer>(8 - 1) * 3</answer>"], reward_model=truth, format_score=0.1) == [0.1]  # 21
    assert fn(["<answer>3 * 8</answer>"], reward_model=truth, format_score=0.1) == [0.1]  # 1 unused
    assert fn(["<answer>3 * 8 * 1</answer>\nthat's it"], reward_model=truth) == [0.0]  # not last line
    assert fn(["<answer>3 / (1 - 1) * 8</answer>"], reward_model=[{"ground_truth": {"target": 24, "numbers": [3, 1, 1, 8]}}],
              format_score=0.1) == [0.1]  # division by zero
    assert fn(["<answer>3 ** 1 * 8</answer>"], target=[24], nums=[[3, 1, 8]]) == [1.0]  # raw columns


# ----------------------------------------------------------------------------- datasets


def test_alpaca_local_file_and_registered_name(tmp_path, caplog):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = write(tmp_path, "alpaca.jsonl", rows)
    by_file = load_one(params(dataset_name=str(path)))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("mlxrl")]
    assert said == [f"note: dataset ({path}): rows have the columns of yahma/alpaca-cleaned "
                    f"(instruction, output); transformed as it is"]
    by_name = load_one(params(dataset_name="tatsu-lab/alpaca", dataset_path=str(path)))
    assert by_file.to_list() == by_name.to_list()
    first, second = by_name.to_list()
    assert first["messages"] == [{"role": "system", "content": oumi.ALPACA_SYSTEM_WITH_INPUT},
                                 {"role": "user", "content": "Add the numbers.\n\n### Input:\n2 and 3"},
                                 {"role": "assistant", "content": "5"}]
    assert second["messages"][0]["content"] == oumi.ALPACA_SYSTEM
    plain = load_one(params(dataset_name="yahma/alpaca-cleaned", dataset_path=str(path),
                            dataset_kwargs={"include_system_prompt": False}))
    assert [m["role"] for m in plain[0]["messages"]] == ["user", "assistant"]


def test_sharegpt_rows_become_messages(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    ds = load_one(params(dataset_name=str(write(tmp_path, "s.jsonl", rows))))
    assert ds[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"conversations": [{"from": "narrator", "value": "x"}]}]
    with pytest.raises(DataError, match="'from': 'narrator' is not one of"):
        load_one(params(dataset_name=str(write(tmp_path, "b.jsonl", bad))))


def test_ultrafeedback_rows_match_trls_prompt_extraction(tmp_path):
    """A string prompt beside conversations holding it: TRL's maybe_extract_prompt drops the string
    and takes the shared leading messages; so does mlxrl."""
    from trl.data_utils import maybe_extract_prompt

    user = {"role": "user", "content": "Why is the sky blue?"}
    row = {"prompt": "Why is the sky blue?", "chosen": [user, {"role": "assistant", "content": "Scattering."}],
           "rejected": [user, {"role": "assistant", "content": "Paint."}], "score_chosen": 8.0}
    loaded = load_one(params(dataset_name=str(write(tmp_path, "u.jsonl", [row]))))[0]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    reference = maybe_extract_prompt({k: row[k] for k in ("prompt", "chosen", "rejected")})
    assert encode_preference(loaded, tok) == encode_preference(reference, tok)
    assert tok.decode(encode_preference(loaded, tok)["prompt_ids"]).count("Why is the sky blue?") == 1


def test_gsm8k_rows_feed_the_gsm8k_reward(tmp_path):
    rows = [{"question": "Natalia sold 48 clips and then half as many. How many?",
             "answer": "48/2 = 24\n48+24 = 72\n#### 72"}]
    ds = load_one(params(dataset_name="openai/gsm8k", dataset_path=str(write(tmp_path, "g.jsonl", rows))))
    row = ds[0]
    assert row["prompt"][0]["content"].endswith('output the final answer after "####".')
    assert get_reward("gsm8k")(["#### 72"], reward_model=[row["reward_model"]]) == [1.0]


def test_rows_matching_two_formats_stop_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks._REGISTRY, "datasets", list(tasks._REGISTRY.datasets))
    tasks.register_dataset("a", columns=["x"])(lambda row: row)
    tasks.register_dataset("b", columns=["x", "y"])(lambda row: row)
    path = write(tmp_path, "rows.jsonl", [{"x": 1, "y": 2}])
    with pytest.raises(DataError, match=r"rows match several registered formats \(a, b\); name one as dataset_name"):
        load_one(params(dataset_name=str(path)))
    assert load_one(params(dataset_name="a", dataset_path=str(path)))[0] == {"x": 1, "y": 2}


def test_formats_need_their_columns(tmp_path, caplog):
    canonical = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    load_one(params(dataset_name=str(write(tmp_path, "m.jsonl", canonical))))
    assert [r for r in caplog.records if r.name.startswith("mlxrl")] == []  # already mlxrl's columns: nothing to transform
    assert tasks.datasets_matching({"instruction": "x"}) == []


# ----------------------------------------------------------------------------- your own task


@pytest.fixture
def user_tasks(monkeypatch):
    """Load $MLXRL_TASKS afresh in this process; the registry is restored afterwards."""
    registry = tasks._REGISTRY
    for name in ("datasets", "rewards", "system_prompts", "evaluations"):
        monkeypatch.setattr(registry, name, type(getattr(registry, name))(getattr(registry, name)))
    monkeypatch.setattr(registry, "loaded", False)
    monkeypatch.chdir(ROOT)
    return lambda spec: monkeypatch.setenv("MLXRL_TASKS", spec)


def test_user_task_from_a_file_trains_and_evaluates(tmp_path, user_tasks):
    """docs/examples/word_count_task.py, loaded through $MLXRL_TASKS, as the docs say."""
    from click.testing import CliRunner

    from mlxrl.cli import main

    user_tasks("docs/examples/word_count_task.py")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--backend", "mlx", "-c", "docs/examples/word_count_grpo.yaml",
                                       "--training.max_steps", "2", "--training.output_dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows have the columns of example/word-count" in result.stderr
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rewards/word_count_exact/mean" in logged
    result = CliRunner().invoke(main, ["eval", "--model.model_name", str(out), "--task", "word_count",
                                       "--num-samples", "3", "--generation.max_new_tokens", "4",
                                       "--output", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["tasks"]["word_count"]
    assert results["num_samples"] == 3 and 0.0 <= results["accuracy"] <= 1.0
    samples = (tmp_path / "eval" / "word_count_samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 and "sentence" in json.loads(samples[0])


def test_a_broken_task_file_is_one_line(tmp_path, user_tasks):
    from click.testing import CliRunner

    from mlxrl.cli import main

    bad = tmp_path / "bad_task.py"
    bad.write_text("import not_a_module_anywhere\n")
    user_tasks(str(bad))
    result = CliRunner().invoke(main, ["train", "-c", "configs/quickstart/grpo.yaml", "--backend", "mlx",
                                       "--training.output_dir", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "backend: MLX (--backend mlx)"  # the run's first line, then the one error line
    assert lines[1:] == [
        f"error: $MLXRL_TASKS: importing task {str(bad)!r} failed: ModuleNotFoundError: "
        "No module named 'not_a_module_anywhere'"]
