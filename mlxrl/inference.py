"""Inference on MLX: multi-turn chat, batch files, and the Python `infer()`.

    mlxrl infer --model.model_name output/learn_dpo/checkpoint-50 --interactive
    mlxrl infer -c configs/examples/eval_dpo_results.yaml --model.model_name CKPT -i
    mlxrl infer -c CONFIG --input_path in.jsonl --output_path out.jsonl

The config is Oumi's `InferenceConfig`: sections `model` and `generation`, and `input_path`,
`output_path`, `engine`. `-c` is optional: `--model.model_name` alone is enough. The walkthrough's
`eval_dpo_results.yaml` loads as it is: `inference.max_new_tokens` / `inference.temperature` become
`generation.*` (an explicit `generation` value or override wins), `data` and `evaluation` are
ignored with one note (`mlxrl eval` computes metrics).

A model name is a hub id, a local Hugging Face folder (a full fine-tune's output or checkpoint
too), a checkpoint folder (base + adapter), or an embedded tiny model: `tiny://qwen2`, or
`tiny://qwen2?hidden_size=128&num_layers=4` for a bigger one (any `build_tiny_model` size
argument; built once into the cache).

Generation: `temperature: 0` (Oumi's default) is greedy, any other value samples (with top_p,
top_k, min_p); `use_sampling` is not needed. Chat streams one reply at a time through mlx-lm's
`stream_generate`; batch files and `infer()` go through mlxrl's batched sampler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxrl.config import GenerationParams, ModelParams, load_config
from mlxrl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# eval_dpo_results.yaml's extra sections, and a training config's (so `-c train.yaml` works)
_LEGACY_SECTIONS = ("data", "evaluation", "inference", "training", "peft", "fsdp", "deepspeed")
_ENGINES = (None, "NATIVE", "MLX", "OUMI")
DEFAULT_BATCH = 16  # rows per sampler call when generation.batch_size is 1 (Oumi's default)


@dataclass
class InferenceConfig:
    model: ModelParams = field(default_factory=ModelParams)
    generation: GenerationParams = field(default_factory=GenerationParams)
    input_path: str | None = None
    output_path: str | None = None
    progress_path: str | None = None
    engine: str | None = None
    remote_params: dict[str, Any] = field(default_factory=dict)


def load_inference_config(path=None, overrides=None) -> tuple[InferenceConfig, list[str]]:
    """`mlxrl.config.load_config` into an `InferenceConfig`, legacy sections folded; returns
    (config, notes)."""
    notes: list[str] = []
    cfg = load_config(path, overrides, cls=InferenceConfig,
                      adapt_yaml=lambda data, source: notes.extend(_fold_legacy_sections(data, source)))
    engine = (cfg.engine or "").upper() or None
    if engine not in _ENGINES:
        notes.append(f"note: engine {cfg.engine} is not available here; mlxrl runs on MLX")
    if not cfg.model.model_name:
        raise ConfigError("model.model_name is required (-c CONFIG or --model.model_name NAME)")
    from mlxrl.capabilities import check_inference

    notes.extend(check_inference(cfg.generation))
    return cfg, notes


def _fold_legacy_sections(data: dict, source: str) -> list[str]:
    """eval_dpo_results.yaml: `inference.*` -> `generation.*`; `data`, `evaluation` and a
    training config's `training`, `peft`, ... are dropped with one note."""
    legacy = {k: data.pop(k) for k in _LEGACY_SECTIONS if k in data}
    if not legacy:
        return []
    inference = legacy.get("inference") or {}
    if not isinstance(inference, dict):
        raise ConfigError(f"{source}: inference must be a mapping")
    generation = data.setdefault("generation", {}) or {}
    data["generation"] = generation
    names = {f.name for f in dataclasses.fields(GenerationParams)}
    moved = [k for k in inference if k in names]
    for key in moved:
        generation.setdefault(key, inference[key])
    ignored = [k for k in legacy if k != "inference"] + [f"inference.{k}" for k in inference
                                                         if k not in names]
    parts = [f"inference.{{{','.join(moved)}}} -> generation"] if moved else []
    parts += [f"ignoring {', '.join(ignored)} (metrics: `mlxrl eval`)"] if ignored else []
    text = f"note: {Path(source).name}: {'; '.join(parts)}"
    return [text]


# ----------------------------------------------------------------------------- models


_LOADED: dict[str, Any] = {}  # the last models loaded, by their parameters (for infer())


def load_model(model_params: ModelParams, cache: bool = True):
    """`mlxrl.mlx.model.load` of `adapter_model` (Oumi's) or `model_name`; the last 2 are kept."""
    from mlxrl.mlx import model as mlx_model

    name = model_params.adapter_model or model_params.model_name
    params = dataclasses.replace(model_params, model_name=name)
    folder = Path(name).expanduser()  # a retrained checkpoint is loaded afresh
    stamp = [p.stat().st_mtime_ns for p in (folder / "adapters.safetensors", folder / "adapter_model.safetensors",
                                            folder / "model.safetensors") if p.is_file()]
    key = json.dumps([dataclasses.asdict(params), stamp], sort_keys=True, default=str)
    if cache and key in _LOADED:
        return _LOADED[key]
    loaded = mlx_model.load(params)
    if cache:
        while len(_LOADED) >= 2:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = loaded
    return loaded


def model_context(model_params: ModelParams, base_path: Path) -> int | None:
    """Tokens the model can attend to: model.model_max_length, else its config's positions."""
    if model_params.model_max_length:
        return model_params.model_max_length
    try:
        config = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


class Engine:
    """A loaded model with its generation settings: prompts in, replies out.

    `generation.max_new_tokens` is capped at the model's context (`model_context`), and each reply
    at what its prompt leaves of it, with a note."""

    def __init__(self, model_params: ModelParams, generation: GenerationParams, loaded=None):
        from mlxrl.data.formats import end_of_turn_ids, unwrap

        self.loaded = loaded or load_model(model_params)
        self.context = model_context(model_params, self.loaded.base_path)
        if self.context and generation.max_new_tokens > self.context:
            logger.warning(f"note: generation.max_new_tokens {generation.max_new_tokens} is more than the "
                f"model's context of {self.context} tokens; capped at {self.context}")
            generation = dataclasses.replace(generation, max_new_tokens=self.context)
        self.model_params, self.generation = model_params, generation
        self.tokenizer = self.loaded.tokenizer
        self.hf_tokenizer = unwrap(self.tokenizer)
        stops = end_of_turn_ids(self.tokenizer) | set(generation.stop_token_ids or [])
        self.eos_ids = sorted(set(self.tokenizer.eos_token_ids) | stops)
        self.last_stats: dict | None = None  # the last streamed reply: tokens, seconds, tokens/s

    @property
    def name(self) -> str:
        return self.model_params.model_name

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat template with the generation prompt, as training encodes prompts."""
        tok = self.hf_tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       **(self.model_params.chat_template_kwargs or {}))
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def max_tokens(self, prompt_length: int) -> int:
        """New tokens a reply to a prompt of `prompt_length` tokens may have (at least 1)."""
        if not self.context:
            return self.generation.max_new_tokens
        return max(1, min(self.generation.max_new_tokens, self.context - prompt_length))

    def decode(self, ids) -> str:
        skip = self.generation.skip_special_tokens
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip)

    def stream(self, prompt_ids: list[int]) -> Iterator[str]:
        """Text pieces of one reply as they are generated (stop strings end it); its speed is
        in `last_stats` afterwards."""
        import time

        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        g = self.generation
        if g.seed is not None:
            mx.random.seed(g.seed)
        sampler = make_sampler(temp=g.temperature, top_p=g.top_p if g.top_p < 1.0 else 0.0,
                               min_p=g.min_p, top_k=g.top_k)
        self.tokenizer.eos_token_ids = set(self.eos_ids)  # stream_generate stops on these
        text, started, last = "", time.perf_counter(), None
        self.last_stats = None
        try:
            for last in stream_generate(self.loaded.model, self.tokenizer, prompt_ids,
                                        max_tokens=self.max_tokens(len(prompt_ids)), sampler=sampler):
                cut = _stop_at(text + last.text, g.stop_strings)
                if cut is not None:
                    yield cut[len(text):]
                    return
                text += last.text
                yield last.text
        finally:
            if last is not None:  # mlx-lm's own rates: the prompt's, then the reply's tokens
                self.last_stats = {"tokens": last.generation_tokens,
                                   "tokens_per_second": last.generation_tps,
                                   "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
                                   "seconds": time.perf_counter() - started}

    def generate(self, conversations: list[list[dict]], progress: bool = False) -> list[str]:
        """One reply per conversation through the batched sampler, shortest prompts together."""
        from tqdm.auto import tqdm

        from mlxrl.console import live_bars
        from mlxrl.mlx.sampling import sample

        g = self.generation
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = g.batch_size if g.batch_size and g.batch_size > 1 else DEFAULT_BATCH
        replies: dict[int, str] = {}
        bar = tqdm(total=len(prompts), desc="infer", unit="row", disable=not (progress and live_bars()),
                   file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            longest = max(len(prompts[i]) for i in chunk)
            rollout = sample(self.loaded.model, [prompts[i] for i in chunk], max_tokens=self.max_tokens(longest),
                             temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                             eos_token_ids=self.eos_ids, seed=g.seed)
            for row, i in enumerate(chunk):
                ids = rollout.tokens[row, :rollout.lengths[row]].tolist()
                text = self.decode(ids)
                cut = _stop_at(text, g.stop_strings)
                replies[i] = text if cut is None else cut
            bar.update(len(chunk))
        bar.close()
        return [replies[i] for i in range(len(prompts))]


def _stop_at(text: str, stop_strings) -> str | None:
    """`text` cut before its first stop string, or None when it has none."""
    hits = [text.index(s) for s in stop_strings or [] if s and s in text]
    return text[:min(hits)] if hits else None


# ----------------------------------------------------------------------------- conversations


def system_prompt_text(value: str | None) -> str | None:
    """A registered system prompt's text (`--system-prompt letter_count` is the `\\boxed{}`
    instruction the letter-count GRPO trains with); any other value is the system prompt itself."""
    from mlxrl import tasks

    return tasks.system_prompt(value) or value or None


def as_messages(item, system_prompt: str | None = None, where: str = "input") -> list[dict]:
    """A string, a message list, or a row with `prompt` / `messages` -> chat messages.

    A trailing assistant message (a reference answer) is dropped: the model writes its own.
    """
    if isinstance(item, dict):
        if item.get("messages") is not None:
            item = item["messages"]
        elif item.get("prompt") is not None:
            item = item["prompt"]
        else:
            raise DataError(f"{where}: needs 'prompt' or 'messages' (has {sorted(item)})")
    if isinstance(item, str):
        messages = [{"role": "user", "content": item}]
    elif isinstance(item, list) and item and all(isinstance(m, dict) and "role" in m for m in item):
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in item]
    else:
        raise DataError(f"{where}: expected a string or a list of {{role, content}} messages")
    while len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages.pop()
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def read_rows(path: str) -> list[dict]:
    """JSON lines (or one JSON list) of rows; errors name the file and line."""
    from mlxrl.data.loading import utf8_text

    p = Path(path)
    if not p.is_file():
        raise DataError(f"input_path not found: {p}")
    text = utf8_text(p.read_bytes(), p)
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg})") from None
    if not rows:
        raise DataError(f"{p} has no rows")
    return rows


def run_batch(cfg: InferenceConfig, system_prompt: str | None = None, engine=None) -> list[dict]:
    """Every row of `cfg.input_path` answered; written to `cfg.output_path` as JSON lines."""
    rows = read_rows(cfg.input_path)
    conversations = [as_messages(r, system_prompt, f"{cfg.input_path}:{i + 1}")
                     for i, r in enumerate(rows)]
    engine = engine or Engine(cfg.model, cfg.generation)
    replies = engine.generate(conversations, progress=True)
    out = []
    for row, messages, reply in zip(rows, conversations, replies):
        record = dict(row) if isinstance(row, dict) else {"prompt": row}
        record["messages"] = messages + [{"role": "assistant", "content": reply}]
        record["response"] = reply
        out.append(record)
    if cfg.output_path:
        from mlxrl.output_folder import write_text_atomic

        path = Path(cfg.output_path)
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        logger.info(f"wrote {len(out)} rows to {path}")
    return out


# ----------------------------------------------------------------------------- Python API


def infer(inputs, model: str | None = None, *, config=None, system_prompt: str | None = None,
          overrides: list[str] | None = None, **generation):
    """Replies of `model` (or `config`'s model) to `inputs`; a string in gives a string out.

    `inputs`: a prompt string, or a list of prompt strings / message lists / {"prompt"|"messages"}
    rows. `config`: an `InferenceConfig` or a YAML path; `overrides`: Oumi-style
    `["--generation.max_new_tokens", "64"]`; `**generation`: `GenerationParams` fields
    (`max_new_tokens=64, temperature=0.7`). Models stay loaded between calls (the last two).
    """
    if isinstance(config, InferenceConfig):
        cfg = dataclasses.replace(config)
    else:
        extra = ["--model.model_name", model] if model else []
        cfg, _ = load_inference_config(config, extra + list(overrides or []))
    if model:
        cfg.model = dataclasses.replace(cfg.model, model_name=model)
    bad = sorted(set(generation) - {f.name for f in dataclasses.fields(GenerationParams)})
    if bad:
        raise ConfigError(f"infer(): unknown generation settings {bad}")
    cfg.generation = dataclasses.replace(cfg.generation, **generation)
    single = isinstance(inputs, (str, dict)) or (
        isinstance(inputs, list) and bool(inputs) and all(isinstance(m, dict) and "role" in m for m in inputs))
    items = [inputs] if single else list(inputs)
    conversations = [as_messages(x, system_prompt, f"inputs[{i}]") for i, x in enumerate(items)]
    replies = Engine(cfg.model, cfg.generation).generate(conversations)
    return replies[0] if single else replies

