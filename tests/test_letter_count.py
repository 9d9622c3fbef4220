import json
from collections import Counter

from mlxrl.tasks import letter_count as lc

EXPECTED_SYSTEM_PROMPT = (
    'Your final answer should be an integer written as digits and formatted as '
    '"\\boxed{your_answer}". For example, if the answer is 42, you should output "\\boxed{42}".'
)


def test_raw_format_columns():
    rows = lc.make_rows(20, seed=1)
    for i, row in enumerate(rows):
        assert set(row) == {"conversation_id", "messages", "metadata"}
        assert row["conversation_id"] == f"oumi_letter_count_{i}"
        assert row["messages"][0]["role"] == "user"
        meta = row["metadata"]
        assert set(meta) == {"letter", "letter_count_integer", "letter_count_string",
                             "unformatted_prompt", "word"}
        expected = meta["unformatted_prompt"].format(letter=f"'{meta['letter']}'",
                                                     word=f"'{meta['word']}'")
        assert row["messages"][0]["content"] == expected


def test_counts_are_correct_and_spread():
    rows = lc.make_rows(500, seed=0)
    counts = Counter()
    for row in rows:
        meta = row["metadata"]
        n = meta["word"].count(meta["letter"])
        assert meta["letter_count_integer"] == n
        assert meta["letter_count_string"] == lc.number_word(n)
        counts[n] += 1
    assert counts[0] > 50 and counts[1] > 100 and counts[2] > 50 and max(counts) >= 4
    assert len({r["metadata"]["unformatted_prompt"] for r in rows}) == len(lc.PROMPT_TEMPLATES)


def test_deterministic_for_a_seed(tmp_path):
    assert lc.make_rows(30, seed=5) == lc.make_rows(30, seed=5)
    assert lc.make_rows(30, seed=5) != lc.make_rows(30, seed=6)
    path = lc.write_jsonl(tmp_path / "d" / "lc.jsonl", 10, seed=5)
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == lc.make_rows(10, seed=5)


def test_transform_matches_oumi():
    assert lc.SYSTEM_PROMPT == EXPECTED_SYSTEM_PROMPT
    raw = {
        "conversation_id": "oumi_letter_count_0",
        "messages": [{"content": "Can you let me know how many 'r's are in 'pandered'?",
                      "role": "user"}],
        "metadata": {"letter": "r", "letter_count_integer": 1, "letter_count_string": "one",
                     "unformatted_prompt": "Can you let me know how many {letter}s are in {word}?",
                     "word": "pandered"},
    }
    out = lc.transform(raw)
    assert out["prompt"] == [
        {"role": "system", "content": EXPECTED_SYSTEM_PROMPT},
        {"role": "user", "content": "Can you let me know how many 'r's are in 'pandered'?"},
    ]
    assert out["letter_count"] == 1
    assert out["metadata"]["word"] == "pandered"
    assert out["prompt"][1]["content"].endswith("'pandered'?")
