"""Where the time of one mlxrl DPO step goes (the `bench/dpo.py` workload: the 25M-parameter
Qwen2-architecture model, fp32, LoRA r 8 on all linears, 4 pairs = 8 rows of 128 tokens).

1. The step's phases, each ended by an `mx.eval` barrier: the reference forward (adapters off,
   eager, run by `DPOMethod.next_step`), the policy forward + backward (the Trainer's compiled
   grad step), grad-norm clipping + AdamW, and the whole `Trainer.train_step`.
2. Inside one forward (8 x 128 tokens): the linear layers alone (the same matmuls, LoRA included,
   timed on their own), attention (`mx.fast.scaled_dot_product_attention`, which the CPU runs as
   unfused ops with a softmax), SwiGLU (`silu(gate) * up`), and the vocabulary log-softmax.
   SiLU's share is also measured by ablation: the forward with `silu(gate) * up` replaced by
   `gate * up`. exp throughput against a multiply shows why: MLX's Linux CPU build evaluates
   exp/sigmoid one element at a time through library calls.
3. SwiGLU on the whole step: mlx-lm's (`nn.silu(gate) * up`, whose sigmoid a compiled forward +
   backward computes once with MLX's prebuilt one-element-at-a-time kernel), mlxrl's
   (`mlxrl/mlx/cpu_ops.py`: the backward recomputes the sigmoid inside its fused JIT kernel), and
   the ablation `gate * up` (a different model, only to price SiLU). With `MLXRL_NO_JIT_FLAGS=1`
   the JIT kernels are built without vector flags, as plain MLX builds them.
4. Padding: the compiled forward + backward of the same 4 pairs padded to their longest row and
   to multiples of 8, 16 and 32 (mlxrl's bucket), with the one-off cost of tracing a new width.

Timings are medians over --repeats. With `--threads 1` (the default) the figure is CPU time (user +
sys, all threads), wall time beside: on a shared CPU the CPU time of a single-threaded run is the
stable measure. With more threads it is wall time (idle OpenBLAS threads spin, so CPU time is
about threads x wall); use that on a quiet machine. Compare rows of one run.

    python bench/profile_dpo.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as common


def _parser():
    return common.profile_parser(__doc__.split("\n")[0], repeats=7)


if __name__ == "__main__":  # OpenBLAS reads its thread count when it loads: before mlx.core
    os.environ.update(common.thread_env(_parser().parse_args().threads))
common.setup_mlx()
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import mlx_lm.models.qwen2 as qwen2  # noqa: E402

from mlxrl import _jit  # noqa: E402
from mlxrl.config import load_config  # noqa: E402
from mlxrl.data.loading import load_split  # noqa: E402
from mlxrl.mlx import cpu_ops  # noqa: E402
from mlxrl.mlx import model as mlx_model  # noqa: E402
from mlxrl.mlx.dpo import DPOMethod, pair_arrays, reference_logps  # noqa: E402
from mlxrl.mlx.logprobs import sequence_logps, token_logps_from_logits  # noqa: E402
from mlxrl.mlx.trainer import Trainer  # noqa: E402

ORIGINAL_SWIGLU = qwen2.swiglu  # mlx-lm's (mlxrl's loaded model reads cpu_ops.swiglu instead)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (primary, other) milliseconds of `fn()` after one warm-up call: (CPU, wall) with one
    thread, where CPU time (user + sys, all threads) moves far less than wall time on a shared
    machine; (wall, CPU) with more threads, where idle OpenBLAS threads spin and CPU time is about
    threads x wall whatever runs."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    cpu_ms, wall_ms = 1000 * statistics.median(cpu), 1000 * statistics.median(wall)
    return (cpu_ms, wall_ms) if _single_thread() else (wall_ms, cpu_ms)


def _single_thread() -> bool:
    return os.environ.get("OPENBLAS_NUM_THREADS") == "1"


def unit() -> str:
    return "CPU-ms" if _single_thread() else "ms"


def row(name: str, ms: tuple[float, float], total: float | None = None) -> None:
    share = f"{100 * ms[0] / total:5.1f}%" if total else "      "
    other = "wall" if _single_thread() else "CPU"
    print(f"  {name:46s} {ms[0]:8.1f} {unit():6s} {share}   ({other} {ms[1]:7.1f} ms)")


def no_silu_swiglu(gate, x):
    return gate * x


# ----------------------------------------------------------------------------- setup


def build(workdir: Path):
    rows = common.long_preference_rows(64)
    data = common.write_jsonl(rows, workdir / "pairs.jsonl")
    config = workdir / "dpo.yaml"
    config.write_text(f"""
model: {{model_name: "{common.model_path()}", model_max_length: 128, torch_dtype_str: float32}}
data: {{train: {{datasets: [{{dataset_name: "{data}"}}]}}}}
training: {{trainer_type: TRL_DPO, max_steps: 4, per_device_train_batch_size: 4,
  learning_rate: 1e-4, lr_scheduler_type: constant, logging_steps: 1000000, save_steps: 0,
  save_final_model: false, use_peft: true, output_dir: "{workdir / 'out'}"}}
peft: {{lora_r: {common.LORA_R}, lora_alpha: {common.LORA_ALPHA}}}
""")
    # max_steps 4 x 4 pairs < 64 pairs: the run does not visit every pair, so DPOMethod does not
    # precompute the reference and each step runs its reference forward (the bench's case)
    cfg = load_config(str(config), [])
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    method = DPOMethod(cfg, loaded, load_split(cfg.data.train))
    # a fixed batch of 4 pairs whose longest row buckets to 128
    order = sorted(range(len(method.pairs)), key=lambda i: -len(method.pairs[i][0]))
    ids, mask, _ = pair_arrays([method.pairs[i] for i in order[:4]])
    return cfg, loaded, method, ids, mask


def make_trainer(cfg, loaded, method) -> Trainer:
    return Trainer(cfg, loaded, method, mlx_model.adapter_config_for(loaded), 1000, quiet=True)


def phases(cfg, loaded, method, ids, mask, repeats: int) -> dict[str, tuple[float, float]]:
    model = loaded.model
    trainer = make_trainer(cfg, loaded, method)
    ref = reference_logps(model, ids, mask)

    def grad_step():
        loss, metrics, grads = trainer._grad_step(ids, mask, ref)
        mx.eval(loss, metrics, grads)
        return grads

    grads = grad_step()

    def update():
        clipped, norm = optim.clip_grad_norm(grads, cfg.training.max_grad_norm)
        trainer.optimizer.update(model, clipped)
        mx.eval(model.trainable_parameters(), trainer.optimizer.state, norm)

    def whole_step():  # what Trainer.train_step does, on the fixed batch
        reference = reference_logps(model, ids, mask)
        loss, metrics, g = trainer._grad_step(ids, mask, reference)
        mx.eval(loss, metrics, g)
        clipped, norm = optim.clip_grad_norm(g, cfg.training.max_grad_norm)
        trainer.optimizer.update(model, clipped)
        mx.eval(model.trainable_parameters(), trainer.optimizer.state, norm)
        float(loss)

    with mlx_model.adapters_disabled(model):  # traced with the adapters off; called so only
        compiled_reference = mx.compile(lambda i, m: sequence_logps(model, i, m), inputs=model.state)

        def reference_compiled():
            with mlx_model.adapters_disabled(model):
                mx.eval(compiled_reference(ids, mask))

        compiled_ms = timed(reference_compiled, repeats)
    return {
        "reference forward (adapters off, eager)": timed(lambda: reference_logps(model, ids, mask), repeats),
        "  same, compiled (candidate)": compiled_ms,
        "policy forward + backward (compiled)": timed(grad_step, repeats),
        "grad-norm clip + AdamW update": timed(update, repeats),
        "whole step (fixed batch)": timed(whole_step, repeats),
        "Trainer.train_step (its own batches)": timed(trainer.train_step, repeats),
    }


def forward_parts(loaded, ids, repeats: int) -> dict[str, tuple[float, float]]:
    model = loaded.model
    args = model.args
    B, L = ids.shape
    H, D = args.hidden_size, args.hidden_size // args.num_attention_heads
    n_layers, heads, kv_heads = args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads
    x = mx.random.normal((B, L, H))
    layer = model.model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                   layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj]
    hidden = mx.random.normal((B, L, args.intermediate_size))
    q = mx.random.normal((B, heads, L, D))
    kv = mx.random.normal((B, kv_heads, L, D))
    logits = mx.random.normal((B, L - 1, args.vocab_size))
    targets = ids[:, 1:]
    gate, up = mx.random.normal((B, L, args.intermediate_size)), hidden
    mx.eval(x, hidden, q, kv, logits, gate, up)

    def linears():
        outs = [p(x) for p in projections] + [layer.mlp.down_proj(hidden)]
        mx.eval(outs)

    def attention():
        mx.eval(mx.fast.scaled_dot_product_attention(q, kv, kv, scale=D ** -0.5, mask="causal"))

    def swiglu():
        mx.eval(ORIGINAL_SWIGLU(gate, up))

    def head_and_logps():
        mx.eval(token_logps_from_logits(model.model.embed_tokens.as_linear(x[:, :-1]), targets))

    lm_ids = ids
    forward = mx.compile(lambda i: model(i))
    parts = {
        "whole forward (compiled, logits)": timed(lambda: mx.eval(forward(lm_ids)), repeats),
        f"linear layers incl. LoRA ({n_layers} layers)": tuple(
            n_layers * t for t in timed(linears, repeats)),
        f"attention, SDPA causal ({n_layers} layers)": tuple(
            n_layers * t for t in timed(attention, repeats)),
        f"SwiGLU silu(gate) * up ({n_layers} layers)": tuple(
            n_layers * t for t in timed(swiglu, repeats)),
        "tied LM head + log-softmax gather": timed(head_and_logps, repeats),
    }
    n = gate.size
    parts["  exp on one SwiGLU-sized array"] = timed(lambda: mx.eval(mx.exp(gate)), repeats)
    parts["  multiply on the same array"] = timed(lambda: mx.eval(gate * up), repeats)
    parts["  (elements per array)"] = (float(n), float(n))
    return parts


def ablation(cfg, loaded, method, ids, mask, repeats: int, label: str, swiglu) -> dict:
    """Forward and whole-step times with `swiglu` in this model's Qwen2 MLP (the namespace its
    methods read: `cpu_ops.use_cpu_ops` gives the model's classes their own)."""
    model = loaded.model
    namespace = type(model.layers[0].mlp).__call__.__globals__
    previous = namespace["swiglu"]
    namespace["swiglu"] = swiglu
    try:
        trainer = make_trainer(cfg, loaded, method)  # a fresh compiled grad step traces the patch
        forward = mx.compile(lambda i, m: sequence_logps(model, i, m))

        def step():
            reference = reference_logps(model, ids, mask)
            loss, metrics, g = trainer._grad_step(ids, mask, reference)
            mx.eval(loss, metrics, g)
            return float(loss)

        loss = step()
        return {
            "label": label,
            "forward": timed(lambda: mx.eval(forward(ids, mask)), repeats),
            "ref + fwd + bwd": timed(step, repeats),
            "loss": loss,
        }
    finally:
        namespace["swiglu"] = previous


def padding(cfg, loaded, method, repeats: int) -> list[tuple[int, float, float]]:
    """(width, first call, later calls) of a fresh Trainer's compiled grad step on the same 4
    pairs padded to each width: what a bucket costs per step, and what a new width costs once
    (tracing + compiling; the fused kernels are cached on disk, so this is a warm-cache figure)."""
    from mlxrl.mlx.trainer import pad_rows

    order = sorted(range(len(method.pairs)), key=lambda i: max(len(method.pairs[i][0]), len(method.pairs[i][2])))
    middle = len(order) // 2  # 4 pairs of median length, so the widths differ
    pairs = [method.pairs[i] for i in order[middle - 2:middle + 2]]
    rows = [p[0] for p in pairs] + [p[2] for p in pairs]
    masks = [p[1] for p in pairs] + [p[3] for p in pairs]
    longest = max(map(len, rows))
    trainer = make_trainer(cfg, loaded, method)
    out = []
    for width in sorted({longest, -(-longest // 8) * 8, -(-longest // 16) * 16, -(-longest // 32) * 32}):
        ids, mask = pad_rows(rows, width), pad_rows(masks, width)
        ref = reference_logps(loaded.model, ids, mask)

        def step(ids=ids, mask=mask, ref=ref):
            mx.eval(trainer._grad_step(ids, mask, ref))

        start = time.perf_counter()
        step()
        first = 1000 * (time.perf_counter() - start)
        out.append((width, first, timed(step, repeats)[0]))
    return out


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxrl-profile-dpo-") as tmp:
        cfg, loaded, method, ids, mask = build(Path(tmp))
        print(f"mlxrl DPO step profile on {common.machine()}; {common.versions()}")
        print(f"batch: {ids.shape[0]} rows x {ids.shape[1]} tokens (4 pairs), fp32, LoRA r "
              f"{common.LORA_R}; {os.environ.get('OPENBLAS_NUM_THREADS')} OpenBLAS thread(s); "
              f"medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}\n")

        print("1. phases of one step")
        p = phases(cfg, loaded, method, ids, mask, args.repeats)
        total = p["whole step (fixed batch)"][0]
        for name, ms in p.items():
            row(name, ms, total if "step" not in name else None)

        print("\n2. inside one forward (8 x 128 tokens)")
        f = forward_parts(loaded, ids, args.repeats)
        whole = f["whole forward (compiled, logits)"][0]
        for name, ms in f.items():
            if name == "  (elements per array)":
                continue
            row(name, ms, whole if not name.startswith("  ") else None)
        n = f["  (elements per array)"][0]
        print(f"  exp: {1e6 * f['  exp on one SwiGLU-sized array'][0] / n:.1f} ns/element, multiply "
              f"{1e6 * f['  multiply on the same array'][0] / n:.2f} ({int(n):,} elements; {unit()})")

        print(f"\n3. SwiGLU (whole step = ref fwd + fwd + bwd; CPU JIT flags {_jit.status})")
        results = [ablation(cfg, loaded, method, ids, mask, args.repeats, label, fn) for label, fn in (
            ("mlx-lm swiglu (nn.silu)", ORIGINAL_SWIGLU),
            ("mlxrl swiglu (fusable backward)", cpu_ops.swiglu),
            ("no SiLU: gate * up (ablation, wrong model)", no_silu_swiglu))]
        base = results[0]
        for r in results:
            saved = base["ref + fwd + bwd"][0] - r["ref + fwd + bwd"][0]
            print(f"  {r['label']:44s} forward {r['forward'][0]:7.1f}, ref+fwd+bwd "
                  f"{r['ref + fwd + bwd'][0]:7.1f} {unit()} (saves {saved:6.1f}), loss {r['loss']:.7f}")

        print("\n4. padding: the compiled policy forward + backward of the same 4 pairs at each width")
        for width, first, later in padding(cfg, loaded, method, args.repeats):
            print(f"  width {width:4d}: {later:7.1f} {unit()} a step; first call {first:7.1f} ms wall "
                  f"(a new width's trace + compile ~ {first - later:6.1f} ms)")
        print("  (mlxrl pads to multiples of 8 (`trainer.bucket`); mlx-lm-lora and TRL to the batch's "
              "longest row)")


if __name__ == "__main__":
    main()
