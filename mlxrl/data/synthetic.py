"""Small generated datasets the tiny models can learn offline (quickstart, tests, demos).

Built on the letter-count task so the three methods tell one story: SFT teaches the answer
format, DPO prefers correct boxed answers over wrong unboxed ones, GRPO rewards exact counts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlxrl.tasks.letter_count import SYSTEM_PROMPT, make_rows


def _answer(word: str, letter: str, count: int) -> str:
    return f"'{word}' has {count} '{letter}'. \\boxed{{{count}}}"


def _wrong(rng: random.Random, count: int) -> str:
    wrong = count + rng.choice([-2, -1, 1, 2, 3]) if count > 1 else count + rng.choice([1, 2, 3])
    return rng.choice([f"Maybe {wrong}.", f"I think it is {wrong}.", f"About {wrong} or so.", "I am not sure."])


def _question(raw: dict) -> tuple[str, str, str, int]:
    meta = raw["metadata"]
    return raw["messages"][0]["content"], meta["word"], meta["letter"], meta["letter_count_integer"]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Plain-string preference pairs (the Human-Like-DPO form): a correct, boxed answer is
    chosen; a wrong, unboxed guess is rejected."""
    rng = random.Random(seed + 1)
    rows = []
    for raw in make_rows(n, seed):
        question, word, letter, count = _question(raw)
        rows.append({"prompt": question, "chosen": _answer(word, letter, count), "rejected": _wrong(rng, count)})
    return rows


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations with the letter-count system prompt and a correct, boxed answer."""
    rows = []
    for raw in make_rows(n, seed):
        question, word, letter, count = _question(raw)
        rows.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": question},
                                  {"role": "assistant", "content": _answer(word, letter, count)}]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
