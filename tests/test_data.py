import json
import time
from types import SimpleNamespace

import datasets
import pytest
import transformers

from mlxrl.data.formats import (
    Truncation,
    encode_preference,
    encode_prompt,
    encode_sft,
    truncate_keep_start,
)
from mlxrl.data.loading import load_one, load_split
from mlxrl.errors import DataError
from mlxrl.tasks import letter_count as lc
from mlxrl.testing import tiny_model

ROWS = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(6)]


def params(**kw):
    base = dict(dataset_name=None, dataset_path=None, subset=None, split="train",
                sample_count=None, shuffle=False, seed=None, dataset_kwargs={})
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def files(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(ROWS, indent=2))
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    return {"jsonl": jsonl, "json": as_json, "parquet": parquet}


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_local_files_by_name_and_path(files, kind):
    by_name = load_one(params(dataset_name=str(files[kind])))
    by_path = load_one(params(dataset_name="my-pairs", dataset_path=str(files[kind])))
    assert by_name.to_list() == ROWS == by_path.to_list()


def test_split_slicing_on_local_files(files):
    assert load_one(params(dataset_name=str(files["jsonl"]), split="train[:3]"))["prompt"] == [
        "question 0", "question 1", "question 2"]
    # the split name names the file's only split: the eval config's test[:20] works on a file
    assert len(load_one(params(dataset_name=str(files["parquet"]), split="test[:2]"))) == 2


def test_sampling_and_concatenation(files):
    ds = load_one(params(dataset_name=str(files["jsonl"]), sample_count=9))
    assert [r["prompt"] for r in ds][6:] == ["question 0", "question 1", "question 2"]
    a = load_one(params(dataset_name=str(files["jsonl"]), shuffle=True, seed=3))
    b = load_one(params(dataset_name=str(files["jsonl"]), shuffle=True, seed=3))
    assert a["prompt"] == b["prompt"] and sorted(a["prompt"]) == sorted(r["prompt"] for r in ROWS)
    split = SimpleNamespace(datasets=[params(dataset_name=str(files["jsonl"]), split="train[:2]"),
                                      params(dataset_name=str(files["parquet"]))])
    assert len(load_split(split)) == 8
    with pytest.raises(DataError, match="no datasets configured"):
        load_split(SimpleNamespace(datasets=[]))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line"):
        load_one(params(dataset_name=str(path)))
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        load_one(params(dataset_name=str(path)))


def test_missing_and_empty(tmp_path, files):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        load_one(params(dataset_name=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="dataset_path not found"):
        load_one(params(dataset_name="oumi-ai/oumi-letter-count", dataset_path="missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_one(params(dataset_name=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match=r"split 'train\[6:\]' selects no rows"):
        load_one(params(dataset_name=str(files["jsonl"]), split="train[6:]"))


def test_letter_count_registered_name_with_local_copy(tmp_path):
    path = lc.write_jsonl(tmp_path / "lc.jsonl", 12, seed=0)
    ds = load_one(params(dataset_name="oumi-ai/oumi-letter-count", dataset_path=str(path),
                         split="train[:5]"))
    assert len(ds) == 5
    raw = lc.make_rows(5, seed=0)
    for example, row in zip(ds, raw):  # the walkthrough's snippet works on what we load
        assert example["prompt"][0] == {"role": "system", "content": lc.SYSTEM_PROMPT}
        assert example["prompt"][1]["content"] == row["messages"][0]["content"]
        assert example["letter_count"] == row["metadata"]["letter_count_integer"]
    assert "messages" not in ds.column_names


def test_uncached_hub_name_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(DataError, match="not in the local Hugging Face cache.*offline.*dataset_path"):
        load_one(params(dataset_name="nobody-xyz/not-a-cached-dataset", split="train[:5]"))
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------- formats


def test_encode_preference_strings(tok):
    """Standard (string) rows are TRL's: no chat template, EOS appended to the answers."""
    out = encode_preference({"prompt": "hi there", "chosen": " hello friend",
                             "rejected": " Greetings."}, tok)
    assert tok.decode(out["prompt_ids"]) == "hi there"
    assert tok.decode(out["chosen_ids"]) == " hello friend<|im_end|>"
    assert out["rejected_ids"][-1] == tok.eos_token_id


def test_encode_preference_conversational_and_implicit(tok):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    chosen = [{"role": "assistant", "content": "hello"}]
    rejected = [{"role": "assistant", "content": "go away"}]
    explicit = encode_preference({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tok)
    full = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(explicit["prompt_ids"] + explicit["chosen_ids"]) == full  # ends "<|im_end|>\n"
    implicit = encode_preference({"chosen": prompt + chosen, "rejected": prompt + rejected}, tok)
    assert implicit == explicit
    mixed = encode_preference({"prompt": "hi", "chosen": chosen, "rejected": rejected}, tok)
    assert mixed == encode_preference({"prompt": prompt[1:], "chosen": chosen, "rejected": rejected}, tok)


def test_missing_fields_name_field_and_row(tok):
    with pytest.raises(DataError, match="row 4: field 'rejected' is missing"):
        encode_preference({"prompt": "a", "chosen": "b"}, tok, index=4)
    with pytest.raises(DataError, match="row 2: field 'chosen' is empty"):
        encode_preference({"prompt": "a", "chosen": "", "rejected": "c"}, tok, index=2)
    with pytest.raises(DataError, match="row 0: field 'prompt' is missing"):
        encode_prompt({"question": "a"}, tok, index=0)
    with pytest.raises(DataError, match="needs 'messages', or 'prompt' and 'completion'"):
        encode_sft({"text": "a"}, tok)


def test_encode_sft_masks_assistant_turns(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    out = encode_sft({"messages": messages}, tok)
    ids, mask = out["input_ids"], out["completion_mask"]
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "a1<|im_end|>\na2<|im_end|>\n"
    pc = encode_sft({"prompt": [messages[1]], "completion": [messages[2]]}, tok)
    assert tok.decode([t for t, m in zip(pc["input_ids"], pc["completion_mask"]) if m]) == (
        "a1<|im_end|>\n")
    assert pc["input_ids"][: pc["completion_mask"].index(1)] == encode_prompt({"prompt": [messages[1]]}, tok)
    plain = encode_sft({"prompt": "q", "completion": " a"}, tok)  # standard: no template, EOS added
    assert tok.decode(plain["input_ids"]) == "q a<|im_end|>"


def test_encode_prompt_with_mlx_lm_wrapper(tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    messages = lc.transform(lc.make_rows(1, seed=0)[0])["prompt"]
    ids = encode_prompt({"prompt": messages}, TokenizerWrapper(tok))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids == encode_prompt({"prompt": messages}, tok)


def test_truncation_keep_start():
    assert truncate_keep_start([1, 2, 3], [4, 5, 6], 5) == [4, 5]
    assert truncate_keep_start([1, 2, 3], [4, 5, 6], 3) is None  # prompt alone >= max_length
    assert truncate_keep_start([1, 2, 3], [4, 5, 6], None) == [4, 5, 6]
    t = Truncation(max_length=5)
    assert t.preference({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}) == {
        "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    assert t.message() is None
    cut = t.preference({"prompt_ids": [1, 2], "chosen_ids": [3] * 5, "rejected_ids": [4]})
    assert cut["chosen_ids"] == [3, 3, 3]
    assert t.preference({"prompt_ids": [1] * 5, "chosen_ids": [3], "rejected_ids": [4]}) is None
    assert t.sft({"input_ids": [1] * 8, "completion_mask": [0, 0, 1, 1, 1, 1, 1, 1]}) == {
        "input_ids": [1] * 5, "completion_mask": [0, 0, 1, 1, 1]}
    assert t.sft({"input_ids": [1] * 8, "completion_mask": [0] * 6 + [1, 1]}) is None
    assert t.message() == "2 of 5 rows truncated to max_length=5; 2 dropped (prompt alone >= max_length)"
