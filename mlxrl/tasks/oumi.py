"""The hub datasets Oumi's recipes train on, under Oumi's registry names, and Oumi's reward
functions (mlxrl's own code, the same behaviour; each docstring states it).

Datasets (the rows a name gives, and the same rows in a local file, recognised by their columns):
- `yahma/alpaca-cleaned`, `tatsu-lab/alpaca`: `instruction`, `input`, `output` -> `messages` =
  [system, user, assistant] as Oumi's AlpacaDataset builds them (`dataset_kwargs:
  {include_system_prompt: false}` leaves the system prompt out).
- `Magpie-Align/Llama-3-Magpie-Pro-1M-v0.1`, `Magpie-Align/Magpie-Pro-300K-Filtered`: ShareGPT
  `conversations` -> `messages`.
- `argilla/databricks-dolly-15k-curated-en`: `new-instruction` / `new-context` / `new-response`
  -> `messages` (`use_new_fields: false` reads the `original-*` fields).
- `argilla/magpie-ultra-v0.1`: `instruction`, `response` -> `messages`.
- `HuggingFaceH4/ultrachat_200k`, `allenai/tulu-3-sft-mixture`: `messages` kept as they are.
- `mlabonne/orpo-dpo-mix-40k`: chosen / rejected conversations holding the prompt.
- `openai/gsm8k` (subset `main`): `question`, `answer` -> GRPO `prompt` + `reward_model`
  ({"ground_truth": the number after `####`}), read by the `gsm8k` reward.
- `d1shs0ap/countdown`: `target`, `nums` -> GRPO `prompt` + `reward_model` ({"ground_truth":
  {"target", "numbers"}}), read by the `countdown` reward.

Rewards: `countdown`, `gsm8k`, `soft_{5,10,20}tokens_completions`,
`sharp_{5,10,20}tokens_completions` (`count_letters` is in `letter_count.py`). Oumi's `countdown`
and `gsm8k` are VERL functions of one answer; here they take TRL's batch arguments and read the
ground truth from the `reward_model` column (or the raw dataset columns).
"""

from __future__ import annotations

import ast
import math
import operator
import re

from mlxrl.tasks import register_dataset, register_reward
from mlxrl.tasks.chat_formats import _is_sharegpt, preference_conversations, sharegpt_to_messages

ALPACA_SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                            "provides further context. Write a response that appropriately completes "
                            "the request.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.")


@register_dataset("yahma/alpaca-cleaned", aliases=["tatsu-lab/alpaca"], columns=["instruction", "output"])
def alpaca(row: dict, *, include_system_prompt: bool = True) -> dict:
    """Oumi's AlpacaDataset: the input (when there is one) follows the instruction under
    `### Input:`, with the matching system prompt."""
    if row.get("input"):
        user, system = f"{row['instruction']}\n\n### Input:\n{row['input']}", ALPACA_SYSTEM_WITH_INPUT
    else:
        user, system = row["instruction"], ALPACA_SYSTEM
    messages = [{"role": "system", "content": system}] if include_system_prompt else []
    return {"messages": messages + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": row["output"]}]}


register_dataset("Magpie-Align/Llama-3-Magpie-Pro-1M-v0.1", aliases=["Magpie-Align/Magpie-Pro-300K-Filtered"],
                 columns=["conversations"], accepts=_is_sharegpt, detect=False)(sharegpt_to_messages)
register_dataset("mlabonne/orpo-dpo-mix-40k", columns=["chosen", "rejected"],
                 detect=False)(preference_conversations)


@register_dataset("HuggingFaceH4/ultrachat_200k", aliases=["allenai/tulu-3-sft-mixture"],
                  columns=["messages"], detect=False)
def chat_messages(row: dict) -> dict:
    return {"messages": row["messages"]}


@register_dataset("argilla/databricks-dolly-15k-curated-en",
                  columns=["new-instruction", "new-response", "original-instruction"])
def dolly(row: dict, *, use_new_fields: bool = True) -> dict:
    """Oumi's ArgillaDollyDataset: the context (if any) follows the instruction after `Context:`."""
    prefix = "new" if use_new_fields else "original"
    field = {k: _field_text(row[f"{prefix}-{k}"]) for k in ("instruction", "context", "response")}
    user = field["instruction"] + (f"\n\nContext: {field['context']}" if field["context"] else "")
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": field["response"]}]}


def _field_text(value) -> str:
    """Argilla stores some fields as {"value": [text, ...]}."""
    if isinstance(value, dict):
        value = value.get("value")
        value = value[0] if isinstance(value, list) else value
    return value or ""


@register_dataset("argilla/magpie-ultra-v0.1", columns=["instruction", "response"], detect=False)
def magpie_ultra(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row.get("instruction") or ""},
                         {"role": "assistant", "content": row.get("response") or ""}]}


# ----------------------------------------------------------------------------- GRPO datasets

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
COUNTDOWN_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer.\nUser: Using the numbers {nums}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
    "tags, for example <answer> (1 + 2) / 3 </answer>.\nAssistant: Let me solve this step by "
    "step.\n<think>")


@register_dataset("openai/gsm8k", columns=["question", "answer"],
                  accepts=lambda row: "####" in str(row.get("answer")))
def gsm8k_dataset(row: dict) -> dict:
    """The question with Oumi's instruction as the user prompt; the number after `####` (commas
    removed) as the ground truth."""
    solution = re.search(r"#### (-?[0-9.,]+)", row["answer"]).group(1).replace(",", "")
    return {"prompt": [{"role": "user", "content": f"{row['question']} {GSM8K_INSTRUCTION}"}],
            "reward_model": {"style": "rule", "ground_truth": solution}}


@register_dataset("d1shs0ap/countdown", columns=["target", "nums"])
def countdown_dataset(row: dict) -> dict:
    target, nums = int(row["target"]), [int(n) for n in row["nums"]]
    return {"prompt": [{"role": "user", "content": COUNTDOWN_PROMPT.format(nums=nums, target=target)}],
            "reward_model": {"style": "rule", "ground_truth": {"target": target, "numbers": nums}}}


# ----------------------------------------------------------------------------- rewards


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def _whitespace_tokens(text: str) -> int:
    """Oumi counts `re.split(r"\\s+", text)` pieces: "" is one piece, edge spaces add one each."""
    return len(re.split(r"\s+", text))


def _soft(target: int):
    def reward(completions, **kwargs) -> list[float]:
        """x e^(1-x) with x = whitespace tokens / target: 1.0 at the target length, smaller
        either side (Oumi's soft_<N>tokens_completions)."""
        out = []
        for c in completions:
            x = _whitespace_tokens(_text(c)) / target
            out.append(x * math.exp(-x) * math.e)
        return out

    return reward


def _sharp(target: int):
    def reward(completions, **kwargs) -> list[float]:
        """-|whitespace tokens - target| (Oumi's sharp_<N>tokens_completions)."""
        return [float(-abs(_whitespace_tokens(_text(c)) - target)) for c in completions]

    return reward


for _n in (5, 10, 20):
    register_reward(f"soft_{_n}tokens_completions")(_soft(_n))
    register_reward(f"sharp_{_n}tokens_completions")(_sharp(_n))


def _ground_truths(completions, reward_model, raw_column, convert) -> list:
    if reward_model is not None:
        return [r["ground_truth"] for r in reward_model]
    if raw_column is None:
        raise ValueError("needs the 'reward_model' column of the registered dataset's rows")
    return [convert(v) for v in raw_column]


def gsm8k_answer(text: str, method: str = "strict") -> str | None:
    """strict: the last `#### <number>` (commas and $ removed); flexible: the last number-like
    piece that is not "." (or "." when that is all there is, as Oumi's)."""
    if method == "strict":
        found = re.findall(r"#### (\-?[0-9\.\,]+)", text)
        return found[-1].replace(",", "").replace("$", "") if found else None
    if method != "flexible":
        raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")
    found = re.findall(r"(\-?[0-9\.\,]+)", text)
    valid = [f for f in found if f not in ("", ".")]
    return valid[-1] if valid else (found[-1] if found else None)


@register_reward("gsm8k")
def gsm8k(completions, reward_model=None, answer=None, method: str = "strict",
          format_score: float = 0.0, score: float = 1.0, **kwargs) -> list[float]:
    """`score` when the extracted answer equals the ground truth as text, `format_score` when an
    answer was found but differs, 0.0 when none was found (Oumi's gsm8k)."""
    truths = _ground_truths(completions, reward_model, answer,
                            lambda a: re.search(r"#### (-?[0-9.,]+)", a).group(1).replace(",", ""))
    out = []
    for completion, truth in zip(completions, truths):
        found = gsm8k_answer(_text(completion), method)
        out.append(0.0 if found is None else float(score if found == truth else format_score))
    return out


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(node):
    """Evaluate +, -, *, /, //, ** over number literals (what Oumi's regex lets `eval` see)."""
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError("not arithmetic")


def countdown_equation(text: str) -> str | None:
    """The last `<answer>...</answer>` on the last line of the completion, stripped."""
    found = re.findall(r"<answer>(.*?)</answer>", text.split("\n")[-1])
    return found[-1].strip() if found else None


def countdown_score(text: str, target: float, numbers: list[int], format_score: float = 0.0,
                    score: float = 1.0) -> float:
    """0 without an answer; `format_score` when the equation does not use each number exactly
    once, is not plain arithmetic or misses the target; `score` when it equals it (1e-5)."""
    equation = countdown_equation(text)
    if equation is None:
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(int(n) for n in numbers):
        return float(format_score)
    if not re.match(r"^[\d+\-*/().\s]+$", equation):
        return float(format_score)
    try:
        result = _arithmetic(ast.parse(equation, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return float(format_score)
    return float(score if abs(result - target) < 1e-5 else format_score)


@register_reward("countdown")
def countdown(completions, reward_model=None, target=None, nums=None, format_score: float = 0.0,
              score: float = 1.0, **kwargs) -> list[float]:
    """Oumi's countdown reward for each completion (see `countdown_score`)."""
    if reward_model is None and target is not None:
        reward_model = [{"ground_truth": {"target": t, "numbers": n}} for t, n in zip(target, nums)]
    truths = _ground_truths(completions, reward_model, None, None)
    return [countdown_score(_text(c), t["target"], t["numbers"], format_score, score)
            for c, t in zip(completions, truths)]
