"""per_token_logps / sequence_logps against a NumPy log-softmax of a tiny mlx-lm model's logits."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen2

from mlxrl.mlx.logprobs import per_token_logps, sequence_logps, token_logps_from_logits

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        rope_theta=10000,
        tie_word_embeddings=True,
    )
    tiny = qwen2.Model(args)
    mx.eval(tiny.parameters())
    return tiny


@pytest.fixture(scope="module")
def input_ids():
    rng = np.random.default_rng(0)
    return mx.array(rng.integers(0, VOCAB, size=(3, 12)), dtype=mx.int32)


def numpy_next_token_logps(logits: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits[:, :-1, :].astype(np.float64) / temperature
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.take_along_axis(log_softmax, ids[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_matches_numpy_log_softmax_of_logits(model, input_ids, temperature):
    logits = np.array(model(input_ids))
    expected = numpy_next_token_logps(logits, np.array(input_ids), temperature)
    got = per_token_logps(model, input_ids, temperature)
    assert got.dtype == mx.float32
    assert got.shape == (3, 11)
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)


def test_temperature_divides_the_logits(input_ids):
    logits = mx.random.normal((2, 5, VOCAB), key=mx.random.key(1))
    targets = input_ids[:2, :5]
    tempered = token_logps_from_logits(logits, targets, temperature=0.5)
    doubled = token_logps_from_logits(logits * 2.0, targets)
    np.testing.assert_allclose(np.array(tempered), np.array(doubled), atol=1e-5)
    assert not np.allclose(np.array(tempered), np.array(token_logps_from_logits(logits, targets)))


def test_helper_takes_single_positions_for_the_sampler():
    logits = mx.random.normal((4, VOCAB), key=mx.random.key(2))
    targets = mx.array([0, 5, 96, 40])
    got = np.array(token_logps_from_logits(logits, targets))
    lg = np.array(logits, dtype=np.float64)
    log_softmax = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, log_softmax[np.arange(4), [0, 5, 96, 40]], atol=1e-5)


def test_right_padding_leaves_real_tokens_unchanged(model, input_ids):
    real_length = 7
    alone = input_ids[1:2, :real_length]
    padded = mx.concatenate(
        [input_ids[:1], mx.concatenate([alone, mx.zeros((1, 12 - real_length), mx.int32)], axis=1)]
    )
    from_batch = np.array(per_token_logps(model, padded))[1, : real_length - 1]
    by_itself = np.array(per_token_logps(model, alone))[0]
    np.testing.assert_allclose(from_batch, by_itself, atol=1e-5)


def test_sequence_logps_sums_only_masked_tokens(model, input_ids):
    mask = np.zeros((3, 12), dtype=np.int32)
    mask[0, 4:] = 1  # prompt of 4 tokens, completion to the end
    mask[1, 6:9] = 1  # completion followed by padding
    mask[2, 11] = 1  # a one-token completion
    token_logps = np.array(per_token_logps(model, input_ids), dtype=np.float64)
    expected = [token_logps[0, 3:].sum(), token_logps[1, 5:8].sum(), token_logps[2, 10]]
    got = sequence_logps(model, input_ids, mx.array(mask))
    assert got.shape == (3,)
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)
