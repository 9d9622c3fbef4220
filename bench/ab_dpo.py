"""In-process A/B of mlxrl's DPO row layouts on `bench/dpo.py`'s workload (the 25M model, 4
pairs a step, LoRA r 8, adapters off the reference): one compiled step (reference forward,
policy forward + backward) on the same batches as mlxrl builds them, with each prompt once and
the answers packed (only real tokens through the linear layers, `shared_prefix.worth_packing`),
with the answers right-padded (`worth_packing` off; rows share only when that alone saves 10%),
and as plain right-padded rows (`worth_sharing` off). Each layout has its own compiled step.

The batches are the first `--batches` steps' pairs of the run, and each layout's loss and
gradients are checked against the plain rows' first. Timings are per batch, the variants taking
turns; the total is the sum of the per-batch medians over --repeats, after one warm-up round
(traces). With `--threads 1` (the default) the time is CPU time, the steadier measure on a shared
machine; with more, wall time.

    python bench/ab_dpo.py [--repeats 5] [--threads 1] [--rows long|short] [--batches 8]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as common


def _parser():
    parser = common.profile_parser(__doc__.split("\n")[0], repeats=5)
    parser.add_argument("--rows", choices=("long", "short"), default="long")
    parser.add_argument("--batches", type=int, default=8)
    return parser


if __name__ == "__main__":  # OpenBLAS reads its thread count when it loads: before mlx.core
    os.environ.update(common.thread_env(_parser().parse_args().threads))
common.setup_mlx()
import dpo as bench_dpo  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

import mlxrl.mlx.dpo as dpo  # noqa: E402
import mlxrl.mlx.shared_prefix as shared_prefix  # noqa: E402
from mlxrl.data.loading import load_split  # noqa: E402
from mlxrl.mlx import model as mlx_model  # noqa: E402
from mlxrl.mlx.trainer import Trainer  # noqa: E402

LAYOUTS = {"prompts once, answers packed": (None, None),
           "prompts once, answers padded": (None, lambda *a: False),
           "plain rows": (lambda *a: False, lambda *a: False)}


def _clock() -> float:
    return time.process_time() if os.environ.get("OPENBLAS_NUM_THREADS") == "1" else time.perf_counter()


def _batches(method, model, count: int) -> dict[str, list]:
    """Each layout's (ids, mask) for the run's first `count` steps."""
    indices = [method.stream.take(bench_dpo.PAIRS) for _ in range(count)]
    rules = (shared_prefix.worth_sharing, shared_prefix.worth_packing)
    out = {}
    for name, (share, pack) in LAYOUTS.items():
        shared_prefix.worth_sharing, shared_prefix.worth_packing = share or rules[0], pack or rules[1]
        out[name] = [dpo.pair_arrays([method.pairs[i] for i in ix], model)[:2] for ix in indices]
    shared_prefix.worth_sharing, shared_prefix.worth_packing = rules
    return out


def _layout(ids) -> str:
    return "plain" if not isinstance(ids, tuple) else "packed" if len(ids) > 4 else "shared"


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxrl-ab-dpo-") as tmp:
        workdir = Path(tmp)
        rows = common.long_preference_rows(256) if args.rows == "long" else common.short_preference_rows(256)
        common.write_jsonl(rows, workdir / "pairs.jsonl")
        cfg = bench_dpo.mlxrl_config(1000, workdir, "ab-")
        loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
        method = dpo.DPOMethod(cfg, loaded, load_split(cfg.data.train))
        model = loaded.model  # adapters moved off zero, so that policy and reference differ
        model.update(tree_map(lambda a: a + 0.01 * mx.random.normal(a.shape), model.trainable_parameters()))
        batches = _batches(method, model, args.batches)
        steps = {name: Trainer(cfg, loaded, method, None, 1000, quiet=True)._grad_step for name in LAYOUTS}
        print(f"mlxrl DPO layouts A/B on {common.machine()}; {common.versions()}")
        print(f"{os.environ.get('OPENBLAS_NUM_THREADS')} OpenBLAS thread(s), {args.rows} pairs, "
              f"{'CPU' if os.environ.get('OPENBLAS_NUM_THREADS') == '1' else 'wall'} time, "
              f"medians of {args.repeats}\n")
        first = {}
        for name, arrays in batches.items():
            loss, _, grads = steps[name](*arrays[0])
            first[name] = loss.item(), dict(tree_flatten(grads))
        plain_loss, plain_grads = first["plain rows"]
        for name, (loss, grads) in first.items():
            diff = max(mx.abs(g - plain_grads[k]).max().item() for k, g in grads.items())
            layouts = " ".join(_layout(ids) for ids, _ in batches[name])
            print(f"  {name:30s} batches: {layouts}; first batch: loss {loss:.6f} (plain rows "
                  f"{plain_loss:.6f}), gradients within {diff:.1e} of the plain rows'")
        times = {name: [[] for _ in range(args.batches)] for name in LAYOUTS}
        for round_ in range(args.repeats + 1):
            for b in range(args.batches):
                for name in LAYOUTS:
                    start = _clock()
                    mx.eval(steps[name](*batches[name][b]))
                    if round_:
                        times[name][b].append(_clock() - start)
    print()
    for name, per_batch in times.items():
        medians = [1000 * statistics.median(v) for v in per_batch]
        print(f"  {name:30s} {sum(medians):7.0f} ms   ({', '.join(f'{m:.0f}' for m in medians)})")


if __name__ == "__main__":
    main()
