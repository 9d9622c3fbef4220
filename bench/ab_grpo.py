"""In-process A/B of mlxrl's GRPO levers on `bench/grpo.py`'s workload (the 25M model, 2 prompts x
4 completions x 64 tokens, LoRA r 8): the rollout with and without decode weights
(`sampling._decode_matmuls`, Linux CPU), and with its matmuls on all OpenBLAS threads instead of
one (a wall-time lever: measure it with `--threads 2`), and with the decode's attention as
`mx.fast.scaled_dot_product_attention` instead of mlxrl's fused softmax
(`DecodeKVCache.fused_attention`); the update (one compiled forward + backward) with and without
shared-prompt rows (`mlxrl/mlx/shared_prefix.py`), with the shared rows' suffixes padded as
before a6a742f (the body reading their last column too: 72 columns for 1 + 64 tokens, instead
of 64; `trainer.row_width`), and with mlx-lm's LoRA forward (the adapter's product added after
its own matmul) instead of `model.lora_linear`'s `mx.addmm`. Each lever is switched off by
replacing the function or flag that decides it (with traces of its own); the variants take
turns on the same prompts.

Wall-clock runs of whole processes on a shared 2-core box spread by +-30%; the CPU time of one
OpenBLAS thread (the default here) is the steadier measure. Medians over --repeats, after one
warm-up round (traces, kernel builds). Every round samples and updates on the same 2 prompts, so
no variant meets a new width (a new trace) in a timed round.

    python bench/ab_grpo.py [--repeats 3] [--threads 1]
    python bench/ab_grpo.py --threads 2 --repeats 5   # wall time, for the one-thread decode
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as common


def _parser():
    return common.profile_parser(__doc__.split("\n")[0], repeats=3)


if __name__ == "__main__":  # OpenBLAS reads its thread count when it loads: before mlx.core
    os.environ.update(common.thread_env(_parser().parse_args().threads))
common.setup_mlx()
import mlx.core as mx  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from profile_grpo import build  # noqa: E402

import mlxrl.mlx.grpo as grpo  # noqa: E402
import mlxrl.mlx.model as mlx_model  # noqa: E402
import mlxrl.mlx.sampling as sampling  # noqa: E402
import mlxrl.mlx.shared_prefix as shared_prefix  # noqa: E402
from mlxrl.mlx.cache_utils import DecodeKVCache  # noqa: E402
from mlxrl.mlx.trainer import Trainer, bucket  # noqa: E402


def _single_thread() -> bool:
    return os.environ.get("OPENBLAS_NUM_THREADS") == "1"


def _clock() -> float:
    return time.process_time() if _single_thread() else time.perf_counter()


# (name, replacement of the Linux-CPU rule, replacement of the BLAS thread cap, fused decode
# attention): None keeps mlxrl's
ROLLOUTS = (("rollout, decode weights", None, None, True),
            ("rollout, all BLAS threads", None, lambda n: contextlib.nullcontext(), True),
            ("rollout, plain decode", lambda: False, None, True),
            ("rollout, decode attention by mx.fast SDPA", None, None, False))


def _mlx_lm_lora(layer, x):
    """mlx-lm's own LoRALinear forward: the adapter's product, then an add."""
    return LoRALinear.__call__(layer, x)


def main() -> None:
    args = _parser().parse_args()
    decode_rule, share_rule = sampling._openblas_cpu, shared_prefix.worth_sharing
    blas_threads = sampling._blas.threads
    widths = grpo.row_width
    lora = mlx_model.lora_linear
    updates = {"update, shared prompts": (share_rule, widths, lora),
               "update, plain rows": (lambda *a: False, widths, lora),
               "update, shared, body reads last column": (share_rule, lambda n: 1 + bucket(n), lora),
               "update, mlx-lm's LoRA forward (no addmm)": (share_rule, widths, _mlx_lm_lora)}
    times = {name: [] for name in [r[0] for r in ROLLOUTS] + list(updates)}
    traces = {fused: {} for fused in (True, False)}  # the decode's traces, one set per attention
    with tempfile.TemporaryDirectory(prefix="mlxrl-ab-grpo-") as tmp:
        cfg, loaded, method, trainer = build(Path(tmp))
        trainers = {f: trainer if f is lora else Trainer(cfg, loaded, method, None, 1000, quiet=True)
                    for f in {u[2] for u in updates.values()}}  # a compiled step (trace) each
        print(f"mlxrl GRPO A/B on {common.machine()}; {common.versions()}")
        print(f"{os.environ.get('OPENBLAS_NUM_THREADS')} OpenBLAS thread(s), "
              f"{'CPU' if _single_thread() else 'wall'} time, medians of {args.repeats}\n")
        start_of_prompts = method.stream.position
        indices = method.stream.take(2)
        for round_ in range(args.repeats + 1):
            for name, cpu_rule, threads, fused in ROLLOUTS:
                sampling._openblas_cpu = cpu_rule or decode_rule
                sampling._blas.threads = threads or blas_threads
                DecodeKVCache.fused_attention, sampling._TRACES = fused, traces[fused]
                start = _clock()
                method._rollout(indices)
                if round_:
                    times[name].append(_clock() - start)
            sampling._openblas_cpu, sampling._blas.threads = decode_rule, blas_threads
            DecodeKVCache.fused_attention, sampling._TRACES = True, traces[True]
            for name, (shared_prefix.worth_sharing, grpo.row_width, mlx_model.lora_linear) in updates.items():
                method.stream.position = start_of_prompts  # the same prompts every way
                batch = method.next_step()
                start = _clock()
                mx.eval(trainers[mlx_model.lora_linear]._grad_step(*batch.micro_batches[0]))
                if round_:
                    times[name].append(_clock() - start)
            shared_prefix.worth_sharing, grpo.row_width, mlx_model.lora_linear = share_rule, widths, lora
    for name, values in times.items():
        runs = ", ".join(f"{1000 * v:.0f}" for v in values)
        print(f"  {name:44s} {1000 * statistics.median(values):7.0f} ms   ({runs})")


if __name__ == "__main__":
    main()
