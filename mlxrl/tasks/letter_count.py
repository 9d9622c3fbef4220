"""Oumi's letter-count task as one plug-in: the dataset and its transform, an offline generator,
the `count_letters` and `letter_count` rewards, the `letter_count` eval and its system prompt.
It registers itself through `mlxrl.tasks`, as a user's own task would.

A raw row of `oumi-ai/oumi-letter-count` looks like this (columns `conversation_id`, `messages`,
`metadata`):

    {"conversation_id": "oumi_letter_count_0",
     "messages": [{"content": "Can you let me know how many 'r's are in 'pandered'?", "role": "user"}],
     "metadata": {"letter": "r", "letter_count_integer": 1, "letter_count_string": "one",
                  "unformatted_prompt": "Can you let me know how many {letter}s are in {word}?",
                  "word": "pandered"}}

`transform` turns it into what a GRPO trainer sees: `prompt` = [system prompt, the user message]
and `letter_count` = the integer answer (the column the `count_letters` reward reads). Rows in
this format are recognised in any file, under any dataset name.

`make_rows` writes rows in the raw format from a built-in word list and prompt templates, so the
walkthrough runs without the hub. Counts are exact (`word.count(letter)`); about one row in five
asks for a letter that is not in the word, so 0 is a common answer, as in the real data.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mlxrl.tasks import (
    register_dataset,
    register_evaluation,
    register_reward,
    register_system_prompt,
)

SYSTEM_PROMPT = (
    'Your final answer should be an integer written as digits and formatted as "\\boxed{your_answer}". '
    'For example, if the answer is 42, you should output "\\boxed{42}".'
)

# Placeholders are filled with the quoted letter and word, e.g. "'r'" and "'pandered'", as Oumi's.
PROMPT_TEMPLATES = (
    "Can you let me know how many {letter}s are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "How many {letter}s are in {word}?",
    "Count the number of {letter}s in the word {word}.",
    "In the word {word}, how many times does {letter} occur?",
    "Could you count the {letter}s in {word} for me?",
    "What is the number of {letter}s in {word}?",
    "Tell me how many {letter}s there are in {word}.",
    "How often does the letter {letter} show up in {word}?",
    "I need to know the count of {letter}s in {word}. How many are there?",
)

WORDS = tuple(dict.fromkeys((
    "apple banana strawberry mississippi tennessee constitution hello pandered raspberry "
    "bookkeeper committee balloon coffee letter address possession occurrence parallel "
    "assessment embarrass millennium necessary accommodate abbreviation giraffe hippopotamus "
    "elephant alligator kangaroo butterfly caterpillar dragonfly grasshopper mosquito "
    "penguin flamingo chimpanzee rhinoceros crocodile armadillo porcupine salamander "
    "peppermint cinnamon broccoli cucumber zucchini avocado pineapple watermelon tomato "
    "potato onion garlic spaghetti lasagna cappuccino espresso chocolate vanilla caramel "
    "marshmallow blueberry cranberry gooseberry huckleberry pomegranate tangerine "
    "mountain river ocean volcano glacier waterfall hurricane tornado thunderstorm "
    "rainbow horizon universe galaxy satellite telescope microscope laboratory "
    "chemistry biology astronomy philosophy psychology mathematics literature geography "
    "engineering architecture photography calligraphy choreography encyclopedia "
    "dictionary vocabulary grammar sentence paragraph punctuation exclamation "
    "question answer keyboard computer algorithm function variable parameter "
    "interface database protocol internet bandwidth processor transistor "
    "committee referee mirror error terror barrel cellar pepper puppet bubble "
    "puzzle jazz fizz buzz pizza dazzle sizzle muzzle nuzzle razzmatazz "
    "success address assassin possess excess recess mattress fortress princess "
    "goddess happiness business wilderness lioness tattoo toffee teepee "
    "referendum renaissance rendezvous entrepreneur connoisseur silhouette "
    "questionnaire millionaire billionaire volunteer engineer pioneer career "
    "banana cabana bandana savanna anagram alabama panorama pajamas "
    "level radar civic kayak rotor racecar refer madam noon deed "
    "xylophone quartz rhythm syzygy crypt lynx sphinx nymph gypsy "
    "onomatopoeia supercalifragilisticexpialidocious antidisestablishmentarianism floccinaucinihilipilification"
).split()))

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def number_word(n: int) -> str:
    """English word for 0..20, digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _is_letter_count(row: dict) -> bool:
    return isinstance(row.get("metadata"), dict) and "letter_count_integer" in row["metadata"]


def _preview(row: dict) -> list[str] | None:
    if "letter_count" not in row or not isinstance(row.get("prompt"), list):
        return None
    return [f"PROMPT: {row['prompt'][-1]['content']}", f"ANSWER: {row['letter_count']}"]


@register_dataset("oumi-ai/oumi-letter-count", aliases=["oumi-ai/oumi-letter-count-clean"],
                  columns=["messages", "metadata"], accepts=_is_letter_count, preview=_preview)
def transform(raw_row: dict) -> dict:
    """Oumi's transform: `prompt` = [system, messages[0]], `letter_count` from the metadata.

    `metadata` and `conversation_id` are kept (extra columns reach reward functions as keyword
    arguments, which take `**kwargs`).
    """
    messages = raw_row["messages"]
    metadata = raw_row["metadata"]
    user = {"role": messages[0]["role"], "content": messages[0]["content"]}
    out = {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, user],
        "letter_count": metadata["letter_count_integer"],  # as given, as Oumi's transform
        "metadata": metadata,
    }
    if "conversation_id" in raw_row:
        out["conversation_id"] = raw_row["conversation_id"]
    return out


def make_row(index: int, word: str, letter: str, template: str) -> dict:
    """One raw row for `letter` in `word`, phrased with `template`."""
    count = word.count(letter)
    content = template.format(letter=f"'{letter}'", word=f"'{word}'")
    return {
        "conversation_id": f"oumi_letter_count_{index}",
        "messages": [{"content": content, "role": "user"}],
        "metadata": {
            "letter": letter,
            "letter_count_integer": count,
            "letter_count_string": number_word(count),
            "unformatted_prompt": template,
            "word": word,
        },
    }


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` raw rows, the same for the same seed.

    The letter is drawn from the word's own letters (weighted by how often they occur, so
    repeated letters are asked about more) four times in five, else from letters absent from
    the word (count 0).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(WORDS)
        absent = [c for c in ALPHABET if c not in word]
        if absent and rng.random() < 0.2:
            letter = rng.choice(absent)
        else:
            letter = rng.choice(word)
        rows.append(make_row(i, word, letter, rng.choice(PROMPT_TEMPLATES)))
    return rows


def write_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `make_rows(n, seed)` as JSON lines; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in make_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


register_system_prompt("letter_count", SYSTEM_PROMPT)


# ----------------------------------------------------------------------------- rewards

_BOXED_INT = re.compile(r"\\boxed\{([-+]?\d+)\}")
_BOXED_ANY = re.compile(r"\\boxed\{([^{}]*)\}")
_DIGITS = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?\d+|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def _text(completion) -> str:
    """The completion's text: a string, or the first message's content (conversational)."""
    if isinstance(completion, str):
        return completion
    return completion[0]["content"]


def extract_prediction(response: str) -> int | None:
    """Oumi's rule: exactly one `\\boxed{int}` in the response, else None."""
    found = _BOXED_INT.findall(response)
    return int(found[0]) if len(found) == 1 else None


def compute_letter_count_reward(completion: str, target_count) -> float:
    """Oumi's values: 0.0 when exact, 1/(|error| + 0.5) - 2 when off, -3.0 when unparsable.

    `target_count` is compared as given, as Oumi does: a 2.5 target and `\\boxed{2}` give -1.0.
    """
    count = extract_prediction(completion)
    if count is None:
        return -3.0
    return 1 / (abs(count - target_count) + 0.5) - 2


@register_reward("count_letters")
def count_letters(completions, letter_count, **kwargs) -> list[float]:
    """Oumi's `count_letters` reward, value for value (oumi-compat.md section 4).

    Exact count in a single `\\boxed{n}`: 0.0 (the maximum). Off by d: 1/(d + 0.5) - 2
    (-1.333 for 1, -1.6 for 2, towards -2). No box, a non-digit box, or several boxes: -3.0.
    """
    return [compute_letter_count_reward(_text(c), t) for c, t in zip(completions, letter_count)]


def _parse_number(token: str) -> int | None:
    token = token.strip().lower()
    if _DIGITS.fullmatch(token):
        return int(token)
    return NUMBER_WORDS.index(token) if token in NUMBER_WORDS else None


def letter_count_score(response: str, target: int) -> float:
    """1.0 / 0.5 / 0.0 for one response; see `letter_count`."""
    target = int(target)
    boxes = _BOXED_ANY.findall(response)
    if boxes:
        values = [_parse_number(b) for b in boxes]
        if len(boxes) == 1 and _DIGITS.fullmatch(boxes[0]):
            return 1.0 if values[0] == target else 0.0
        return 0.5 if all(v == target for v in values) else 0.0
    numbers_ = _NUMBER.findall(response)
    return 0.5 if numbers_ and _parse_number(numbers_[-1]) == target else 0.0


@register_reward("letter_count")
def letter_count(completions, letter_count, **kwargs) -> list[float]:
    """The walkthrough's reward: 1.0 correct, 0.0 wrong, 0.5 for a right answer in the wrong form.

    - 1.0: exactly one `\\boxed{n}` with digits (sign allowed, `\\boxed{+3}`) and n is the count.
    - 0.5: the right count, but not as one boxed integer: `\\boxed{three}`, the same right value
      boxed several times, or no box at all and the LAST number in the text (digits or a number
      word zero..twenty) is the count ("There are 3 r's.").
    - 0.0: a wrong boxed value, boxes that disagree (hedging, "\\boxed{2} or \\boxed{3}"), or no
      box and the last number is wrong or missing.
    Taking the last number, not any number, keeps "1 2 3 4 5" from earning credit.
    """
    return [letter_count_score(_text(c), t) for c, t in zip(completions, letter_count)]


# ----------------------------------------------------------------------------- evaluation


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def letter_count_metrics(responses: list[str], targets: list[int]) -> dict:
    """Oumi's `count_letters` eval metrics for responses and their true counts."""
    predictions = [extract_prediction(r) for r in responses]
    total = len(responses)
    valid = sum(p is not None for p in predictions)
    correct = sum(p is not None and p == t for p, t in zip(predictions, targets))  # as Oumi: no cast
    return {"accuracy": correct / total if total else 0.0,
            "properly_extracted_accuracy": correct / valid if valid else 0.0,
            "num_samples": total, "num_correct_answers": correct,
            "num_incorrect_answers": valid - correct, "num_invalid_answers": total - valid}


def _generated(n: int, seed: int) -> list[dict]:
    return [transform(row) for row in make_rows(n, seed)]


@register_evaluation("letter_count", aliases=["count_letters"], generate=_generated)
def evaluate_letter_count(rows: list[dict], responses: list[str]) -> tuple[dict, list[dict]]:
    """Greedy answers to letter-count prompts (with the `\\boxed{}` system prompt): Oumi's metrics
    and one sample per row."""
    from mlxrl.errors import DataError

    if "letter_count" not in rows[0]:
        raise DataError(f"letter_count task: rows need a 'letter_count' column (or raw "
                        f"oumi-letter-count rows); this dataset has {sorted(rows[0])}")
    targets = [r["letter_count"] for r in rows]
    samples = [{"prompt": _prompt_text(r["prompt"]), "response": s, "target": t}
               for r, s, t in zip(rows, responses, targets)]
    return letter_count_metrics(responses, targets), samples
