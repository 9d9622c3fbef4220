"""The CPU speed-ups change speed, not results: MLX's JIT kernels built with the vector flags
(mlxrl/_jit.py) give bit-identical outputs; the fusable SwiGLU (mlxrl/mlx/cpu_ops.py) has
mlx-lm's forward and the gradients of its autodiff; the fused causal attention (training) and
the fused masked attention (the sampler's decode) match `mx.fast.scaled_dot_product_attention`."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlxrl import _jit
from mlxrl.mlx.cpu_ops import causal_attention, swiglu, use_cpu_ops

ROOT = Path(__file__).resolve().parents[1]
HAS_VECTOR_UNITS = _jit.compiler_flags(_jit.cpu_flags()) is not None and platform.machine() == "x86_64"

KERNELS = r'''
import sys
from mlxrl.runtime import mlx_runtime
from mlxrl import _jit

with mlx_runtime():
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)
    x, y = mx.random.normal((3, 1000)) * 4, mx.random.normal((3, 1000))
    x = mx.concatenate([x, mx.array([[0.0, -0.0, 88.5, -88.5, 1e-30, float("inf")] * 166 + [1.0] * 4])], 0)
    y = mx.concatenate([y, mx.ones((1, 1000))], 0)
    fused = {
        "silu*up": lambda a, b: nn.silu(a) * b,
        "sigmoid": lambda a, b: mx.sigmoid(a) + b,
        "exp": lambda a, b: mx.exp(a - b) * 2,
        "gelu": lambda a, b: nn.gelu(a) * b,
        "tanh": lambda a, b: mx.tanh(a) - b,
        "log1p": lambda a, b: mx.log1p(mx.abs(a)) * b,
        "softplus": lambda a, b: nn.softplus(a) + b,
    }
    for name, fn in fused.items():
        with_jit = mx.compile(fn)(x, y)
        mx.disable_compile()
        plain = fn(x, y)
        mx.enable_compile()
        assert mx.array_equal(with_jit, plain, equal_nan=True).item(), name
print("STATUS", _jit.status)
'''


def test_jit_kernels_with_vector_flags_are_bit_identical_and_in_mlxrls_folder(tmp_path):
    """Every kernel is built now (a fresh cache); all land in mlxrl's kernel folder, none in
    MLX's own ($TMPDIR/mlx), and each carries the marker of the flags (this machine has them)."""
    env = dict(os.environ, MLXRL_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    env.pop("MLXRL_NO_JIT_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", KERNELS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    status = proc.stdout.split("STATUS ", 1)[1]
    assert not list((tmp_path / "tmp").rglob("*.so"))  # MLX's own kernel folder: untouched
    libs = list((tmp_path / "cache" / "jit").rglob("kernels/mlx/*/cpu/lib*.so"))
    assert libs
    if HAS_VECTOR_UNITS:  # this machine: the flags are on and every kernel carries their marker
        assert status.startswith("on (-mavx2"), status
        flags = _jit.compiler_flags(_jit.cpu_flags())
        assert all(_jit.marker(flags) in lib.read_bytes() for lib in libs)


def test_wrapper_adds_flags_only_for_its_own_kernel_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXRL_CACHE", str(tmp_path / "cache"))
    flags = "-mavx2 -mfma"
    folder = _jit.install_wrapper("/usr/bin/g++", flags)
    ours = folder / "kernels" / "mlx" / "0.0" / "cpu"
    mlx_own = tmp_path / "mlx" / "0.0" / "cpu"  # another process's MLX kernel folder
    for kernel_dir in (ours, mlx_own):
        kernel_dir.mkdir(parents=True)

    def defines(source: Path, wrapper=folder) -> str:
        source.write_text("int x;\n")
        return subprocess.run([str(wrapper / "g++"), "-dM", "-E", str(source)], capture_output=True,
                              text=True, check=True).stdout

    assert "__AVX2__" in defines(ours / "k.cpp")
    assert "__AVX2__" not in defines(mlx_own / "k.cpp")  # not mlxrl's build: g++ as it is
    assert "__AVX2__" not in defines(tmp_path / "other.cpp")
    # a compiler that rejects the flags still builds the kernel, without them
    other = _jit.install_wrapper("/usr/bin/g++", "-mavx2 -mno-such-flag")
    (other / "kernels" / "mlx" / "0.0" / "cpu").mkdir(parents=True)
    assert "__AVX2__" not in defines(other / "kernels" / "mlx" / "0.0" / "cpu" / "k2.cpp", other)


SCOPED = r'''
import json, os
from mlxrl import _jit
before = dict(os.environ)
with _jit.compile_environment():
    inside = dict(os.environ)
    with _jit.compile_environment():
        nested = dict(os.environ)
    after_nested = dict(os.environ)
print(json.dumps([before, inside, nested, after_nested, dict(os.environ)]))
'''


def test_compile_environment_is_scoped_and_reentrant(tmp_path):
    env = dict(os.environ, MLXRL_CACHE=str(tmp_path), TMPDIR="/somewhere/else", PATH="/usr/bin:/bin")
    env.pop("MLXRL_NO_JIT_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCOPED], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    before, inside, nested, after_nested, after = json.loads(proc.stdout)
    assert nested == inside == after_nested and after == before
    if HAS_VECTOR_UNITS:  # this machine: the wrapper is first on PATH, TMPDIR is mlxrl's folder
        assert inside["TMPDIR"].startswith(str(tmp_path / "jit")) and inside["TMPDIR"].endswith("kernels")
        assert inside["PATH"].endswith(os.pathsep + before["PATH"])
        assert (Path(inside["PATH"].split(os.pathsep)[0]) / "g++").is_file()
        assert {k for k in inside if inside[k] != before.get(k)} == {"PATH", "TMPDIR"}


def test_fusable_swiglu_matches_mlx_lm():
    mx.random.seed(1)
    gate, x = mx.random.normal((2, 5, 48)) * 3, mx.random.normal((2, 5, 48))
    weights = mx.random.normal((2, 5, 48))
    assert mx.array_equal(swiglu(gate, x), mlx_lm_swiglu(gate, x)).item()

    def loss(fn):
        return lambda g, v: mx.sum(fn(g, v) * weights)

    reference = mx.grad(loss(lambda g, v: nn.silu(g) * v), argnums=(0, 1))(gate, x)
    for grads in (mx.grad(loss(swiglu), argnums=(0, 1))(gate, x),
                  mx.compile(mx.grad(loss(swiglu), argnums=(0, 1)))(gate, x)):
        for ours, theirs in zip(grads, reference):
            np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-6)


def test_causal_attention_matches_fast_sdpa_and_its_gradients():
    mx.random.seed(2)
    q, k, v = mx.random.normal((2, 6, 24, 16)), mx.random.normal((2, 2, 24, 16)), mx.random.normal((2, 2, 24, 16))
    weights = mx.random.normal((2, 6, 24, 16))

    def fast(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")

    def ours(q, k, v):
        return causal_attention(q, k, v, 0.25)

    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(fast(q, k, v)), atol=1e-6)
    grads = [mx.compile(mx.grad(lambda *a, f=f: mx.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
             for f in (ours, fast)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)


def test_decode_attention_matches_fast_sdpa_and_serves_the_samplers_decode(monkeypatch):
    """A decode step's attention over a left-padded `DecodeKVCache` (grouped heads, rows with
    different padding) equals MLX's SDPA under the cache's own mask; mlxrl's model, sampling on
    the CPU, takes it at every layer of the traced decode step."""
    from mlxrl.config import ModelParams
    from mlxrl.mlx import cpu_ops, sampling
    from mlxrl.mlx.cache_utils import DecodeKVCache
    from mlxrl.mlx.model import load

    mx.random.seed(3)
    q, k, v = mx.random.normal((3, 6, 1, 16)), mx.random.normal((3, 2, 32, 16)), mx.random.normal((3, 2, 32, 16))
    cache = DecodeKVCache(k, v, mx.array([0, 5, 11]), mx.array(20), 32)
    mask = cache.make_mask(1)
    fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    attention = cpu_ops._attention_with_fallback(lambda *a, **kw: pytest.fail("not fused"))
    np.testing.assert_allclose(np.array(attention(q, k, v, cache, 0.25, mask)), np.array(fast), atol=1e-6)

    model = load(ModelParams(model_name="tiny://qwen2")).model
    shapes = []
    fused = cpu_ops.masked_attention
    monkeypatch.setattr(cpu_ops, "masked_attention", lambda q, *a: shapes.append(q.shape) or fused(q, *a))
    sampling._TRACES.clear()
    sampling.sample(model, [[1, 5, 9, 2], [1, 7]], num_generations=2, max_tokens=3, eos_token_ids=[])
    assert shapes and all(s[0] == 4 and s[2] == 1 for s in shapes)
    assert len(shapes) == len(model.layers)  # one trace: every layer of the decode step


def test_cpu_ops_apply_to_the_model_mlxrl_loaded_and_no_other(monkeypatch):
    """mlxrl's model calls the fused ops; another model of the same architecture in the same
    process (mlx-lm's own load), and mlx-lm's module itself, are untouched; same logits."""
    import mlx_lm
    from mlx_lm.models import activations, base, qwen2

    from mlxrl.config import ModelParams
    from mlxrl.mlx import cpu_ops
    from mlxrl.mlx.model import load
    from mlxrl.tiny_models import tiny_model

    loaded = load(ModelParams(model_name="tiny://qwen2"))
    other = mlx_lm.load(str(tiny_model("qwen2")))[0]
    assert qwen2.swiglu is activations.swiglu
    assert qwen2.scaled_dot_product_attention is base.scaled_dot_product_attention
    calls = {"attention": 0, "swiglu": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cpu_ops, "causal_attention", counted("attention", cpu_ops.causal_attention))
    namespace = type(loaded.model.layers[0].mlp).__call__.__globals__  # this model's classes' own
    assert namespace["swiglu"] is cpu_ops.swiglu
    monkeypatch.setitem(namespace, "swiglu", counted("swiglu", cpu_ops.swiglu))
    ids = mx.array([[5, 9, 2, 7, 1, 3, 8, 4] * 3])
    theirs = other(ids)
    mx.eval(theirs)
    assert calls == {"attention": 0, "swiglu": 0}
    ours = loaded.model(ids)
    n_layers = len(loaded.model.layers)
    assert calls == {"attention": n_layers, "swiglu": n_layers}
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)
    assert type(other.layers[0].mlp) is qwen2.MLP and type(other.layers[0].self_attn) is qwen2.Attention
    assert isinstance(loaded.model.layers[0].mlp, qwen2.MLP)
    assert use_cpu_ops(nn.Sequential(nn.ReLU())) is False  # nothing in it to change


def test_gradient_checkpointing_is_per_model_and_keeps_the_gradients():
    """`enable_gradient_checkpointing` on MLX: the same loss and LoRA gradients as without, and
    only that model's blocks are checkpointed (mlx-lm's own grad_checkpoint patches the class)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    from mlxrl.config import ModelParams, PeftParams
    from mlxrl.mlx.logprobs import per_token_logps
    from mlxrl.mlx.model import GradientCheckpoint, load

    def loss_and_grads(checkpointing):
        mx.random.seed(3)
        model = load(ModelParams(model_name="tiny://qwen2"), PeftParams(), for_training=True,
                     gradient_checkpointing=checkpointing).model
        ids = mx.array([[5, 9, 2, 7, 1, 3, 8, 4, 6, 10]])
        loss_fn = nn.value_and_grad(model, lambda i: -per_token_logps(model, i).sum())
        loss, grads = loss_fn(ids)
        return model, loss, grads

    plain, loss, grads = loss_and_grads(False)
    checkpointed, loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert all(isinstance(block, GradientCheckpoint) for block in checkpointed.layers)
    assert not any(isinstance(block, GradientCheckpoint) for block in plain.layers)
    assert qwen2.TransformerBlock.__call__ is type(plain.layers[0]).__call__
    np.testing.assert_allclose(loss_ckpt.item(), loss.item(), rtol=1e-6)
    for (name, g), (_, g_ckpt) in zip(tree_flatten(grads), tree_flatten(grads_ckpt)):
        np.testing.assert_allclose(np.array(g_ckpt), np.array(g), atol=1e-6, err_msg=name)
