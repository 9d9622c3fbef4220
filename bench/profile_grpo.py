"""Where the time of one mlxrl GRPO step goes (the `bench/grpo.py` workload: the 25M-parameter
Qwen2-architecture model, fp32, LoRA r 8 on all linears, 2 prompts x 4 completions x 64 tokens,
EOS never sampled, beta 0).

Phases, each ended by an `mx.eval` barrier: the rollout (`mlxrl.mlx.sampling.sample`: prefill,
prefix sharing, 64 compiled decode steps), rewards + advantages + micro-batch arrays, and the
update (the Trainer's compiled forward + backward over the 8 prompt+completion rows, then
AdamW). For scale: one plain forward of the same 8 rows, and the decode floor of reading every
weight once per token (100 MB at fp32) at the memory bandwidth numpy's sum reaches here.

Medians over --repeats: CPU time with `--threads 1` (the default; the stable measure on a shared
machine), wall time with more threads (on a quiet machine), as in `bench/profile_dpo.py`.

    python bench/profile_grpo.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import _common as common


def _parser():
    return common.profile_parser(__doc__.split("\n")[0], repeats=5)


if __name__ == "__main__":  # OpenBLAS reads its thread count when it loads: before mlx.core
    os.environ.update(common.thread_env(_parser().parse_args().threads))
common.setup_mlx()
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from grpo import GENERATIONS, NEVER, PROMPTS, TOKENS, messages, mlxrl_config  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from profile_dpo import row, timed, unit  # noqa: E402  (the same timing conventions)

from mlxrl.data.loading import load_split  # noqa: E402
from mlxrl.mlx import model as mlx_model  # noqa: E402
from mlxrl.mlx.grpo import GRPOMethod  # noqa: E402
from mlxrl.mlx.logprobs import per_token_logps  # noqa: E402
from mlxrl.mlx.trainer import Trainer  # noqa: E402


class NoEOSGRPO(GRPOMethod):
    def _rollout(self, indices):
        self.eos_ids = [NEVER]
        return super()._rollout(indices)


def build(workdir: Path):
    """mlxrl's GRPO on `bench/grpo.py`'s prompts and settings, as its worker runs it."""
    rows = [{"prompt": messages(r)} for r in common.prompt_rows(64)]
    prompts = common.write_jsonl(rows, workdir / "prompts.jsonl")
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    cfg = mlxrl_config(prompts, out, 1000)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    method = NoEOSGRPO(cfg, loaded, load_split(cfg.data.train))
    trainer = Trainer(cfg, loaded, method, mlx_model.adapter_config_for(loaded), 1000, quiet=True)
    return cfg, loaded, method, trainer


def memory_floor_ms(weight_bytes: int) -> float:
    """Milliseconds numpy needs to read `weight_bytes` once (a sum): the decode step's floor."""
    a = np.ones(weight_bytes // 4, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxrl-profile-grpo-") as tmp:
        cfg, loaded, method, trainer = build(Path(tmp))
        model = loaded.model
        print(f"mlxrl GRPO step profile on {common.machine()}; {common.versions()}")
        print(f"{PROMPTS} prompts x {GENERATIONS} completions x {TOKENS} tokens, fp32, LoRA r "
              f"{common.LORA_R}; {os.environ.get('OPENBLAS_NUM_THREADS')} OpenBLAS thread(s); "
              f"medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}\n")

        indices = method.stream.take(PROMPTS)
        rollout = method._rollout(indices)
        assert int(rollout.lengths.min()) == TOKENS, rollout.lengths
        batch = method.next_step()
        ids, mask = batch.micro_batches[0][0], batch.micro_batches[0][1]

        def update():
            loss, metrics, grads = trainer._grad_step(*batch.micro_batches[0])
            mx.eval(loss, metrics, grads)

        phases = {
            "rollout (sample 8 x 64 tokens)": timed(lambda: method._rollout(indices), args.repeats),
            "whole next_step (rollout + rewards + batches)": timed(method.next_step, args.repeats),
            "update: compiled forward + backward": timed(update, args.repeats),
            "Trainer.train_step": timed(trainer.train_step, args.repeats),
        }
        total = phases["Trainer.train_step"][0]
        print("1. phases of one step")
        for name, ms in phases.items():
            row(name, ms, total if name != "Trainer.train_step" else None)
        rest = phases["whole next_step (rollout + rewards + batches)"][0] - phases["rollout (sample 8 x 64 tokens)"][0]
        print(f"  (rewards + advantages + arrays ~ {rest:.1f} {unit()}; AdamW + host syncs ~ "
              f"{total - phases['whole next_step (rollout + rewards + batches)'][0] - phases['update: compiled forward + backward'][0]:.1f})")

        shape = (f"{ids.shape[0]} x {ids.shape[1]}" if isinstance(ids, mx.array) else  # shared rows
                 f"{ids[0].shape[0]} x {ids[0].shape[1]} prompt + {ids[3].shape[0]} x {ids[3].shape[1]}")
        print(f"\n2. for scale (the update's rows: {shape} tokens, bucketed)")
        forward = mx.compile(lambda i: per_token_logps(model, i), inputs=model.state)
        row(f"one forward of the update batch ({shape})",
            timed(lambda: mx.eval(forward(ids)), args.repeats))
        rollout_ms = phases["rollout (sample 8 x 64 tokens)"]
        print(f"  rollout per decode step: {rollout_ms[0] / TOKENS:.1f} {unit()}, "
              f"{PROMPTS * GENERATIONS} rows each (prefill included)")
        n_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        print(f"  floor: reading the {n_bytes / 1e6:.0f} MB of weights once (numpy sum): "
              f"{memory_floor_ms(n_bytes):.1f} ms per decode step")
        print(f"  completion tokens masked in: {int(mx.sum(mask).item())}")


if __name__ == "__main__":
    main()
