"""Oumi's chat template names, and how `model.chat_template` is read on both backends.

In an Oumi recipe `model.chat_template` names one of Oumi's built-in templates (`llama3-instruct`,
`chat_ml`, ...). mlxrl reads the field the same way:
- unset: the tokenizer's own template (an error if it has none);
- `auto`: the tokenizer's own template, as Oumi;
- a known name (case-insensitive): mlxrl's template of that name, below;
- Jinja text (it contains `{{` or `{%`): used as the template itself (an mlxrl extension);
- anything else: a config error listing the known names.

The templates are mlxrl's own, written from each format's public convention; the text-only part
of the vision templates (mlxrl trains text models). A message's `content` may be a string or a
list of `{"type": "text", "text": ...}` parts. Where TRL ships a model's original template
(`trl/chat_templates/`), the tests check that ours renders the same text.
"""

from __future__ import annotations

from mlxrl.errors import ModelError

# A message's text: a string, or the text parts of a content list (images are not rendered).
_TEXT = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}"
    "{{ part['text'] if 'text' in part else part['content'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _chatml(default_system: str | None = None) -> str:
    """`<|im_start|>role\\ncontent<|im_end|>\\n` turns; optionally a system turn when none is given."""
    system = ""
    if default_system:
        system = ("{%- if messages[0]['role'] != 'system' -%}"
                  "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif -%}")
    return (_TEXT + system
            + "{%- for m in messages -%}"
              "{{ '<|im_start|>' + m['role'] + '\\n' + text(m['content']) + '<|im_end|>\\n' }}"
              "{%- endfor -%}"
              "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


_LLAMA3 = (
    _TEXT + "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + text(m['content']) | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

# Phi-3: `<|role|>\ncontent<|end|>\n`; a finished conversation ends with EOS (as the model's own).
_PHI3 = (
    _TEXT + "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\\n' + text(m['content']) + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
)

# Gemma 2: the assistant is `model`; Gemma has no system role, so a system message is put in
# front of the first user turn (as Oumi's gemma2-it does).
_GEMMA = (
    _TEXT + "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + text(m['content']) + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + ns.system + text(m['content']) | trim + '<end_of_turn>\\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_ZEPHYR = (
    _TEXT + "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\\n' + text(m['content']) | trim + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

_LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA = (
    _TEXT + "{%- set ns = namespace(system='" + _LLAVA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = text(messages[0]['content']) -%}"
    "{%- endif -%}"
    "{{ ns.system + ' ' }}"
    "{%- for m in messages if m['role'] in ('user', 'assistant') -%}"
    "{{ ('USER: ' if m['role'] == 'user' else 'ASSISTANT: ') + text(m['content']) + ' ' }}"
    "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
)


def _plain(generation_tags: bool) -> str:
    """`ROLE: content` lines (Oumi's `default`), no special tokens."""
    answer = "{% generation %}{{ text(m['content']) | trim }}{% endgeneration %}" if generation_tags \
        else "{{ text(m['content']) | trim }}"
    return (_TEXT + "{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}" + answer +
            "{%- else -%}{{ m['role'].upper() + ': ' + text(m['content']) | trim }}{%- endif -%}"
            "{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '\\nASSISTANT: ' }}{%- endif -%}")


_MOLMO = (
    _TEXT + "{%- for m in messages -%}"
    "{{ m['role'].capitalize() + ': ' + text(m['content']) }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' Assistant:' }}{%- endif -%}"
)

_GPT2 = _TEXT + "{%- for m in messages -%}{{ text(m['content']) + eos_token }}{%- endfor -%}"

TEMPLATES: dict[str, str] = {
    "chat_ml": _chatml(),
    "default": _plain(generation_tags=False),
    "default_gen": _plain(generation_tags=True),
    "gemma2-it": _GEMMA,
    "gpt2": _GPT2,
    "internvl3": _chatml(),
    "llama3-instruct": _LLAMA3,
    "llava": _LLAVA,
    "molmo": _MOLMO,
    "phi3-instruct": _PHI3,
    "qwen2-instruct": _chatml("You are a helpful assistant."),
    "qwen2-vl-instruct": _chatml("You are a helpful assistant."),
    "qwen3-vl-instruct": _chatml("You are a helpful assistant."),
    "zephyr": _ZEPHYR,
}
AUTO = "auto"


def known_names() -> list[str]:
    return [AUTO, *sorted(TEMPLATES)]


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_name(value: str | None) -> None:
    """ValueError (a config error at load) for a value that is neither a known name nor Jinja."""
    if value is None or is_jinja(value) or value.lower() == AUTO or value.lower() in TEMPLATES:
        return
    raise ValueError(f"chat_template {value!r} is not a known template name ({', '.join(known_names())}) "
                     f"nor Jinja text")


def resolve(value: str | None) -> str | None:
    """The Jinja text `model.chat_template` selects, or None for the tokenizer's own."""
    if value is None or value.lower() == AUTO:
        return None
    if is_jinja(value):
        return value
    check_name(value)
    return TEMPLATES[value.lower()]


def configure_tokenizer(tokenizer, model_params, name: str) -> None:
    """Apply `model.chat_template` and `model.tokenizer_pad_token` to a Hugging Face tokenizer.

    Both backends call this, so they template and pad with the same tokens.
    """
    template = resolve(model_params.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer of {name} has no chat template; set model.chat_template to "
                         f"a template name ({', '.join(sorted(TEMPLATES))}) or Jinja text")
    pad = model_params.tokenizer_pad_token
    if pad:
        if pad not in tokenizer.get_vocab():
            raise ModelError(f"model.tokenizer_pad_token {pad!r} is not a token of {name}'s tokenizer; "
                             f"name one of its tokens (e.g. {tokenizer.eos_token!r})")
        tokenizer.pad_token = pad
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
