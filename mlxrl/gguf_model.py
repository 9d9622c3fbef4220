"""A Hugging Face model folder as one GGUF file, llama.cpp's format, written with `gguf` (the
Python package of llama.cpp itself: its writer, its tensor-name table, its quantizers).

    write_model(hf_folder, path, quantize="f16")

- Architectures: llama, qwen2, qwen3 (llama.cpp and mlxrl both run them); anything else is
  refused with one line. Only the default RoPE is written: a scaled RoPE is refused.
- Tensors get llama.cpp's names (`gguf.get_tensor_name_map`) and its layouts: the numpy shape of
  a Hugging Face weight [out, in] is kept (GGUF lists dimensions the other way round), and for
  llama the rows of q_proj/k_proj are permuted per head from Hugging Face's rotate-half RoPE to
  llama.cpp's interleaved one (`permute_rope_rows`; qwen2/qwen3 use the NeoX RoPE, unpermuted).
- `quantize`: f32, f16, q8_0 or q4_0 for the 2-D weights (1-D norms and biases stay f32, as in
  llama.cpp's own converter); a weight whose rows are not a multiple of the 32-value block is
  written f16 instead.
- The tokenizer (byte-level BPE: tokens, merges, token types, the pre-tokenizer name llama.cpp
  knows), bos/eos/pad ids and the chat template go into the metadata.

Backend-neutral (numpy, safetensors, gguf; no mlx or torch).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from mlxrl.errors import MlxrlError

ARCHS = ("llama", "qwen2", "qwen3")
QUANTIZE = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # values per block of Q8_0 and Q4_0

# The split regex of a byte-level BPE tokenizer -> llama.cpp's name for that pre-tokenizer.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
GPT2_PRE = "gpt2"  # ByteLevel with its own regex: GPT-2's split (llama.cpp's default BPE)


class GgufError(MlxrlError):
    """A model or adapter that cannot be written as GGUF (one line: what and why)."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_arch(config: dict, where: str) -> str:
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise GgufError(f"{where}: cannot write a {arch!r} model as GGUF; supported: "
                        f"{', '.join(ARCHS)} (llama.cpp runs them and the result is tested here)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise GgufError(f"{where}: RoPE type {kind!r} is not written to GGUF by mlxrl; "
                        "only the default RoPE is supported")
    return arch


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a llama q/k projection (or its LoRA B) from rotate-half pairs (i, i + d/2) to
    llama.cpp's adjacent pairs (2i, 2i + 1), head by head."""
    rows = weight.shape[0]
    per_head = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight, n_heads: int):
    """`permute_rope_rows` undone: llama.cpp's row order back to Hugging Face's (numpy or mlx
    arrays; any row-wise tensor, such as a quantized weight's packed words, scales and biases)."""
    rows = weight.shape[0]
    per_head = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def to_gguf_layout(arch: str, config: dict, hf_name: str, weight: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor (or a LoRA B, whose rows are the output rows) in llama.cpp's layout."""
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if "q_proj" in hf_name else config["num_key_value_heads"]
        return permute_rope_rows(weight, heads)
    return weight


@functools.cache
def _name_map(arch: str, n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)  # ~25 ms to build


def tensor_name(arch: str, config: dict, hf_name: str) -> str:
    names = _name_map(arch, config["num_hidden_layers"])
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GgufError(f"no llama.cpp tensor for {hf_name!r} in a {arch} model")
    return name


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (bfloat16 too, which numpy cannot name:
    its 16 bits are the top half of a float32)."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    size = int(np.frombuffer(data[:8].tobytes(), dtype="<u8")[0])
    header = json.loads(data[8:8 + size].tobytes())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise GgufError(f"{file}: tensor {name} is {info['dtype']}; expected float weights")
        start, end = (8 + size + offset for offset in info["data_offsets"])
        raw = np.frombuffer(data[start:end].tobytes(), dtype=_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32).reshape(info["shape"])
    return tensors


def _hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise GgufError(f"{folder}: no model*.safetensors to convert")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def _encode(weight: np.ndarray, quantize: str):
    """(data, raw_dtype) for `GGUFWriter.add_tensor`."""
    import gguf

    if weight.ndim == 1 or quantize == "f32":
        return weight.astype(np.float32), None
    if quantize == "f16" or weight.shape[-1] % BLOCK:
        return weight.astype(np.float16), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quantize]
    return gguf.quants.quantize(weight, qtype), qtype


def _file_type(quantize: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quantize]


def add_hparams(writer, arch: str, config: dict) -> None:
    """The architecture's hyperparameters under llama.cpp's keys."""
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def write_model(hf_folder, path, quantize: str = "f16", name: str | None = None) -> Path:
    """Write the model in `hf_folder` (transformers' layout, float weights) to GGUF file `path`."""
    import gguf

    folder, path = Path(hf_folder), Path(path)
    if quantize not in QUANTIZE:
        raise GgufError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZE)}")
    config = _read_json(folder / "config.json")
    arch = check_arch(config, str(folder / "config.json"))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    writer.add_file_type(_file_type(quantize))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, arch, config)
    add_tokenizer(writer, folder, config)
    tensors = _hf_tensors(folder)
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for hf_name, weight in tensors.items():
        data, raw_dtype = _encode(to_gguf_layout(arch, config, hf_name, weight), quantize)
        writer.add_tensor(tensor_name(arch, config, hf_name), data, raw_dtype=raw_dtype)
    _write(writer)
    return path


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- tokenizer -----------------------------------------------------------------------------------

def _pre_tokenizer(tokenizer: dict, where: str) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return GPT2_PRE
    split = next((s for s in steps if s.get("type") == "Split"), {}).get("pattern", {}).get("Regex")
    if split in PRE_TOKENIZERS and steps[-1].get("type") == "ByteLevel":
        return PRE_TOKENIZERS[split]
    raise GgufError(f"{where}: its pre-tokenizer is not one llama.cpp is known to read the same "
                    f"way (GPT-2, Qwen2 or Llama-3 byte-level BPE); cannot write its tokenizer")


def check_tokenizer(folder: Path) -> tuple[dict, str]:
    """(tokenizer.json, llama.cpp's pre-tokenizer name), or a one-line refusal."""
    where = str(Path(folder) / "tokenizer.json")
    tokenizer = _read_json(Path(folder) / "tokenizer.json")
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufError(f"{where}: only byte-level BPE tokenizers are written to GGUF by mlxrl")
    return tokenizer, _pre_tokenizer(tokenizer, where)


def add_tokenizer(writer, folder: Path, config: dict) -> None:
    """Byte-level BPE vocabulary, merges, token types, special ids and the chat template."""
    import gguf

    tokenizer, pre = check_tokenizer(folder)
    model = tokenizer["model"]
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    for token in added.values():
        vocab.setdefault(token["content"], token["id"])
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        special = added.get(token, {}).get("special")
        types[index] = (gguf.TokenType.NORMAL if token not in added else
                        gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special(writer, folder, vocab, config)


def _add_special(writer, folder: Path, vocab: dict, config: dict) -> None:
    settings = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")

    def token_id(key):
        token = settings.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            return vocab[token]
        value = generation.get(f"{key}_token_id", config.get(f"{key}_token_id"))
        return value[0] if isinstance(value, list) else value

    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if token_id(key) is not None:
            add(int(token_id(key)))
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template = chat_template(folder)
    if template:
        writer.add_chat_template(template)


def chat_template(folder: Path) -> str | None:
    """The model's chat template: `chat_template.jinja`, else `tokenizer_config.json`'s."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = _read_json(Path(folder) / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None
