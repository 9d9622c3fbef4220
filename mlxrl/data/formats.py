"""Rows -> token ids, as TRL 1.16's trainers tokenize them (both backends use these ids).

A row is conversational when its `prompt` / `chosen` / `rejected` / `completion` / `messages`
are lists of {role, content} messages, standard when they are strings (TRL's
`is_conversational`). A row that mixes the two, which TRL cannot run, is read as conversational:
its strings become one message each (`prompt` a user message, the others assistant messages).

Preference rows (`DPOTrainer._prepare_dataset`):
- no `prompt`: the longest common prefix of chosen and rejected is the prompt (TRL's
  `extract_prompt`: message-wise, or character-wise without the space before the divergence);
- conversational: prompt ids = template(prompt, add_generation_prompt=True), full ids =
  template(prompt + answer), the per-row `tools` and `chat_template_kwargs` passed on;
- standard: the tokenizer's EOS is appended to chosen / rejected unless they end with it, and
  `tokenizer(prompt)` / `tokenizer(prompt + answer)` are tokenized plainly (no chat template;
  the tokenizer's own special tokens, e.g. a BOS, are added);
- the completion starts where prompt ids and full ids first differ (the shorter of chosen's and
  rejected's common prefix): everything the template renders after the prompt is scored,
  ChatML's `<|im_end|>\n` included.

SFT rows (`SFTTrainer`): `prompt` + `completion` as the preference answers above (a standard
completion gets the EOS); `messages` are templated whole and the assistant turns are the
completion: the template's `{% generation %}` spans when it has them (TRL's
`assistant_only_loss`), else what each assistant message adds after the generation prompt before
it, its end-of-turn text included (the span TRL's own training templates mark). TRL without
`assistant_only_loss` trains a `messages` row on every token; mlxrl masks the system and user
turns, as TRL's `assistant_only_loss` does.

GRPO prompts (`GRPOTrainer._tokenize_prompts`): conversational prompts get the chat template with
the generation prompt and the trainer's `chat_template_kwargs` (`model.chat_template_kwargs`); a
string prompt is tokenized plainly. As in TRL, a row's own `tools` and `chat_template_kwargs` do
not reach the prompt's template (they reach the reward functions); `grpo_template_note` says so.

Truncation follows TRL's `keep_start`: a sequence keeps its first `max_length` tokens, and a row
whose prompt alone is `>= max_length` tokens is dropped. `Truncation` counts both so a trainer can
report them once. Before templating, each text is cut to `char_limit` characters, a bound past
which no kept token can come from (a token covers at most as many characters as its longest
spelling), so a 10 MB row costs what a row of max_length tokens costs. A preference row whose
chosen and rejected completions are the same tokens teaches nothing: it is dropped and counted.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from mlxrl.errors import DataError

# End-of-turn tokens of common chat templates, used when the tokenizer has them as tokens.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
                "<|endoftext|>", "</s>")
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")


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


# ----------------------------------------------------------------------------- reading rows


def _where(index: int | None) -> str:
    return f"row {index}" if index is not None else "row"


def _field(row: dict, name: str, index: int | None):
    value = row.get(name)
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        state = "missing" if value is None else "empty"
        raise DataError(f"{_where(index)}: field {name!r} is {state}")
    return value


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def is_conversational(row: dict) -> bool:
    """Whether any of the row's text fields is a list of messages."""
    return any(_is_messages(row.get(name)) for name in _TEXT_FIELDS)


def _as_messages(value, role: str, name: str, index: int | None) -> list[dict]:
    """A string becomes one `role` message; a list of {role, content} dicts stays as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if _is_messages(value):
        return [dict(m) for m in value]
    raise DataError(f"{_where(index)}: field {name!r} must be a string or a list of "
                    f"{{role, content}} messages, got {type(value).__name__}")


def _as_text(value, name: str, index: int | None) -> str:
    if not isinstance(value, str):
        raise DataError(f"{_where(index)}: field {name!r} must be a string, got {type(value).__name__}")
    return value


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


# ----------------------------------------------------------------------------- tokenizing


def _template_kwargs(row: dict) -> dict:
    """TRL's per-row `tools` (a JSON string is parsed) and `chat_template_kwargs`."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def _template(tok, row: dict, messages: list[dict], add_generation_prompt: bool,
              assistant_mask: bool = False):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  add_generation_prompt=add_generation_prompt,
                                  return_assistant_tokens_mask=assistant_mask, **_template_kwargs(row))
    ids = list(out["input_ids"])
    return (ids, list(out["assistant_masks"])) if assistant_mask else ids


def _plain(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def _with_eos(tok, text: str) -> str:
    return text if text.endswith(tok.eos_token) else text + tok.eos_token


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


_warned_prefix = False


def _prompt_length(prompt_ids: list[int], *full: list[int]) -> int:
    """Where the completions start: the prompt's common prefix with every full sequence."""
    global _warned_prefix
    length = min(_common_prefix(prompt_ids, f) for f in full)
    if length < len(prompt_ids) and not _warned_prefix:
        _warned_prefix = True
        warnings.warn("the tokenized prompt is not a prefix of prompt + completion (the chat template "
                      "renders it differently, or tokens merge across the boundary); the completion "
                      "starts where they differ, as in TRL", stacklevel=3)
    return length


# ----------------------------------------------------------------------------- preference rows


def _extract_prompt(chosen, rejected, index: int | None):
    """TRL's `extract_prompt`: the longest common prefix (messages, or characters without the
    space before the divergence)."""
    n = _common_prefix(list(chosen), list(rejected))
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(f"{_where(index)}: no 'prompt' field and chosen/rejected share no "
                        "leading part to use as the prompt (or one is all prompt)")
    return chosen[:n], chosen[n:], rejected[n:]


def _preference_fields(row: dict, index: int | None):
    chosen, rejected = _field(row, "chosen", index), _field(row, "rejected", index)
    prompt = row.get("prompt")
    if prompt is None:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DataError(f"{_where(index)}: no 'prompt' field, and chosen / rejected are not both "
                            "strings or both message lists")
        return _extract_prompt(chosen, rejected, index)
    return _field(row, "prompt", index), chosen, rejected


def encode_preference(row: dict, tokenizer, index: int | None = None) -> dict[str, list[int]]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}`: DPOTrainer's ids for the row."""
    tok = unwrap(tokenizer)
    prompt, chosen, rejected = _preference_fields(row, index)
    if is_conversational({"prompt": prompt, "chosen": chosen, "rejected": rejected}):
        prompt = _as_messages(prompt, "user", "prompt", index)
        prompt_ids = _template(tok, row, prompt, add_generation_prompt=True)
        chosen_full, rejected_full = (
            _template(tok, row, prompt + _as_messages(answer, "assistant", name, index), False)
            for name, answer in (("chosen", chosen), ("rejected", rejected)))
    else:
        prompt = _as_text(prompt, "prompt", index)
        prompt_ids = _plain(tok, prompt)
        chosen_full, rejected_full = (_plain(tok, prompt + _with_eos(tok, _as_text(answer, name, index)))
                                      for name, answer in (("chosen", chosen), ("rejected", rejected)))
    start = _prompt_length(prompt_ids, chosen_full, rejected_full)
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": chosen_full[start:],
            "rejected_ids": rejected_full[start:]}


# ----------------------------------------------------------------------------- SFT rows


def _has_generation_tags(tok) -> bool:
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    return "{% generation %}" in template or "{%- generation %}" in template


def _encode_messages(tok, row: dict, messages: list[dict], index: int | None):
    """Template the whole conversation; assistant turns are the completion."""
    if _has_generation_tags(tok):  # TRL's assistant_only_loss
        full, mask = _template(tok, row, messages, False, assistant_mask=True)
    else:
        full = _template(tok, row, messages, add_generation_prompt=False)
        mask = [0] * len(full)
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                start = len(_template(tok, row, messages[:i], True)) if i else 0
                stop = len(_template(tok, row, messages[: i + 1], False))
                mask[start:stop] = [1] * (stop - start)
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
    prompt, completion = _field(row, "prompt", index), _field(row, "completion", index)
    if is_conversational({"prompt": prompt, "completion": completion}):
        prompt = _as_messages(prompt, "user", "prompt", index)
        prompt_ids = _template(tok, row, prompt, add_generation_prompt=True)
        full = _template(tok, row, prompt + _as_messages(completion, "assistant", "completion", index), False)
    else:
        prompt_ids = _plain(tok, _as_text(prompt, "prompt", index))
        full = _plain(tok, prompt + _with_eos(tok, _as_text(completion, "completion", index)))
    start = _prompt_length(prompt_ids, full)
    return {"input_ids": full, "completion_mask": [0] * start + [1] * (len(full) - start)}


def encode_prompt(row: dict, tokenizer, index: int | None = None,
                  chat_template_kwargs: dict | None = None) -> list[int]:
    """GRPO prompt ids: messages templated with the generation prompt and the trainer's
    `chat_template_kwargs`, a string tokenized plainly."""
    tok = unwrap(tokenizer)
    prompt = _field(row, "prompt", index)
    if isinstance(prompt, str):
        return _plain(tok, prompt)
    return _template(tok, {"chat_template_kwargs": chat_template_kwargs},
                     _as_messages(prompt, "user", "prompt", index), add_generation_prompt=True)


def grpo_template_note(rows, chat_template_kwargs: dict | None = None) -> str | None:
    """The note for GRPO rows that carry template arguments of their own, which the prompts do
    not get (`rows`: dicts, or a datasets.Dataset)."""
    columns = rows.column_names if hasattr(rows, "column_names") else (rows[0] if len(rows) else {})
    unused = ["tools"] if "tools" in columns else []
    if "chat_template_kwargs" in columns:
        own = rows["chat_template_kwargs"] if hasattr(rows, "column_names") else \
            [r.get("chat_template_kwargs") for r in rows]
        if any((kw or {}) != (chat_template_kwargs or {}) for kw in own):
            unused.append("chat_template_kwargs")
    if not unused:
        return None
    return (f"note: GRPO prompts are templated without the rows' own {' / '.join(unused)} (as TRL "
            f"1.16's GRPOTrainer does; model.chat_template_kwargs applies); they reach the reward "
            f"functions only")


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
