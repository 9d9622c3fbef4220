"""mlxrl's token ids against TRL 1.16's own dataset preparation, row by row.

`DPOTrainer._prepare_dataset`, `SFTTrainer._prepare_dataset` and `GRPOTrainer._tokenize_prompts`
run on trainers built without a model (`object.__new__`), on the same rows, with the tokenizers
of the tiny qwen2, llama and falcon_h1 models (as transformers and as mlx-lm load them), and two
variants of it: a template that starts with a BOS token, has no newline after its end-of-turn,
reads `tools` and a `chat_template_kwargs` key, with a tokenizer that adds a BOS to plain text;
and a ChatML template with `{% generation %}` markers (TRL's `assistant_only_loss`).
"""

from types import SimpleNamespace

import datasets
import pytest

from mlxrl.data.formats import encode_preference, encode_prompt, encode_sft, grpo_template_note
from mlxrl.testing import tiny_model

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

BOS_TEMPLATE = (
    "{{- '<|endoftext|>' }}{%- if tools %}{{- 'tools: ' + (tools | length | string) + '\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ': ' + (message['content'] | upper if shout else message['content'])"
    " + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant: ' }}{%- endif %}"
)
GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def hf_tokenizer(name: str):
    from tokenizers import processors

    arch = name if name in ("qwen2", "llama", "falcon_h1") else "qwen2"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model(arch))
    if name == "bos":
        tok.chat_template = BOS_TEMPLATE
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    elif name == "generation":
        tok.chat_template = GENERATION_TEMPLATE
    return tok


@pytest.fixture(scope="module", params=["qwen2", "llama", "falcon_h1", "bos"])
def tokenizers(request):
    """(TRL's tokenizer, mlxrl's): transformers' and, for the tiny models, mlx-lm's loader."""
    from mlx_lm.utils import load_tokenizer

    hf = hf_tokenizer(request.param)
    if request.param == "bos":
        return hf, hf
    return hf, load_tokenizer(tiny_model(request.param))


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM, USER = msg("system", "You are Tiny."), msg("user", "How many 'r's are in 'strawberry'?")
RIGHT, WRONG = msg("assistant", "There are three. \\boxed{3}"), msg("assistant", "Maybe two.")
PREFERENCE_ROWS = {
    "conversational": {"prompt": [SYSTEM, USER], "chosen": [RIGHT], "rejected": [WRONG]},
    "multi-turn prompt": {"prompt": [USER, WRONG, msg("user", "Are you sure?")],
                          "chosen": [RIGHT], "rejected": [msg("assistant", "Yes.")]},
    "implicit conversational": {"chosen": [SYSTEM, USER, RIGHT], "rejected": [SYSTEM, USER, WRONG]},
    "string prompt": {"prompt": "How many 'r's are in 'strawberry'?", "chosen": " Three.",
                      "rejected": " Two."},
    "string prompt, no space": {"prompt": "Q: the sky's color?\nA:", "chosen": "blue", "rejected": "green"},
    "string with EOS already": {"prompt": "Count: ", "chosen": "3<|im_end|>", "rejected": "2"},
    "implicit string": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "tools and template kwargs": {"prompt": [USER], "chosen": [RIGHT], "rejected": [WRONG],
                                  "tools": '[{"type": "function", "function": {"name": "count"}}]',
                                  "chat_template_kwargs": {"shout": True}},
}


def trl_dpo_ids(tok, row: dict) -> dict:
    trainer = object.__new__(trl.DPOTrainer)
    trainer._tokenizer = tok
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = trainer._prepare_dataset(datasets.Dataset.from_list([row]), tok, args, "train")[0]
    return {k: out[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


@pytest.mark.parametrize("name", sorted(PREFERENCE_ROWS))
def test_preference_ids_are_dpo_trainers(tokenizers, name):
    trl_tok, mlx_tok = tokenizers
    row = dict(PREFERENCE_ROWS[name])
    if "shout" in str(row) and trl_tok.chat_template != BOS_TEMPLATE:
        row.pop("chat_template_kwargs")  # the ChatML template takes no such key
    assert encode_preference(row, mlx_tok) == trl_dpo_ids(trl_tok, row)


def test_conversational_completion_ends_with_the_templates_text():
    """The issue's case: ChatML's `<|im_end|>\\n` is scored, as TRL does."""
    tok = hf_tokenizer("qwen2")
    ids = encode_preference(PREFERENCE_ROWS["conversational"], tok)
    assert tok.decode(ids["chosen_ids"][-2:]) == "<|im_end|>\n"


def trl_sft(tok, row: dict, assistant_only_loss: bool = False) -> tuple[list, list]:
    trainer = object.__new__(trl.SFTTrainer)
    trainer._tokenizer, trainer.chat_template = tok, None
    trainer.completion_only_loss = "prompt" in row
    args = SimpleNamespace(dataset_num_proc=None, dataset_text_field="text", max_length=None,
                           assistant_only_loss=assistant_only_loss, truncation_mode="keep_start",
                           shuffle_dataset=False)
    out = trainer._prepare_dataset(datasets.Dataset.from_list([row]), tok, args, False, None, "train")[0]
    return out["input_ids"], [int(label != -100) for label in out["labels"]]


SFT_ROWS = {
    "conversational prompt-completion": {"prompt": [SYSTEM, USER], "completion": [RIGHT]},
    "string prompt-completion": {"prompt": "How many 'r's in 'strawberry'? ", "completion": "Three."},
}


@pytest.mark.parametrize("name", sorted(SFT_ROWS))
def test_sft_prompt_completion_is_sft_trainers(tokenizers, name):
    trl_tok, mlx_tok = tokenizers
    ours = encode_sft(SFT_ROWS[name], mlx_tok)
    assert (ours["input_ids"], ours["completion_mask"]) == trl_sft(trl_tok, SFT_ROWS[name])


MESSAGES = {"messages": [SYSTEM, USER, WRONG, msg("user", "Are you sure?"), RIGHT]}


def test_sft_messages_mask_is_assistant_only_loss():
    """With `{% generation %}` markers mlxrl's mask is TRL's `assistant_only_loss` mask."""
    tok = hf_tokenizer("generation")
    ours = encode_sft(MESSAGES, tok)
    assert (ours["input_ids"], ours["completion_mask"]) == trl_sft(tok, MESSAGES, assistant_only_loss=True)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "falcon_h1"])
def test_sft_messages_without_markers_mark_what_trls_training_templates_mark(arch):
    """Without markers: the same ids as TRL; the assistant turns as the marked template marks them
    (TRL itself would train such a row on every token, or refuse assistant_only_loss)."""
    from mlx_lm.utils import load_tokenizer

    ours = encode_sft(MESSAGES, load_tokenizer(tiny_model(arch)))
    ids, everything = trl_sft(hf_tokenizer(arch), MESSAGES)
    assert ours["input_ids"] == ids and all(everything)
    marked = trl_sft(hf_tokenizer("generation"), MESSAGES, assistant_only_loss=True)
    assert (ours["input_ids"], ours["completion_mask"]) == marked


def trl_grpo_prompt_ids(tok, prompts: list) -> list:
    trainer = object.__new__(trl.GRPOTrainer)
    trainer.__dict__.update(processing_class=tok, _is_vlm=False, environment_factories=None, tools=None,
                            chat_template=None, chat_template_kwargs={})
    return [list(ids) for ids in trainer._tokenize_prompts(prompts)[0]]


def test_grpo_prompt_ids_are_grpo_trainers(tokenizers):
    trl_tok, mlx_tok = tokenizers
    conversational = [[SYSTEM, USER], [USER, WRONG, msg("user", "Are you sure?")]]
    plain = ["How many 'r's are in 'strawberry'?", "Count: "]
    for prompts in (conversational, plain):
        assert [encode_prompt({"prompt": p}, mlx_tok) for p in prompts] == trl_grpo_prompt_ids(trl_tok, prompts)
    # per-row template arguments do not reach GRPO prompts in TRL, nor in mlxrl (with a note)
    row = {"prompt": [USER], "tools": PREFERENCE_ROWS["tools and template kwargs"]["tools"],
           "chat_template_kwargs": {"shout": True}}
    assert encode_prompt(row, mlx_tok) == trl_grpo_prompt_ids(trl_tok, [[USER]])[0]
    assert "tools / chat_template_kwargs" in grpo_template_note([row])
    assert grpo_template_note([{"prompt": "p", "chat_template_kwargs": {"shout": True}}], {"shout": True}) is None


def test_grpo_prompts_get_the_trainers_chat_template_kwargs():
    """model.chat_template_kwargs is the trainer's (GRPOConfig.chat_template_kwargs) on both sides."""
    tok = hf_tokenizer("bos")
    trainer = object.__new__(trl.GRPOTrainer)
    trainer.__dict__.update(processing_class=tok, _is_vlm=False, environment_factories=None, tools=None,
                            chat_template=None, chat_template_kwargs={"shout": True})
    theirs = list(trainer._tokenize_prompts([[SYSTEM, USER]])[0][0])
    assert encode_prompt({"prompt": [SYSTEM, USER]}, tok, chat_template_kwargs={"shout": True}) == theirs
    assert encode_prompt({"prompt": [SYSTEM, USER]}, tok) != theirs
