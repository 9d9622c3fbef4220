"""An example of your own mlxrl task: count the words of a sentence.

It registers a dataset format, a reward, a system prompt and an eval task, the same way mlxrl's
own letter-count task does (mlxrl/tasks/letter_count.py). Use it with:

    MLXRL_TASKS=docs/examples/word_count_task.py mlxrl train -c docs/examples/word_count_grpo.yaml
    MLXRL_TASKS=docs/examples/word_count_task.py mlxrl eval --model.model_name output/word_count \
        --task word_count
"""

import random
import re

from mlxrl.tasks import (
    register_dataset,
    register_evaluation,
    register_reward,
    register_system_prompt,
)

SYSTEM_PROMPT = "Reply with one number: how many words the sentence has."
WORDS = "the a cat dog sat ran on under mat tree quickly slowly red big small house".split()


# Rows with a `sentence` column (in any file, or under the name `example/word-count`) become a
# GRPO prompt and the answer column the reward reads.
@register_dataset("example/word-count", columns=["sentence"])
def to_prompt(row: dict) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": row["sentence"]}],
            "num_words": len(row["sentence"].split())}


def _first_number(text: str) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


# A reward has TRL's signature: completions, plus dataset columns as keyword arguments.
@register_reward("word_count_exact")
def word_count_exact(completions, num_words, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if _first_number(t) == n else 0.0 for t, n in zip(texts, num_words)]


# `mlxrl infer --system-prompt word_count`
register_system_prompt("word_count", SYSTEM_PROMPT)


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [to_prompt({"sentence": " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))}) for _ in range(n)]


# `mlxrl eval --task word_count`: metrics of the answers, and per-row samples.
@register_evaluation("word_count", generate=make_rows)
def score(rows: list[dict], responses: list[str]) -> tuple[dict, list[dict]]:
    right = [_first_number(r) == row["num_words"] for row, r in zip(rows, responses)]
    samples = [{"sentence": row["prompt"][-1]["content"], "response": r} for row, r in zip(rows, responses)]
    return {"accuracy": sum(right) / len(right), "num_samples": len(right)}, samples
