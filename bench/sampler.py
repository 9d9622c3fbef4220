"""Sampler throughput: mlxrl `sample` vs mlx-lm `batch_generate` vs a plain decode loop.

Workload (DESIGN.md section 8): the 25M-parameter Qwen2-architecture tiny model (hidden 512,
8 layers, fp32), B prompts x G completions x 64 tokens at temperature 1, for (B, G) = (2, 4) and
(4, 4). Every method decodes exactly 64 tokens a row (the EOS id is one the model cannot sample)
from the same B*G rows; mlx-lm gets each prompt repeated G times, as it has no prefix sharing.
Each method returns token ids and the sampled tokens' log-probs.

- mlxrl: `mlxrl.mlx.sampling.sample(..., num_generations=G)`.
- batch_generate: `mlx_lm.generate.batch_generate(..., return_token_ids=True,
  return_logprobs=True)` with `make_sampler(1.0)`.
- plain loop: the repeated prompts left-padded into mlx-lm's `BatchKVCache`, one model call,
  log-softmax, categorical sample and gather a step, `mx.async_eval` each step (mlx-lm's own
  pattern), no compile.

Tokens a second = generated tokens / wall time of the whole call (prefill included). Every method
is warmed up first (traces, kernel builds), then the methods take turns for `--repeats` rounds, so
load from other processes falls on all of them alike; the median and best rounds are printed.
Reports, never asserts.

    python bench/sampler.py [--repeats 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPE = dict(hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=2)
TEXTS = [
    "How many 'r's are in 'strawberry'? Count the letters one by one.",
    "You are a helpful assistant. Please answer the question and think step by step.",
    "The quick brown fox jumps over the lazy dog.",
    "What is your name? My name is Tiny. Is this correct? Yes, it is correct.",
]


class NoStopTokenizer:
    """The model's tokenizer with an EOS id the model cannot sample: rows run to max_tokens."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos_token_ids = tokenizer, [eos]

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def run_mlxrl(model, prompts, G, tokens, eos, split=True):
    """`split` False: without the split matmuls (to show what they bring); True: by the rule."""
    from mlxrl.mlx import sampling

    rule = sampling.SPLIT_MAX_ROWS
    sampling.SPLIT_MAX_ROWS = rule if split else 0
    try:
        r = sampling.sample(model, prompts, num_generations=G, max_tokens=tokens,
                            temperature=1.0, eos_token_ids=[eos], seed=0)
    finally:
        sampling.SPLIT_MAX_ROWS = rule
    return int(r.lengths.sum())


def run_batch_generate(model, tokenizer, prompts, G, tokens):
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    rows = [p for p in prompts for _ in range(G)]
    r = batch_generate(model, tokenizer, rows, max_tokens=tokens, sampler=make_sampler(1.0),
                       return_token_ids=True, return_logprobs=True)
    return sum(len(t) for t in r.token_ids)


def run_plain_loop(model, prompts, G, tokens):
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    rows = [p for p in prompts for _ in range(G)]
    width = max(map(len, rows))
    cache = [BatchKVCache([width - len(p) for p in rows]) for _ in model.layers]
    logits = model(mx.array([[0] * (width - len(p)) + p for p in rows]), cache=cache)[:, -1, :]
    out = []
    for _ in range(tokens):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = mx.random.categorical(logprobs)
        out.append((token, mx.take_along_axis(logprobs, token[:, None], axis=-1)))
        mx.async_eval(out[-1])
        logits = model(token[:, None], cache=cache)[:, -1, :]
    mx.eval(out)
    return len(rows) * tokens


def tokens_per_second(fn) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def compare(model, tokenizer, B, G, tokens, repeats):
    eos = model.args.vocab_size  # an id the model cannot sample
    prompts = [tokenizer.encode(t) for t in TEXTS[:B]]
    no_stop = NoStopTokenizer(tokenizer, eos)
    from mlxrl.mlx.sampling import split_matmuls_at

    methods = {
        "mlxrl sample": lambda: run_mlxrl(model, prompts, G, tokens, eos),
        "  ... without split matmuls": lambda: run_mlxrl(model, prompts, G, tokens, eos, False),
        "mlx-lm batch_generate": lambda: run_batch_generate(model, no_stop, prompts, G, tokens),
        "plain loop (BatchKVCache)": lambda: run_plain_loop(model, prompts, G, tokens),
    }
    first = {name: 1 / tokens_per_second(fn) * B * G * tokens for name, fn in methods.items()}
    for fn in methods.values():
        fn()
    rates = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            rates[name].append(tokens_per_second(fn))
    base = statistics.median(rates["mlx-lm batch_generate"])
    print(f"\n{B} prompts x {G} completions x {tokens} tokens, prompt lengths "
          f"{[len(p) for p in prompts]}, {repeats} rounds (split matmuls at "
          f"{B * G} rows: {split_matmuls_at(B * G)}):")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"  {name:28s} median {med:6.1f} tok/s ({1000 * B * G / med:5.1f} ms/step)  "
              f"best {max(r):6.1f}  x{med / base:.2f} vs batch_generate (median), "
              f"x{max(r) / max(rates['mlx-lm batch_generate']):.2f} (best); "
              f"first call {first[name]:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    from mlxrl import _blas
    from mlxrl.runtime import mlx_runtime

    with mlx_runtime():  # OpenBLAS before the first mlx.core import; mlxrl's JIT flags
        _run(args)
        print(f"BLAS: {_blas.status}")


def _run(args):
    import mlx.core as mx
    import mlx_lm

    from mlxrl.mlx.cpu_ops import use_cpu_ops
    from mlxrl.tiny_models import tiny_model

    path = tiny_model("qwen2", **SHAPE)
    model, tokenizer = mlx_lm.load(str(path))
    use_cpu_ops(model)  # as mlxrl's loader gives it (the splittable layers; mlx-lm's ops otherwise)
    mx.eval(model.parameters())
    print(f"model {path} (fp32, vocab {model.args.vocab_size}), mlx {mx.__version__}")
    for B, G in ((2, 4), (4, 4)):
        compare(model, tokenizer, B, G, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
