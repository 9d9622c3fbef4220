"""mlxrl.mlx.sampling: exact log-probs, reproducibility, prefix sharing, stopping and filters."""

import mlx.core as mx  # conftest.py has bound OpenBLAS first (mlxrl.runtime)
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tuner.lora import LoRALinear

from mlxrl.mlx.logprobs import per_token_logps
from mlxrl.mlx.sampling import sample
from mlxrl.testing import EOS_ID, tiny_model

# Different lengths, one of a single token: left padding and an empty prefill row.
PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51], [7], [1, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def models():
    return {arch: mlx_lm.load(str(tiny_model(arch)))[0] for arch in ("qwen2", "llama", "falcon_h1")}


def never(model):
    """An EOS id the model cannot sample, so every row runs to max_tokens."""
    return [model.args.vocab_size]


def teacher_forced(model, prompt, completion, temperature):
    ids = mx.array([list(prompt) + list(completion)])
    return np.array(per_token_logps(model, ids, temperature)[0, len(prompt) - 1:])


def full_logits(model, prompt, completion):
    """[len(completion), V] logits that predicted each completion token."""
    ids = mx.array([list(prompt) + list(completion)])
    return np.array(model(ids)[0, len(prompt) - 1: len(prompt) - 1 + len(completion)])


def rows(r, prompts=PROMPTS):
    """(row, its prompt, its completion) for each row of rollout r."""
    for i in range(len(r.lengths)):
        yield i, prompts[r.prompt_index[i]], r.tokens[i, : r.lengths[i]].tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "falcon_h1"])
def test_logprobs_equal_teacher_forced_recompute(models, arch):
    model = models[arch]
    r = sample(model, PROMPTS, num_generations=3, max_tokens=12, temperature=1.5, top_p=0.95,
               eos_token_ids=[EOS_ID], seed=3)
    assert r.tokens.shape == r.logprobs.shape == (12, r.lengths.max())
    assert r.tokens.dtype == np.int32 and r.logprobs.dtype == np.float32
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i, prompt, completion in rows(r):
        expected = teacher_forced(model, prompt, completion, 1.5)
        np.testing.assert_allclose(r.logprobs[i, : r.lengths[i]], expected, atol=1e-4)
    assert (r.tokens[~r.mask] == 0).all() and (r.logprobs[~r.mask] == 0).all()
    assert r.seconds > 0 and r.tokens_per_second > 0


@pytest.mark.parametrize("arch", ["qwen2", "falcon_h1"])
def test_single_token_prompts_nothing_to_prefill(models, arch):
    model, prompts = models[arch], [[5], [9]]
    r = sample(model, prompts, num_generations=2, max_tokens=6, temperature=1.5,
               eos_token_ids=never(model), seed=4)
    for i, prompt, completion in rows(r, prompts):
        expected = teacher_forced(model, prompt, completion, 1.5)
        np.testing.assert_allclose(r.logprobs[i], expected, atol=1e-4)


def test_fixed_seed_reproduces_and_seeds_differ(models):
    model = models["qwen2"]
    kw = dict(num_generations=4, max_tokens=16, eos_token_ids=[EOS_ID])
    a, b = sample(model, PROMPTS, seed=11, **kw), sample(model, PROMPTS, seed=11, **kw)
    c = sample(model, PROMPTS, seed=12, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert a.tokens.shape != c.tokens.shape or (a.tokens != c.tokens).any()
    group = a.tokens[:4]  # the G completions of one prompt differ from each other
    assert len({tuple(t) for t in group}) > 1


@pytest.mark.parametrize("arch", ["qwen2", "falcon_h1"])
def test_prefix_sharing_equals_independent_prefills(models, arch):
    model, G = models[arch], 4
    kw = dict(max_tokens=14, temperature=1.0, eos_token_ids=never(model), seed=5)
    shared = sample(model, PROMPTS, num_generations=G, **kw)
    repeated = sample(model, [p for p in PROMPTS for _ in range(G)], num_generations=1, **kw)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)


def test_rows_stop_at_eos_and_keep_it(models):
    model = models["qwen2"]
    eos = list(range(0, model.args.vocab_size, 3))  # a third of the vocabulary ends a row
    r = sample(model, PROMPTS, num_generations=4, max_tokens=40, eos_token_ids=eos, seed=0)
    assert r.finished.all()
    assert len(set(r.lengths.tolist())) > 1  # rows stop at different steps
    for i, _, completion in rows(r):
        assert completion[-1] in eos and not set(completion[:-1]) & set(eos)
        assert r.logprobs[i, r.lengths[i] - 1] < 0  # the EOS is scored like any token
    assert r.mask.sum() == r.lengths.sum()


def test_greedy_stops_at_a_known_eos(models):
    model = models["llama"]
    free = sample(model, PROMPTS[:1], max_tokens=8, temperature=0.0, eos_token_ids=never(model))
    stop = int(free.tokens[0, 3])
    first = free.tokens[0].tolist().index(stop)
    r = sample(model, PROMPTS[:1], max_tokens=8, temperature=0.0, eos_token_ids=stop)
    assert r.lengths.tolist() == [first + 1] and r.finished.tolist() == [True]
    assert r.tokens[0].tolist() == free.tokens[0, : first + 1].tolist()


def test_max_tokens_truncates_without_finishing(models):
    model = models["falcon_h1"]
    r = sample(model, PROMPTS, num_generations=2, max_tokens=9, eos_token_ids=never(model), seed=1)
    assert r.tokens.shape == (8, 9)
    assert (r.lengths == 9).all() and not r.finished.any() and r.mask.all()


def greedy_reference(model, prompt, n):
    """mlx-lm's greedy `generate_step`: tokens and their (untempered) log-probs."""
    steps = list(generate_step(mx.array(prompt), model, max_tokens=n))
    return [int(tok) for tok, _ in steps], [float(logprobs[tok]) for tok, logprobs in steps]


@pytest.mark.parametrize("arch", ["qwen2", "falcon_h1"])
def test_greedy_equals_mlx_lm_generate_step(models, arch):
    model = models[arch]
    r = sample(model, PROMPTS, num_generations=2, max_tokens=10, temperature=0.0,
               eos_token_ids=never(model))
    for i, prompt, completion in rows(r):
        tokens, logprobs = greedy_reference(model, prompt, 10)
        assert completion == tokens
        np.testing.assert_allclose(r.logprobs[i], logprobs, atol=1e-4)


def test_compiled_step_follows_weight_updates_and_lora_scale():
    """The decode trace is kept across calls: it must read the current weights (an optimizer
    step) and retrace when a Python float it baked in changes (adapters switched off)."""
    model = mlx_lm.load(str(tiny_model("qwen2")))[0]  # its own copy: LoRA is added below
    lora = []
    for layer in model.layers:
        layer.mlp.up_proj = LoRALinear.from_base(layer.mlp.up_proj, r=4, scale=2.0)
        lora.append(layer.mlp.up_proj)
    kw = dict(max_tokens=8, temperature=0.0, eos_token_ids=never(model))
    before = sample(model, PROMPTS, **kw)  # lora_b = 0: the base model's tokens
    for i, m in enumerate(lora):  # what an optimizer step does: new arrays, same modules
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
    after = sample(model, PROMPTS, **kw)
    assert after.tokens.shape != before.tokens.shape or (after.tokens != before.tokens).any()
    for _, prompt, completion in rows(after):
        assert completion == greedy_reference(model, prompt, 8)[0]
    for m in lora:
        m.scale = 0.0
    np.testing.assert_array_equal(sample(model, PROMPTS, **kw).tokens, before.tokens)


def test_top_k_1_equals_greedy(models):
    model = models["qwen2"]
    kw = dict(num_generations=2, max_tokens=10, eos_token_ids=never(model))
    greedy = sample(model, PROMPTS, temperature=0.0, **kw)
    top1 = sample(model, PROMPTS, temperature=1.5, top_k=1, seed=9, **kw)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


@pytest.mark.parametrize("filters", [dict(top_p=0.6), dict(min_p=0.3), dict(top_k=3)])
def test_filters_never_sample_outside_the_allowed_set(models, filters):
    model, T = models["qwen2"], 1.5
    r = sample(model, PROMPTS[:2], num_generations=48, max_tokens=6, temperature=T,
               eos_token_ids=never(model), seed=2, **filters)
    sizes = []
    for i, prompt, completion in rows(r):
        z = full_logits(model, prompt, completion) / T
        for logits, tok in zip(z, completion):
            allowed = _allowed(logits, **filters)
            sizes.append(len(allowed))
            assert tok in allowed
        # log-probs stay those of the unfiltered tempered distribution
        np.testing.assert_allclose(r.logprobs[i], teacher_forced(model, prompt, completion, T),
                                   atol=1e-4)
    assert 1 < np.mean(sizes) < model.args.vocab_size / 4  # the filter bites but leaves a choice
    assert len(set(r.tokens[:, 0].tolist())) > 1


def _allowed(z, top_p=1.0, min_p=0.0, top_k=0) -> set[int]:
    """The tokens Hugging Face's top-k, top-p and min-p warpers keep for tempered logits z."""
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        mass_before = np.cumsum(p[order]) - p[order]
        keep[order[mass_before >= top_p + 1e-5]] = False
    if min_p:
        keep &= p >= min_p * p.max() * (1 - 1e-5)
    return set(np.flatnonzero(keep).tolist())


def test_invalid_arguments_raise(models):
    model = models["qwen2"]
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[1], []], max_tokens=4, eos_token_ids=[EOS_ID])
    with pytest.raises(ValueError, match="top_p"):
        sample(model, [[1]], max_tokens=4, top_p=0.0, eos_token_ids=[EOS_ID])


def test_split_matmuls_by_rule_on_mlxrls_model_with_exact_logprobs(monkeypatch):
    """mlxrl's loader makes the model's linear layers splittable; the sampler splits decode matmuls
    by a fixed rule (<= 8 rows, on a CPU with OpenBLAS's AVX-512 small-matrix kernels), not by
    timing, and clears the flags after. The split path is run here whatever this CPU has."""
    import sys

    from mlxrl._jit import cpu_flags
    from mlxrl.config import ModelParams
    from mlxrl.mlx import cpu_ops, sampling
    from mlxrl.mlx.model import load

    avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= cpu_flags()
    assert sampling.split_matmuls_at(8) is (sys.platform.startswith("linux") and avx512)
    assert sampling.split_matmuls_at(9) is False
    monkeypatch.setattr(sampling, "_small_kernels", lambda: True)
    model = load(ModelParams(model_name="tiny://qwen2")).model
    splittable = [m for _, m in model.named_modules() if isinstance(m, sampling.SPLITTABLE)]
    assert splittable and all(isinstance(m, (nn.Linear, nn.Embedding)) for m in splittable)
    calls, split = [], cpu_ops.split_matmul
    monkeypatch.setattr(cpu_ops, "split_matmul", lambda x, w: calls.append(x.shape) or split(x, w))
    for prompts, generations in ((PROMPTS[:2], 4), (PROMPTS, 4)):  # 8 rows, then 16
        calls.clear()
        r = sample(model, prompts, num_generations=generations, max_tokens=10, temperature=1.0,
                   eos_token_ids=never(model), seed=5)
        rows_n = len(prompts) * generations
        assert bool(calls) is (rows_n <= 8)
        assert all(shape[0] == rows_n for shape in calls)  # decode steps only, never the prefill
        assert not any(m.split_matmul for m in splittable)
        for i, prompt, completion in rows(r, prompts):
            np.testing.assert_allclose(r.logprobs[i], teacher_forced(model, prompt, completion, 1.0),
                                       atol=1e-4)


def test_few_decode_rows_run_on_one_openblas_thread(monkeypatch, decode_blas_threads):
    """On the Linux CPU, decode at <= 8 rows runs OpenBLAS on one thread (decode weights, no
    split: a second thread costs more in hand-offs than it computes there), at 16 rows on all of
    them; the count is restored after, also when decoding fails, and the tokens and log-probs
    are those of the threaded matmuls."""
    import contextlib

    from mlxrl import _blas
    from mlxrl.config import ModelParams
    from mlxrl.mlx import sampling
    from mlxrl.mlx.model import load

    lib, seen = decode_blas_threads
    monkeypatch.setattr(sampling, "split_matmuls_at", lambda rows: False)
    model = load(ModelParams(model_name="tiny://qwen2")).model
    kwargs = dict(max_tokens=10, temperature=1.0, eos_token_ids=never(model), seed=5)
    one = sample(model, PROMPTS[:2], num_generations=4, **kwargs)
    sample(model, PROMPTS, num_generations=4, **kwargs)
    assert seen == [1, 2] and lib.openblas_get_num_threads() == 2
    with monkeypatch.context() as m:
        m.setattr(_blas, "threads", lambda n: contextlib.nullcontext())
        both = sample(model, PROMPTS[:2], num_generations=4, **kwargs)
    assert seen[-1] == 2
    np.testing.assert_array_equal(one.tokens, both.tokens)
    np.testing.assert_allclose(one.logprobs, both.logprobs, atol=1e-5)
    monkeypatch.setattr(sampling, "_decode", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sample(model, PROMPTS[:2], num_generations=4, **kwargs)
    assert lib.openblas_get_num_threads() == 2
