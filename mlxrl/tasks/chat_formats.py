"""Common row formats, recognised by their columns in any dataset, turned into mlxrl's columns.

- ShareGPT: `conversations` = [{"from": "human" | "gpt" | "system" | ..., "value": text}] (and
  optionally a top-level `system` string) -> `messages` with user / assistant / system roles.
- Preference conversations (UltraFeedback style, e.g. HuggingFaceH4/ultrafeedback_binarized):
  a string `prompt` next to `chosen` / `rejected` conversations that already hold the prompt.
  TRL then takes the prompt from the conversations (`maybe_extract_prompt`: the string prompt
  is dropped when chosen is conversational and the prompt is not); so does mlxrl: the row keeps
  `chosen` / `rejected`, and the shared leading messages become the prompt when it is encoded.

Alpaca's `instruction` / `input` / `output` is Oumi's registered alpaca dataset, in `oumi.py`.
"""

from __future__ import annotations

from mlxrl.errors import DataError
from mlxrl.tasks import register_dataset

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


def _is_sharegpt(row: dict) -> bool:
    turns = row.get("conversations")
    return isinstance(turns, list) and bool(turns) and all(
        isinstance(t, dict) and "from" in t and "value" in t for t in turns)


@register_dataset("sharegpt", columns=["conversations"], accepts=_is_sharegpt)
def sharegpt_to_messages(row: dict) -> dict:
    """`conversations` of {from, value} -> `messages` of {role, content}."""
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    for turn in row["conversations"]:
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"ShareGPT turn 'from': {turn['from']!r} is not one of "
                            f"{sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def _holds_prompt(row: dict) -> bool:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    conversations = all(isinstance(c, list) and c and isinstance(c[0], dict) for c in (chosen, rejected))
    return isinstance(row.get("prompt"), str) and conversations and chosen[0].get("role") != "assistant"


@register_dataset("preference_conversations", columns=["prompt", "chosen", "rejected"],
                  accepts=_holds_prompt)
def preference_conversations(row: dict) -> dict:
    """Keep the conversations; their shared leading messages are the prompt (TRL's rule)."""
    return {"chosen": row["chosen"], "rejected": row["rejected"]}
