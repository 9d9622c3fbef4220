"""Tiny real models in Hugging Face format: what `tiny://qwen2` names (the offline quickstart,
demos, tests). A runtime module: `mlxrl.model_names` resolves `tiny://` names through it.

`build_tiny_model(out_dir, arch)` writes a complete Hugging Face model folder (`config.json`,
fp32 `model.safetensors` with HF tensor names, a byte-level BPE tokenizer with a ChatML chat
template, `generation_config.json`) for `qwen2`, `llama` or `falcon_h1`. The folder loads in
`mlx_lm.load` and in `transformers.AutoModelForCausalLM` and both give the same fp32 logits.
`tiny_model(arch)` builds once into mlxrl's cache folder (`mlxrl.cache.cache_dir()`) and returns
its path.

Nothing is downloaded and torch is not needed: weights come from a seeded numpy generator and the
tokenizer is trained on the spot on a small built-in English corpus (deterministic, ~0.1 s).
Linear weights have std 1/sqrt(fan_in), embeddings and lm_head std 2/sqrt(hidden_size), so
activations keep their scale through the layers and logits vary by a few units between tokens (a
std-0.02 init would give nearly uniform next-token distributions).

falcon_h1 has µP multipliers that HF applies at runtime and mlx-lm folds into the weights when it
loads them. The tiny config uses non-trivial values for all of them except two that mlx-lm 0.32
folds differently from transformers: `key_multiplier` (mlx-lm never applies it) and
`attention_in_multiplier` (mlx-lm scales q/k_proj but not v_proj). Both stay 1.0 so the two
libraries agree on the base logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mlxrl.cache import cache_dir, cached_folder

BUILDER_VERSION = 1
ARCHS = ("qwen2", "llama", "falcon_h1")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
PAD_ID, IM_START_ID, EOS_ID = 0, 1, 2
MAX_VOCAB_SIZE = 768  # the built-in corpus runs out of merges first: 736 tokens
ROPE_THETA = 10000.0

_PRETOKENIZE_REGEX = (  # Qwen2's: single digits, words with one leading non-letter, punctuation runs
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# falcon_h1 µP multipliers: non-trivial so that adapter export is tested against mlx-lm's folding.
FALCON_H1_MULTIPLIERS = {
    "embedding_multiplier": 2.0,
    "lm_head_multiplier": 0.75,
    "mlp_multipliers": [0.75, 1.5],
    "attention_out_multiplier": 0.8,
    "ssm_in_multiplier": 1.5,
    "ssm_out_multiplier": 1.25,
    "ssm_multipliers": [0.5, 1.25, 0.75, 1.5, 2.0],
    # mlx-lm 0.32 ignores key_multiplier and skips v_proj when folding attention_in_multiplier.
    "key_multiplier": 1.0,
    "attention_in_multiplier": 1.0,
}

_TEXT = """\
The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the sun.
Hello! How are you today? I am fine, thank you. What is your name? My name is Tiny.
You are a helpful assistant. Please answer the question. Think step by step.
The answer is 42. Let me count the letters one by one. There are three of them.
How many 'r's are in 'strawberry'? The word 'strawberry' has three 'r's. \\boxed{3}
How many 'l's are in 'hello'? The letter 'l' appears two times. \\boxed{2}
Count the number of times the letter appears in the word, then put the answer in \\boxed{}.
Water is wet and fire is hot. The sky is blue, the grass is green, the snow is white.
We write code, run tests and read the results. Good models learn from good data.
Is this correct? Yes, it is correct. No, that is wrong. Maybe, but I am not sure.
One, two, three, four, five, six, seven, eight, nine, ten. First, second, third, last.
"""
_WORDS = (
    "apple banana cherry orange grape lemon melon peach pear plum strawberry blueberry "
    "house water paper school mother father brother sister friend people world number "
    "letter question answer problem reason because before after always never sometimes "
    "morning evening yesterday tomorrow happy little great small large good best better"
).split()


def _corpus() -> list[str]:
    """The tokenizer's training text: prose, chat turns, letters, digits and counting questions."""
    lines = _TEXT.splitlines()
    lines += [" ".join("abcdefghijklmnopqrstuvwxyz"), " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ")]
    lines += [" ".join(str(i) for i in range(k, k + 10)) for k in range(0, 200, 10)]
    for i, word in enumerate(_WORDS):
        letter = word[i % len(word)]
        count = word.count(letter)
        lines.append(f"How many '{letter}'s are in '{word}'? The answer is \\boxed{{{count}}}.")
        lines.append(f"user: Spell {word}. assistant: {' '.join(word)}")
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer (`PreTrainedTokenizerFast`) trained on the built-in corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's pipeline: transformers 5 rebuilds it for model_type qwen2 whatever tokenizer.json
    # says, so using it everywhere keeps every loader on the same ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _base_config(
    arch, vocab_size, hidden_size, num_layers, intermediate_size, num_heads, num_kv_heads, tie
):
    architectures = {
        "qwen2": "Qwen2ForCausalLM",
        "llama": "LlamaForCausalLM",
        "falcon_h1": "FalconH1ForCausalLM",
    }
    return {
        "architectures": [architectures[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        # transformers 5 reads rope_parameters, mlx-lm reads rope_theta: write both.
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "tie_word_embeddings": tie,
        "bos_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _falcon_h1_config(hidden_size: int, num_heads: int) -> dict:
    d_ssm = 2 * hidden_size
    d_head = hidden_size // num_heads
    return {
        "mamba_d_ssm": d_ssm,
        "mamba_n_heads": d_ssm // d_head,
        "mamba_d_head": d_head,
        # mlx-lm's gated RMSNorm ignores n_groups: with mamba_rms_norm and n_groups > 1 the two
        # libraries disagree.
        "mamba_n_groups": 1,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 16,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_rms_norm": False,
        "mamba_norm_before_gate": False,
        "mamba_use_mlp": True,
        "projectors_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "time_step_limit": [0.0, float("inf")],
        **FALCON_H1_MULTIPLIERS,
    }


def make_config(
    arch,
    vocab_size,
    *,
    hidden_size=64,
    num_layers=2,
    intermediate_size=None,
    num_heads=4,
    num_kv_heads=2,
    **overrides,
) -> dict:
    """The `config.json` dict for a tiny model; `overrides` replace or add top-level keys."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    intermediate_size = intermediate_size or 3 * hidden_size
    tie = arch == "qwen2"
    config = _base_config(
        arch, vocab_size, hidden_size, num_layers, intermediate_size, num_heads, num_kv_heads, tie
    )
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    elif arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(_falcon_h1_config(hidden_size, num_heads))
    config.update(overrides)
    if "rope_theta" in overrides:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    return config


def _layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names (relative to `model.layers.N.`) and shapes for one decoder layer."""
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
    }
    mlp = {
        "gate_proj.weight": (inter, h),
        "up_proj.weight": (inter, h),
        "down_proj.weight": (h, inter),
    }
    if c["model_type"] == "qwen2":
        attn.update(
            {
                "self_attn.q_proj.bias": (q,),
                "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.bias": (kv,),
            }
        )
    if c["model_type"] != "falcon_h1":
        return {
            **attn,
            **{f"mlp.{k}": v for k, v in mlp.items()},
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
    d_ssm, nh, gs = c["mamba_d_ssm"], c["mamba_n_heads"], c["mamba_n_groups"] * c["mamba_d_state"]
    conv_dim = d_ssm + 2 * gs
    mamba = {
        "in_proj.weight": (d_ssm + conv_dim + nh, h),
        "out_proj.weight": (h, d_ssm),
        "conv1d.weight": (conv_dim, 1, c["mamba_d_conv"]),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nh,),
        "A_log": (nh,),
        "D": (nh,),
    }
    if c["mamba_rms_norm"]:
        mamba["norm.weight"] = (d_ssm,)
    return {
        **attn,
        **{f"feed_forward.{k}": v for k, v in mlp.items()},
        **{f"mamba.{k}": v for k, v in mamba.items()},
        "input_layernorm.weight": (h,),
        "pre_ff_layernorm.weight": (h,),
    }


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One tensor: norms 1, Mamba's A_log/D/dt_bias near their usual init, the rest random."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name:
        return np.ones(shape, np.float32)
    if leaf == "A_log":
        return np.log(np.arange(1, shape[0] + 1, dtype=np.float32))
    if leaf in ("D", "dt_bias"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if "embed_tokens" in name or "lm_head" in name:
        std = 2.0 / np.sqrt(shape[1])
    else:
        std = 1.0 / np.sqrt(np.prod(shape[1:]))
    return (std * rng.standard_normal(shape)).astype(np.float32)


def make_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights with HF names for `config` (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    h, vocab = config["hidden_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in _layer_shapes(config).items()})
    final_norm = "final_layernorm" if config["model_type"] == "falcon_h1" else "norm"
    shapes[f"model.{final_norm}.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    return {name: _init(name, shape, rng) for name, shape in shapes.items()}


def build_tiny_model(
    out_dir,
    arch: str = "qwen2",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a tiny `arch` model folder to `out_dir` and return its path.

    `overrides` replace top-level `config.json` keys (e.g. `tie_word_embeddings=False`).
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = make_config(
        arch,
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        **overrides,
    )
    save_file(make_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": PAD_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    for path in out.iterdir():  # safetensors writes 0600; others may read a shared cache
        path.chmod(0o644)
    _add_legacy_tokenizer_files(out)
    return out


def _add_legacy_tokenizer_files(out: Path) -> None:
    """Also put the chat template in `tokenizer_config.json` and write `special_tokens_map.json`,
    where older readers look (transformers 5 writes `chat_template.jinja` only)."""
    path = out / "tokenizer_config.json"
    tok_config = json.loads(path.read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    special = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tiny_model(arch: str = "qwen2", **kwargs) -> Path:
    """`build_tiny_model(arch, **kwargs)` built once into the cache; returns the folder.

    Safe under concurrent test processes: each builds into its own temporary folder and moves it
    into place with an atomic rename; a loser of the race drops its copy and uses the winner's.
    """
    key = json.dumps(
        {"arch": arch, "kwargs": kwargs, "version": BUILDER_VERSION}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = cache_dir() / "tiny-models" / f"{arch}-{digest}"
    return cached_folder(final, lambda folder: build_tiny_model(folder, arch, **kwargs))
