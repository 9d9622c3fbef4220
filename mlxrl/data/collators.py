"""What SFT trains on, named as Oumi's collators name it, and packing (`data.train.pack`).

Both backends call these on the same encoded rows (`input_ids` + `completion_mask` from
`formats.encode_sft`), so they train on the same tokens:

| `collator_name` (+ `train_target`)                     | tokens in the loss                      |
|---------------------------------------------------------|-----------------------------------------|
| unset                                                   | completions: assistant turns, or `completion` |
| `text_completions_only_with_padding` (`all_assistant_turns`) | the same                           |
| `text_completions_only_with_padding` + `final_assistant_turn` | the last assistant turn only       |
| `text_with_padding`                                     | every token (system and user text too)  |

The vision collators do not apply to text models (a note says so). Turn boundaries come from the
chat template, so `collator_kwargs` such as `response_template` are not needed.

Packing follows TRL's default `bfd` (best-fit decreasing): rows (already cut to `max_length`) are
sorted longest first and each goes into the open bin with the least room that fits it, else a new
bin of `max_length` tokens. A bin is one training example. TRL runs a bin as one sequence whose
position ids restart at each row, so rows do not attend to each other; on MLX each bin's rows run
as separate sequences of one batch, which is the same computation. The loss is the mean over the
batch's loss tokens either way.
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque

TEXT_COLLATORS = ("text_with_padding", "text_completions_only_with_padding")
VISION_COLLATORS = ("vision_language_with_padding", "vision_language_sft")
TRAIN_TARGETS = ("all_assistant_turns", "final_assistant_turn")


def check_collator(collator_name: str | None, train_target: str | None) -> str | None:
    """ValueError for an unknown collator or a train_target without the completions collator;
    returns train_target in lower case (Oumi accepts `ALL_ASSISTANT_TURNS` too)."""
    if collator_name is not None and collator_name not in TEXT_COLLATORS + VISION_COLLATORS:
        raise ValueError(f"collator_name {collator_name!r} is not one of "
                         f"{', '.join(TEXT_COLLATORS + VISION_COLLATORS)}")
    if train_target is None:
        return None
    target = train_target.lower()
    if target not in TRAIN_TARGETS:
        raise ValueError(f"train_target {train_target!r} is not one of {', '.join(TRAIN_TARGETS)}")
    if collator_name != "text_completions_only_with_padding":
        raise ValueError("train_target needs collator_name: text_completions_only_with_padding")
    return target


def sft_target(split_params) -> str:
    """'completion', 'final_assistant_turn' or 'all' for a `data.train` section."""
    if split_params.collator_name == "text_with_padding":
        return "all"
    if (split_params.train_target or "").lower() == "final_assistant_turn":
        return "final_assistant_turn"
    return "completion"


def apply_target(encoded: dict, target: str) -> dict:
    """`encoded` with its completion mask set for `target`."""
    mask = list(encoded["completion_mask"])
    if target == "all":
        mask = [1] * len(mask)
    elif target == "final_assistant_turn" and any(mask):
        end = len(mask) - mask[::-1].index(1)
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [0] * start + [1] * (end - start) + [0] * (len(mask) - end)
    return {**encoded, "completion_mask": mask}


def pack_bfd(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of row indices, as TRL's `pack_dataset(strategy="bfd")` forms them: longest rows
    first (ties in row order), each into the fitting bin with the least room (the earliest such
    bin on a tie), else a new bin; bins in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: -min(lengths[i], max_length))
    bins: list[list[int]] = []
    by_room: dict[int, deque] = defaultdict(deque)  # room left -> bins with that room, oldest first
    rooms: list[int] = []  # sorted rooms (0 < room < max_length) that some bin has
    for i in order:
        length = min(lengths[i], max_length)
        if length == 0:
            continue
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            current = by_room[room].popleft()
            if not by_room[room]:
                rooms.pop(at)
        else:
            room, current = max_length, []
            bins.append(current)
        current.append(i)
        left = room - length
        if left > 0:
            if not by_room[left]:
                bisect.insort(rooms, left)
            by_room[left].append(current)
    return bins
