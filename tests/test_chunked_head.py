"""The LM head's log-probs in chunks (`logprobs.head_logps`): what torch's autograd and
transformers give, and memory that stays under MLX's memory limit.

- Values and the gradient of the hidden states: torch's `log_softmax(h @ W.T / T)` and its
  autograd, for a tied (embedding) head and a separate one, chunks not dividing the positions.
- Whole models: `per_token_logps` with chunks equal transformers' log-softmax of its own logits
  (tests/test_fast_paths.py::test_log_probs_from_a_start_position_equal_transformers[chunked]).
- A head that trains (a full fine-tune) takes the plain path and gets its gradient.
- A real vocabulary under MLX's memory limit: the chunked gradient's peak stays at the limit,
  where the plain log-softmax needs all the logits and more.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from mlxrl.mlx import logprobs

torch = pytest.importorskip("torch")


def _model(module, vocab: int, tied: bool, hidden: int = 32):
    args = module.ModelArgs(model_type=module.__name__.rsplit(".", 1)[-1], hidden_size=hidden,
                            num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=vocab,
                            rope_theta=10000, tie_word_embeddings=tied)
    mx.random.seed(3)
    model = module.Model(args)
    mx.eval(model.parameters())
    model.freeze()
    model.model.layers[0].mlp.down_proj.unfreeze()
    return model


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunk anything: 5 positions a chunk."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNKED_ABOVE", 0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_MIN_ROWS", 5)


@pytest.mark.parametrize("module, tied", [(qwen2, True), (llama, False)], ids=["tied", "separate"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_their_gradient_equal_torch(small_chunks, module, tied, temperature):
    model = _model(module, 97, tied)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 8, 32)).astype(np.float32)  # 24 positions: 4 chunks of 5, one of 4
    targets = rng.integers(0, 97, size=(3, 8))
    cotangent = rng.standard_normal((3, 8)).astype(np.float32)
    head = model.model.embed_tokens if tied else model.lm_head

    (logps,), (grad,) = mx.vjp(
        lambda h: logprobs.head_logps(model, h, mx.array(targets), temperature),
        [mx.array(hidden)], [mx.array(cotangent)])

    h = torch.tensor(hidden, requires_grad=True)
    theirs = torch.log_softmax(h @ torch.tensor(np.array(head.weight)).T / temperature, -1)
    theirs = theirs.gather(-1, torch.tensor(targets)[..., None])[..., 0]
    (theirs * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(np.array(logps), theirs.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(np.array(grad), h.grad.numpy(), atol=2e-5)


def test_a_quantized_head_gives_the_plain_values_and_gradient(monkeypatch):
    model = _model(qwen2, 96, tied=True, hidden=64)
    nn.quantize(model, group_size=32, bits=4)
    hidden = mx.random.normal((2, 12, 64), key=mx.random.key(1))
    targets = mx.array(np.random.default_rng(1).integers(0, 96, size=(2, 12)))
    cotangent = mx.random.normal((2, 12), key=mx.random.key(2))
    plain = mx.vjp(lambda h: logprobs.head_logps(model, h, targets), [hidden], [cotangent])
    monkeypatch.setattr(logprobs, "HEAD_CHUNKED_ABOVE", 0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_MIN_ROWS", 7)
    chunked = mx.vjp(lambda h: logprobs.head_logps(model, h, targets), [hidden], [cotangent])
    np.testing.assert_allclose(np.array(chunked[0][0]), np.array(plain[0][0]), atol=1e-5)
    np.testing.assert_allclose(np.array(chunked[1][0]), np.array(plain[1][0]), atol=1e-5)


def test_a_head_that_trains_gets_its_gradient_from_the_plain_path(small_chunks):
    model = _model(llama, 97, tied=False)
    model.lm_head.unfreeze()
    ids = mx.array(np.random.default_rng(2).integers(0, 97, size=(2, 13)))

    def loss(ids):
        return logprobs.per_token_logps(model, ids).sum()

    _, grads = nn.value_and_grad(model, loss)(ids)
    head_grad = dict(tree_flatten(grads))["lm_head.weight"]
    assert float(mx.abs(head_grad).sum()) > 0

    weight = torch.tensor(np.array(model.lm_head.weight), requires_grad=True)
    hidden = torch.tensor(np.array(logprobs.next_token_hidden(model, ids)))
    logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, torch.tensor(np.array(ids))[:, 1:, None])
    logps.sum().backward()
    np.testing.assert_allclose(np.array(head_grad), weight.grad.numpy(), atol=1e-4)


def test_under_a_memory_limit_the_gradient_needs_a_few_chunks_of_logits_not_all(monkeypatch):
    """512 positions of SmolLM2's 49,152-token vocabulary: 96 MB of float32 logits. Under MLX's
    memory limit at 32 MB (on a Mac, MLX sets it from the GPU's working set), chunks of 32
    positions (6 MB of logits) run one after the other and the peak stays at the limit
    (measured 32 MB); the plain log-softmax holds every position's logits (288 MB). At Qwen's
    151,936 tokens, 1,024 positions, chunks of 128 and a 256 MB limit: 299 MB against 1,781 MB."""
    vocab, positions = 49_152, 512
    model = _model(qwen2, vocab, tied=True)
    ids = mx.array(np.random.default_rng(3).integers(0, vocab, size=(2, positions // 2 + 1)))
    logits_mb = positions * vocab * 4 / 2**20
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_MIN_ROWS", 32)
    step = nn.value_and_grad(model, lambda ids: logprobs.per_token_logps(model, ids).sum())

    def peak_mb(chunked_above: int) -> tuple[float, float]:
        monkeypatch.setattr(logprobs, "HEAD_CHUNKED_ABOVE", chunked_above)
        mx.eval(step(ids))  # warm the allocator's cache of small buffers
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        loss, grads = step(ids)
        mx.eval(loss, grads)
        return (mx.get_peak_memory() - base) / 2**20, float(loss)

    limit = mx.set_memory_limit(32 * 2**20)
    try:
        chunked, chunked_loss = peak_mb(0)
        plain, plain_loss = peak_mb(10**15)
    finally:
        mx.set_memory_limit(limit)
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain > logits_mb, plain  # the plain log-softmax holds every position's logits
    assert chunked < logits_mb / 2, (chunked, plain)


@pytest.mark.parametrize("method", ["dpo", "sft", "grpo"])
def test_training_with_the_head_in_chunks_logs_the_plain_losses(tmp_path, monkeypatch, method):
    """The quickstart configs through `train` (the compiled step; DPO's and GRPO's rows share
    prompts and may pack; GRPO's log-probs take the temperature), the head's log-softmax in chunks
    of 5 positions or whole: the same losses and gradient norms, step after step."""
    import json

    from mlxrl.config import load_config
    from mlxrl.mlx.train import train

    def losses(chunked: bool, out) -> list[tuple[float, float]]:
        monkeypatch.setattr(logprobs, "HEAD_CHUNKED_ABOVE", 0 if chunked else 10**15)
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_BYTES", 1)
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_MIN_ROWS", 5)
        extra = []
        if method == "grpo":  # a reward that varies (the tiny model never counts letters right)
            rewards = tmp_path / "vowels.py"
            rewards.write_text(VOWELS)
            extra = ["--training.reward_functions", f"['{rewards}:vowels']",
                     "--training.grpo.temperature", "0.8"]
        cfg = load_config(f"configs/quickstart/{method}.yaml", [
            "--training.output_dir", str(out), "--training.max_steps", "3",
            "--training.logging_steps", "1", "--training.save_steps", "0", *extra])
        train(cfg, quiet=True)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [(r["loss"], r["grad_norm"]) for r in records if "grad_norm" in r]

    calls = []
    original = logprobs._chunked_logps
    monkeypatch.setattr(logprobs, "_chunked_logps", lambda *a: calls.append(a[1]) or original(*a))
    chunked = losses(True, tmp_path / "chunked")
    assert calls  # the chunked path ran
    plain = losses(False, tmp_path / "plain")
    assert len(plain) == 3
    assert min(norm for _, norm in plain) > 0  # gradients that say something
    np.testing.assert_allclose(chunked, plain, rtol=1e-5, atol=1e-6)


VOWELS = """
def vowels(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]
"""
