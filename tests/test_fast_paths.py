"""The speed paths of the MLX step against references mlxrl did not write.

- Log-probs scored from a start position (the LM head skips prompt positions), with the head's
  log-softmax whole or in chunks: transformers' log-softmax of its own logits, on qwen2 (tied
  head), llama (separate head) and falcon_h1 (the fallback that slices full logits).
- DPO with the trimmed completion mask of `pair_arrays`: the same loss and gradients as the
  whole-width computation.
- The compiled update (clip, AdamW, schedule) against torch's clip_grad_norm_ + AdamW +
  transformers' get_scheduler on the same gradients.
- mlxrl's LoRA layer (the adapter's product added by the matmul, `mx.addmm`): PEFT's LoRA
  output and gradients; mlx-lm's LoRALinear (dtype included) in half precision.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxrl.config import ModelParams, load_config
from mlxrl.mlx import logprobs
from mlxrl.mlx import model as mlx_model
from mlxrl.mlx.dpo import pair_arrays, policy_loss, reference_logps
from mlxrl.mlx.logprobs import per_token_logps
from mlxrl.mlx.trainer import StepBatch, Trainer
from mlxrl.testing import tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(0).integers(3, 700, size=(3, 24))


@pytest.mark.parametrize("arch, overrides", [("qwen2", {}), ("llama", {"tie_word_embeddings": False}),
                                             ("falcon_h1", {})])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_log_probs_from_a_start_position_equal_transformers(monkeypatch, arch, overrides, chunked):
    if chunked:  # the head's log-softmax in chunks of 5 positions (logprobs.head_logps)
        monkeypatch.setattr(logprobs, "HEAD_CHUNKED_ABOVE", 0)
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_MIN_ROWS", 5)
    folder = tiny_model(arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor(IDS)).logits.double()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(IDS)[:, 1:, None])[..., 0]
    model = mlx_model.load(ModelParams(model_name=str(folder))).model
    for start in (0, 8, 16):
        got = np.array(per_token_logps(model, mx.array(IDS), start=start))
        assert got.shape == (3, 23 - start)
        assert np.abs(got - expected[:, start:].numpy()).max() < 5e-5, (arch, start)


def _dpo_setup(tmp_path, *options):
    cfg = load_config("configs/quickstart/dpo.yaml", ["--training.output_dir", str(tmp_path), *options])
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    for _, layer in tree_flatten(loaded.model.trainable_parameters()):  # a policy off the reference
        layer += 0.05 * mx.random.normal(layer.shape, key=mx.random.key(1))
    from mlxrl.data.loading import load_split
    from mlxrl.mlx.dpo import encode_pairs

    settings = cfg.dpo_settings()
    pairs = encode_pairs(load_split(cfg.data.train), loaded.tokenizer, settings.max_length)
    return loaded.model, settings, pairs[:4]


def test_trimmed_dpo_mask_gives_the_whole_width_loss_and_gradients(tmp_path):
    model, settings, pairs = _dpo_setup(tmp_path)
    ids, mask, _ = pair_arrays(pairs)
    assert mask.shape[1] < ids.shape[1]  # prompt columns were dropped
    whole = mx.concatenate([mx.zeros((mask.shape[0], ids.shape[1] - mask.shape[1]), mask.dtype), mask], 1)
    ref = reference_logps(model, ids, mask)
    assert np.allclose(np.array(ref), np.array(reference_logps(model, ids, whole)), atol=1e-5)

    def loss_of(m):
        return lambda: policy_loss(model, settings, ids, m, ref)

    results = []
    for m in (mask, whole):
        (loss, metrics), grads = nn.value_and_grad(model, loss_of(m))()
        results.append((float(loss), {k: float(v) for k, v in metrics.items()},
                        dict(tree_flatten(grads))))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-6 and abs(metrics_a["rewards/margins"]) > 1e-3
    for k in metrics_a:
        assert abs(metrics_a[k] - metrics_b[k]) < 1e-4 * max(1.0, abs(metrics_b[k])), k
    for k, g in grads_a.items():
        assert np.abs(np.array(g) - np.array(grads_b[k])).max() < 1e-6, k


@pytest.mark.parametrize("options", ["{loss_type: sigmoid}", "{loss_type: [sigmoid, sft], ld_alpha: 0.5}",
                                     "{loss_type: ipo, use_weighting: true}"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_prompt_rows_give_the_plain_loss_and_gradients(tmp_path, monkeypatch, options, packed):
    """DPO's chosen and rejected rows with their prompt run once (mlx/shared_prefix.py): the loss,
    metrics and gradients of the plain rows, with the per-token options that read every token;
    the suffixes right-padded, or packed (only their real tokens through the linear layers)."""
    from mlxrl.mlx import shared_prefix
    from mlxrl.mlx.shared_prefix import PackedSuffixKV, SharedPrefixKV

    if not packed:
        monkeypatch.setattr(shared_prefix, "worth_packing", lambda *a: False)
    model, settings, pairs = _dpo_setup(tmp_path, "--training.trainer_kwargs", options)
    plain, shared = pair_arrays(pairs), pair_arrays(pairs, model)
    prefix, pad, row_prefix, suffix = shared[0][:4]
    assert prefix.shape[0] == len(pairs) and suffix.shape[0] == 2 * len(pairs) == plain[0].shape[0]
    assert row_prefix.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and shared[2] == plain[2]
    assert prefix.size + suffix.size < 0.9 * plain[0].size  # the point of it
    assert len(shared[0]) == (10 if packed else 4)
    second = 2 * len(pairs)  # the rows' suffixes, or the packed tokens
    if packed:
        second = shared[0][4].shape[0]
        assert second < 0.95 * suffix.shape[0] * (suffix.shape[1] - 1)  # fewer tokens than columns
    calls = []
    cls = PackedSuffixKV if packed else SharedPrefixKV
    original = cls.update_and_fetch
    monkeypatch.setattr(cls, "update_and_fetch", lambda self, k, v: calls.append(k.shape[0]) or original(self, k, v))
    results = []
    for ids, mask, _ in (plain, shared):
        ref = reference_logps(model, ids, mask, ld_alpha=settings.ld_alpha)
        (loss, metrics), grads = nn.value_and_grad(
            model, lambda i, m, r: policy_loss(model, settings, i, m, r))(ids, mask, ref)
        results.append((ref, float(loss), {k: float(v) for k, v in metrics.items()},
                        dict(tree_flatten(grads))))
    assert calls and set(calls) == {len(pairs), second}  # prompts once, then every row
    (ref_a, loss_a, metrics_a, grads_a), (ref_b, loss_b, metrics_b, grads_b) = results
    assert np.abs(np.array(ref_a) - np.array(ref_b)).max() < 1e-4 * np.abs(np.array(ref_a)).max()
    assert abs(loss_a - loss_b) < 1e-5 and abs(metrics_a["rewards/margins"]) > 1e-3
    for k in metrics_a:
        assert abs(metrics_a[k] - metrics_b[k]) < 1e-4 * max(1.0, abs(metrics_b[k])), k
    scale = max(np.abs(np.array(g)).max() for g in grads_a.values())
    for k, g in grads_a.items():
        assert np.abs(np.array(g) - np.array(grads_b[k])).max() < 1e-5 * scale, k


def test_suffixes_pack_only_for_adapters_under_mlxrl_attention_when_it_pays(tmp_path):
    """`worth_packing`: uneven suffixes of a LoRA model pack; not when a base weight trains (its
    gradient over single-token rows would be one outer product a token), not when a layer's
    attention is mlx-lm's own (it cannot take packed queries), not when the rows are even."""
    from mlxrl.mlx.shared_prefix import worth_packing

    model, _, _ = _dpo_setup(tmp_path)
    uneven, even = [[5] * 30, [6] * 12, [7] * 20, [8] * 9], [[5] * 30] * 4
    assert worth_packing(model, uneven, 32)
    assert not worth_packing(model, even, 32)
    model.layers[0].mlp.gate_proj.linear.unfreeze()
    assert not worth_packing(model, uneven, 32)
    model.layers[0].mlp.gate_proj.linear.freeze()
    assert worth_packing(model, uneven, 32)
    attention = model.layers[1].self_attn
    attention.__class__ = type(attention).__mro__[1]  # mlx-lm's class, as on a GPU
    assert not worth_packing(model, uneven, 32)


def test_packed_rows_refuse_attention_sinks():
    """mlxrl's attention hands packed rows to their cache's `attend`; with attention sinks it
    stops instead of running the row attention on packed queries."""
    from types import SimpleNamespace

    from mlxrl.mlx.cpu_ops import _attention_with_fallback

    attention = _attention_with_fallback(lambda *a, **k: pytest.fail("the row attention ran"))
    q = mx.zeros((4, 2, 1, 8))
    attended = attention(q, q, q, SimpleNamespace(attend=lambda *a: "attended"), 1.0, None)
    assert attended == "attended"
    with pytest.raises(NotImplementedError, match="sinks"):
        attention(q, q, q, SimpleNamespace(attend=lambda *a: "attended"), 1.0, None, sinks=mx.zeros(2))


class _Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.array([0.5, -1.0, 2.0, 0.25])


class _GivenGradients:
    """loss = w . g_step: the gradient of each step is g_step."""
    name, epoch, examples_per_step, dataset_size = "test", 0.0, 1, 1

    def __init__(self, model, grads):
        self.model, self.grads, self.step = model, grads, 0

    def loss(self, g):
        return (self.model.w * g).sum(), {}

    def next_step(self):
        self.step += 1
        return StepBatch([(mx.array(self.grads[self.step - 1]),)])

    def state(self):
        return {}


def test_compiled_update_equals_torch_adamw_with_clipping_and_schedule(tmp_path):
    steps = 5
    grads = np.random.default_rng(3).normal(0, 2.0, size=(steps, 4)).astype(np.float32)
    training = {"optimizer": "adamw_torch", "learning_rate": 0.1, "max_grad_norm": 1.0,
                "weight_decay": 0.05, "lr_scheduler_type": "linear", "warmup_steps": 2,
                "max_steps": steps, "logging_steps": 1, "save_steps": 0,
                "save_final_model": False, "output_dir": str(tmp_path)}
    cfg = load_config(None, [f"training.{k}={json.dumps(v)}" for k, v in training.items()])
    model = _Vector()
    start = np.array(model.w)
    loaded = type("Loaded", (), {"model": model})()
    Trainer(cfg, loaded, _GivenGradients(model, grads), {}, steps, quiet=True).run()

    w = torch.nn.Parameter(torch.tensor(start))
    t = cfg.training
    opt = torch.optim.AdamW([w], lr=0.1, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                            weight_decay=0.05)
    schedule = transformers.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=steps)
    for g in grads:
        w.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()
        schedule.step()
    # float32 rounding of two AdamW implementations: ~2e-6 on steps of ~0.1
    assert np.abs(np.array(model.w) - w.detach().numpy()).max() < 1e-5
    assert np.abs(np.array(model.w) - start).max() > 0.05  # it moved


def test_lora_layer_gives_peft_outputs_and_gradients(monkeypatch):
    from mlx_lm.tuner.lora import LoRALinear
    from peft import LoraConfig, get_peft_model

    rng = np.random.default_rng(4)
    x, w, bias = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 12), (7, 12), (7,)))
    a, b = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((12, 4), (4, 7)))
    cotangent = rng.standard_normal((2, 5, 7)).astype(np.float32)
    base = nn.Linear(12, 7)
    base.update({"weight": mx.array(w), "bias": mx.array(bias)})
    layer = LoRALinear.from_base(base, r=4, scale=2.0)
    layer.update({"lora_a": mx.array(a), "lora_b": mx.array(b)})
    layer.__class__ = mlx_model._switchable(LoRALinear)

    fused, addmm = [], mx.addmm
    monkeypatch.setattr(mx, "addmm", lambda *a, **k: fused.append(1) or addmm(*a, **k))

    def loss(params, x):
        layer.update(params)
        return (layer(x) * mx.array(cotangent)).sum(), layer(x)

    (_, out), (grads, grad_x) = mx.value_and_grad(loss, argnums=(0, 1))(
        {"lora_a": layer.lora_a, "lora_b": layer.lora_b}, mx.array(x))

    module = torch.nn.Sequential()
    module.add_module("lin", torch.nn.Linear(12, 7))
    module.lin.weight.data, module.lin.bias.data = torch.tensor(w), torch.tensor(bias)
    peft = get_peft_model(module, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    lin = peft.base_model.model.lin
    lin.lora_A["default"].weight.data = torch.tensor(a.T.copy())
    lin.lora_B["default"].weight.data = torch.tensor(b.T.copy())
    tx = torch.tensor(x, requires_grad=True)
    theirs = peft(tx)
    (theirs * torch.tensor(cotangent)).sum().backward()
    assert fused  # float32: the adapter's product added by the matmul
    np.testing.assert_allclose(np.array(out), theirs.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(grads["lora_a"]), lin.lora_A["default"].weight.grad.numpy().T, atol=1e-4)
    np.testing.assert_allclose(np.array(grads["lora_b"]), lin.lora_B["default"].weight.grad.numpy().T, atol=1e-4)
    np.testing.assert_allclose(np.array(grad_x), tx.grad.numpy(), atol=1e-4)

    half = nn.Linear(12, 7)
    half.update({"weight": mx.array(w, dtype=mx.bfloat16), "bias": mx.array(bias, dtype=mx.bfloat16)})
    plain = LoRALinear.from_base(half, r=4, scale=2.0)
    plain.update({"lora_a": mx.array(a), "lora_b": mx.array(b)})
    expected = plain(mx.array(x, dtype=mx.bfloat16))
    plain.__class__ = mlx_model._switchable(LoRALinear)
    ours = plain(mx.array(x, dtype=mx.bfloat16))
    assert ours.dtype == expected.dtype == mx.bfloat16
    assert mx.array_equal(ours, expected).item()
