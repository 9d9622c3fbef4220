"""`model.chat_template` as Oumi reads it: template names, `auto`, Jinja text, unknown names; the
templates against the models' own ones that TRL ships (trl/chat_templates/), and the same
template on both backends' tokenizers."""

from pathlib import Path

import pytest
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

from mlxrl import chat_templates
from mlxrl.config import ModelParams, load_config
from mlxrl.errors import ConfigError, ModelError
from mlxrl.testing import tiny_model

USER = "How many r's are in strawberry?"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": USER},
        {"role": "assistant", "content": "Three."}, {"role": "user", "content": "And in berry?"}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

# name -> markers of that format that a rendered prompt (with the generation prompt) holds
MARKERS = {
    "chat_ml": ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"],
    "qwen2-instruct": ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"],
    "qwen2-vl-instruct": ["<|im_start|>user\n", "<|im_start|>assistant\n"],
    "qwen3-vl-instruct": ["<|im_start|>user\n", "<|im_start|>assistant\n"],
    "internvl3": ["<|im_start|>user\n", "<|im_start|>assistant\n"],
    "llama3-instruct": ["<s>", "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"],
    "phi3-instruct": ["<|user|>\n", "<|end|>\n", "<|assistant|>\n"],
    "gemma2-it": ["<s>", "<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n"],
    "zephyr": ["<|user|>\n", "</s>\n", "<|assistant|>\n"],
    "llava": ["USER: ", "ASSISTANT: "],
    "default": ["USER: ", "ASSISTANT: "],
    "default_gen": ["USER: ", "ASSISTANT: "],
    "molmo": ["User: ", "Assistant:"],
    "gpt2": ["</s>"],
}


def render(template, messages, generation=True):
    (text,), _ = render_jinja_template(conversations=[messages], chat_template=template,
                                       add_generation_prompt=generation, **SPECIAL)
    return text


def test_every_template_name_has_markers_checked():
    assert set(MARKERS) == set(chat_templates.TEMPLATES)


@pytest.mark.parametrize("name", sorted(chat_templates.TEMPLATES))
def test_named_template_holds_the_message_and_its_format(name):
    text = render(chat_templates.resolve(name), CHAT[:2])
    assert USER in text
    for marker in MARKERS[name]:
        assert marker in text, (name, marker, text)
    # text parts of a content list render as the string would
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": USER}]}]
    assert render(chat_templates.resolve(name), parts) == text


TRL = Path(__import__("trl").__file__).parent / "chat_templates"


@pytest.mark.parametrize("name, reference, conversations", [
    ("llama3-instruct", "llama3.jinja", [CHAT, CHAT[1:]]),
    ("phi3-instruct", "phi3.jinja", [CHAT, CHAT[1:]]),
    ("gemma2-it", "gemma.jinja", [CHAT[1:]]),  # Gemma's own refuses a system message
    ("qwen2-instruct", "qwen2_5.jinja", [CHAT]),  # with a system message (defaults differ)
    ("chat_ml", "qwen2_5.jinja", [CHAT]),
])
def test_template_equals_the_models_own(name, reference, conversations):
    theirs = (TRL / reference).read_text()
    for messages in conversations:
        for generation in (True, False):
            conversation = messages if generation else messages + [{"role": "assistant", "content": "x"}]
            assert render(chat_templates.resolve(name), conversation, generation) == \
                render(theirs, conversation, generation)


def test_defaults_of_qwen2_and_llava():
    assert render(chat_templates.resolve("qwen2-instruct"), CHAT[1:2]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert render(chat_templates.resolve("llava"), CHAT[1:2]).startswith(
        "A chat between a curious user and an artificial intelligence assistant.")
    gemma = render(chat_templates.resolve("gemma2-it"), CHAT[:2])
    assert f"<start_of_turn>user\nBe brief.\n\n{USER}<end_of_turn>" in gemma  # system folded in


def test_names_auto_jinja_and_unknown(tmp_path):
    assert chat_templates.resolve(None) is None and chat_templates.resolve("auto") is None
    assert chat_templates.resolve("LLAMA3-INSTRUCT") == chat_templates.TEMPLATES["llama3-instruct"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_templates.resolve(jinja) == jinja
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  model_name: tiny://qwen2\n  chat_template: qwen2-instruckt\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    message = str(e.value)
    assert "c.yaml:3" in message and "'qwen2-instruckt' is not a known template name" in message
    assert "llama3-instruct" in message and "\n" not in message


def test_both_backends_tokenizers_get_the_named_template():
    from mlxrl.mlx import model as mlx_model
    from mlxrl.torch.model import load_tokenizer

    params = ModelParams(model_name="tiny://qwen2", chat_template="llama3-instruct")
    mlx_tok = mlx_model.load(params).tokenizer._tokenizer
    torch_tok = load_tokenizer(params, str(tiny_model("qwen2")))
    expected = render(chat_templates.TEMPLATES["llama3-instruct"], CHAT[1:2], True).replace("<s>", "")
    for tok in (mlx_tok, torch_tok):
        assert tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True) == expected
    auto = load_tokenizer(ModelParams(model_name="tiny://qwen2", chat_template="auto"), str(tiny_model("qwen2")))
    assert auto.chat_template == transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2")).chat_template


def test_tokenizer_pad_token_must_be_a_token():
    from mlxrl.torch.model import load_tokenizer

    base = str(tiny_model("qwen2"))
    assert load_tokenizer(ModelParams(model_name=base, tokenizer_pad_token="<|im_start|>"), base).pad_token == \
        "<|im_start|>"
    with pytest.raises(ModelError, match="tokenizer_pad_token '<pad>' is not a token"):
        load_tokenizer(ModelParams(model_name=base, tokenizer_pad_token="<pad>"), base)
