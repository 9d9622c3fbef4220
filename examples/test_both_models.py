#!/usr/bin/env python3
"""Compare DPO vs GRPO models (the walkthrough's Part 3 script, calling mlxrl.inference).

    python examples/test_both_models.py
    python examples/test_both_models.py --dpo output/learn_dpo/checkpoint-50 \
        --grpo output/learn_grpo/checkpoint-30 --max-new-tokens 128

The GRPO model was trained with the letter-count system prompt (answers in \\boxed{}), so the
letter question is asked with it too; the conversation question is asked without one.
"""

import argparse

from mlxrl import infer

# Test prompts
CONVERSATION_PROMPT = "Explain why the sky is blue in simple terms."
REASONING_PROMPT = "How many times does the letter 't' appear in 'constitution'?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo", default="output/learn_dpo/checkpoint-50")
    parser.add_argument("--grpo", default="output/learn_grpo/checkpoint-30")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    settings = {"max_new_tokens": args.max_new_tokens}

    print("=" * 60)
    print("TEST 1: Conversation Quality (DPO's strength)")
    print("=" * 60)
    print("\n🔵 DPO Model:")
    print(infer(CONVERSATION_PROMPT, args.dpo, **settings))
    print("\n🟢 GRPO Model:")
    print(infer(CONVERSATION_PROMPT, args.grpo, **settings))

    print("\n" + "=" * 60)
    print("TEST 2: Letter Counting (GRPO's strength)")
    print("=" * 60)
    print("\n🔵 DPO Model:")
    print(infer(REASONING_PROMPT, args.dpo, system_prompt="letter_count", **settings))
    print("\n🟢 GRPO Model:")
    print(infer(REASONING_PROMPT, args.grpo, system_prompt="letter_count", **settings))
    print("(the right answer is \\boxed{3})")

    print("\n" + "=" * 60)
    print("KEY INSIGHT:")
    print("- DPO: Better at general conversation & style")
    print("- GRPO: Better at specific tasks with clear rewards")
    print("=" * 60)


if __name__ == "__main__":
    main()
