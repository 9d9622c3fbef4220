"""Rows -> token ids, through the tokenizer's chat template.

Every row is turned into messages and templated, as TRL does for conversational data and Oumi
does for its registered DPO datasets:
- a plain-string `prompt` is one user message; plain-string `chosen`/`rejected`/`completion` are
  one assistant message each (so HumanLLMs/Human-Like-DPO-Dataset's strings are chat-templated);
- prompt ids = template(prompt, add_generation_prompt=True); full = template(prompt + answer);
  completion ids = full[len(prompt ids):];
- a completion ends with the template's end-of-turn token: tokens the template adds after it
  (ChatML's trailing newline) are cut, and the tokenizer's EOS is appended when the template
  adds no end-of-turn token. Generation stops at that token, so it is part of what is scored.

Per-row `tools` and `chat_template_kwargs` columns are forwarded to the template, as in TRL.

Truncation follows TRL's `keep_start`: a sequence keeps its first `max_length` tokens, and a row
whose prompt alone is `>= max_length` tokens is dropped. `Truncation` counts both so a trainer can
report them once. Before templating, each text is cut to `char_limit` characters, a bound past
which no kept token can come from (a token covers at most as many characters as its longest
spelling), so a 10 MB row costs what a row of max_length tokens costs. A preference row whose
chosen and rejected completions are the same tokens teaches nothing: it is dropped and counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from mlxrl.errors import DataError

# End-of-turn tokens of common chat templates, used when the tokenizer has them as tokens.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
                "<|endoftext|>", "</s>")


def unwrap(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper, or `tokenizer` itself."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and hasattr(inner, "apply_chat_template"):
        return inner
    return tokenizer


def end_of_turn_ids(tokenizer) -> set[int]:
    """The EOS id plus the known end-of-turn tokens this tokenizer has."""
    tok = unwrap(tokenizer)
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    added = tok.get_added_vocab()  # special tokens only: small, unlike get_vocab()
    ids.update(added[t] for t in _END_OF_TURN if t in added)
    return ids


# ----------------------------------------------------------------------------- templating


def _where(index: int | None) -> str:
    return f"row {index}" if index is not None else "row"


def _field(row: dict, name: str, index: int | None):
    value = row.get(name)
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        state = "missing" if value is None else "empty"
        raise DataError(f"{_where(index)}: field {name!r} is {state}")
    return value


def _as_messages(value, role: str, name: str, index: int | None) -> list[dict]:
    """A string becomes one `role` message; a list of {role, content} dicts stays as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [dict(m) for m in value]
    raise DataError(f"{_where(index)}: field {name!r} must be a string or a list of "
                    f"{{role, content}} messages, got {type(value).__name__}")


_LONGEST_TOKEN: dict[int, int] = {}


def char_limit(tokenizer, max_length: int | None) -> int | None:
    """Characters of a text that can hold the first `max_length` tokens, with a margin: any
    token covers at most `longest spelling` characters, so text past this cannot be kept."""
    if max_length is None:
        return None
    tok = unwrap(tokenizer)
    if id(tok) not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[id(tok)] = max(map(len, tok.get_vocab()), default=16)
    return 2 * max_length * max(_LONGEST_TOKEN[id(tok)], 1) + 1024


def cut_row(row: dict, limit: int | None) -> dict:
    """`row` with every text (a string column, or the content of a message in a list column) cut
    to `limit` characters; `row` itself when nothing is that long."""
    if limit is None:
        return row

    def cut(value):
        if isinstance(value, str) and len(value) > limit:
            return value[:limit]
        if isinstance(value, list) and any(isinstance(m, dict) for m in value):
            return [{**m, "content": cut(m["content"])} if isinstance(m, dict) and "content" in m
                    else m for m in value]
        return value

    cut_values = {k: cut(v) for k, v in row.items()}
    return cut_values if any(cut_values[k] is not row[k] for k in row) else row


def _template(tok, row: dict, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    kwargs = dict(row.get("chat_template_kwargs") or {})
    if row.get("tools"):
        kwargs["tools"] = row["tools"]
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _end_at_eos(tok, completion: list[int]) -> list[int]:
    """Cut what follows the last end-of-turn token; append EOS when there is none."""
    ends = end_of_turn_ids(tok)
    last = max((i for i, t in enumerate(completion) if t in ends), default=None)
    if last is None:
        return completion + [tok.eos_token_id]
    return completion[: last + 1]


_warned_prefix = False


def _split_completion(prompt_ids: list[int], full_ids: list[int]) -> list[int]:
    global _warned_prefix
    if full_ids[: len(prompt_ids)] != prompt_ids and not _warned_prefix:
        _warned_prefix = True
        warnings.warn("the chat template renders the prompt differently once an answer follows; "
                      "completion ids are taken after len(prompt ids), as TRL does", stacklevel=3)
    return full_ids[len(prompt_ids):]


def _prompt_and_answer(tok, row: dict, prompt: list[dict], answer: list[dict]):
    prompt_ids = _template(tok, row, prompt, add_generation_prompt=True)
    full_ids = _template(tok, row, prompt + answer, add_generation_prompt=False)
    return prompt_ids, _end_at_eos(tok, _split_completion(prompt_ids, full_ids))


# ----------------------------------------------------------------------------- row encoders


def _implicit_prompt(chosen: list[dict], rejected: list[dict], index: int | None):
    """TRL's extract_prompt for conversations: the longest common message prefix."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(f"{_where(index)}: no 'prompt' field and chosen/rejected share no "
                        "leading messages to use as the prompt (or one is all prompt)")
    return chosen[:n], chosen[n:], rejected[n:]


def encode_preference(row: dict, tokenizer, index: int | None = None) -> dict[str, list[int]]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}`; chosen/rejected are completion tokens."""
    tok = unwrap(tokenizer)
    chosen_raw = _field(row, "chosen", index)
    rejected_raw = _field(row, "rejected", index)
    if row.get("prompt") is None:
        if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
            raise DataError(f"{_where(index)}: field 'prompt' is missing (an implicit prompt "
                            "needs chosen/rejected as message lists)")
        chosen = _as_messages(chosen_raw, "assistant", "chosen", index)
        rejected = _as_messages(rejected_raw, "assistant", "rejected", index)
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, index)
    else:
        prompt = _as_messages(_field(row, "prompt", index), "user", "prompt", index)
        chosen = _as_messages(chosen_raw, "assistant", "chosen", index)
        rejected = _as_messages(rejected_raw, "assistant", "rejected", index)
    prompt_ids, chosen_ids = _prompt_and_answer(tok, row, prompt, chosen)
    _, rejected_ids = _prompt_and_answer(tok, row, prompt, rejected)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def _encode_messages(tok, row: dict, messages: list[dict], index: int | None):
    """Template the whole conversation; assistant turns (to their end-of-turn) are completion."""
    full = _template(tok, row, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    ends = end_of_turn_ids(tok)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_template(tok, row, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _template(tok, row, messages[: i + 1], add_generation_prompt=False)
        _split_completion(upto, full)  # warns once if earlier turns render differently later
        stop = len(upto)
        segment = full[start:stop]
        last = max((j for j, t in enumerate(segment) if t in ends), default=len(segment) - 1)
        for j in range(start, start + last + 1):
            mask[j] = 1
    if messages[-1].get("role") == "assistant" and not (ends & set(full)):
        full, mask = full + [tok.eos_token_id], mask + [1]
    if not any(mask):
        raise DataError(f"{_where(index)}: 'messages' has no assistant message to learn from")
    return full, mask


def encode_sft(row: dict, tokenizer, index: int | None = None) -> dict[str, list[int]]:
    """`{"input_ids", "completion_mask"}` from `messages`, or from `prompt` + `completion`."""
    tok = unwrap(tokenizer)
    if row.get("messages") is not None:
        messages = _as_messages(_field(row, "messages", index), "user", "messages", index)
        input_ids, mask = _encode_messages(tok, row, messages, index)
        return {"input_ids": input_ids, "completion_mask": mask}
    if row.get("prompt") is None and row.get("completion") is None:
        raise DataError(f"{_where(index)}: needs 'messages', or 'prompt' and 'completion' "
                        f"(has {sorted(row)})")
    prompt = _as_messages(_field(row, "prompt", index), "user", "prompt", index)
    answer = _as_messages(_field(row, "completion", index), "assistant", "completion", index)
    prompt_ids, completion_ids = _prompt_and_answer(tok, row, prompt, answer)
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def encode_prompt(row: dict, tokenizer, index: int | None = None) -> list[int]:
    """GRPO prompt ids: `prompt` (string = one user message, or messages) + generation prompt."""
    tok = unwrap(tokenizer)
    prompt = _as_messages(_field(row, "prompt", index), "user", "prompt", index)
    return _template(tok, row, prompt, add_generation_prompt=True)


# ----------------------------------------------------------------------------- truncation


def truncate_keep_start(prompt_ids: list[int], completion_ids: list[int],
                        max_length: int | None) -> list[int] | None:
    """The completion cut so that prompt + completion <= max_length (TRL's keep_start).

    None when the prompt alone is `>= max_length` tokens: such a row is dropped.
    """
    if max_length is None:
        return list(completion_ids)
    if len(prompt_ids) >= max_length:
        return None
    return list(completion_ids[: max_length - len(prompt_ids)])


@dataclass
class Truncation:
    """Counts rows cut or dropped by `max_length`, for one report at the end of encoding."""

    max_length: int | None
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    identical: list[int] = field(default_factory=list)  # rows whose chosen equals rejected

    def cut(self, row, tokenizer) -> dict:
        """The row with its texts cut to what can reach the kept tokens (`char_limit`), to
        encode before `preference` / `sft`."""
        return cut_row(dict(row), char_limit(tokenizer, self.max_length))

    def preference(self, encoded: dict, index: int | None = None) -> dict | None:
        """Truncate chosen and rejected after the shared prompt; None if the row is dropped."""
        self.rows += 1
        if encoded["chosen_ids"] == encoded["rejected_ids"]:
            self.identical.append(index if index is not None else self.rows - 1)
            return None
        prompt = encoded["prompt_ids"]
        chosen = truncate_keep_start(prompt, encoded["chosen_ids"], self.max_length)
        rejected = truncate_keep_start(prompt, encoded["rejected_ids"], self.max_length)
        if chosen is None or rejected is None:
            self.dropped += 1
            return None
        if len(chosen) < len(encoded["chosen_ids"]) or len(rejected) < len(encoded["rejected_ids"]):
            self.truncated += 1
        return {"prompt_ids": list(prompt), "chosen_ids": chosen, "rejected_ids": rejected}

    def sft(self, encoded: dict) -> dict | None:
        """Keep the first max_length tokens; None (dropped) if no completion token is left."""
        self.rows += 1
        ids, mask = encoded["input_ids"], encoded["completion_mask"]
        if self.max_length is None or len(ids) <= self.max_length:
            return encoded
        ids, mask = ids[: self.max_length], mask[: self.max_length]
        if not any(mask):
            self.dropped += 1
            return None
        self.truncated += 1
        return {"input_ids": ids, "completion_mask": mask}

    def message(self) -> str | None:
        """"N of M rows truncated to max_length=L; K dropped (...)" and a warning line for pairs
        whose chosen equals rejected, or None if there is nothing to say."""
        lines = []
        if self.truncated or self.dropped:
            lines.append(f"{self.truncated} of {self.rows} rows truncated to max_length="
                         f"{self.max_length}; {self.dropped} dropped (prompt alone >= max_length)")
        if self.identical:
            shown = ", ".join(map(str, self.identical[:5])) + (", ..." if len(self.identical) > 5 else "")
            lines.append(f"warning: {len(self.identical)} of {self.rows} pairs dropped: chosen equals "
                         f"rejected, which teaches nothing (rows {shown})")
        return "\n".join(lines) or None
