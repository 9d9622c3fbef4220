"""Oumi's letter-count task: the raw dataset format, its transform, and an offline generator.

A raw row of `oumi-ai/oumi-letter-count` looks like this (columns `conversation_id`, `messages`,
`metadata`):

    {"conversation_id": "oumi_letter_count_0",
     "messages": [{"content": "Can you let me know how many 'r's are in 'pandered'?", "role": "user"}],
     "metadata": {"letter": "r", "letter_count_integer": 1, "letter_count_string": "one",
                  "unformatted_prompt": "Can you let me know how many {letter}s are in {word}?",
                  "word": "pandered"}}

`transform` turns it into what a GRPO trainer sees: `prompt` = [system prompt, the user message]
and `letter_count` = the integer answer (the column the `count_letters` reward reads).

`make_rows` writes rows in the raw format from a built-in word list and prompt templates, so the
walkthrough runs without the hub. Counts are exact (`word.count(letter)`); about one row in five
asks for a letter that is not in the word, so 0 is a common answer, as in the real data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
        "letter_count": int(metadata["letter_count_integer"]),
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
