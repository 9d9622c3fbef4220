#!/usr/bin/env bash
# GPU check of mlxrl's torch backend: which packages are missing, then DPO and GRPO for a few
# steps on CUDA with tiny models; prints seconds per step and peak GPU memory for each run.
#
#   bash scripts/gpu_check.sh                      # from anywhere; runs from the repo root
#   PYTHON=python3 STEPS=10 bash scripts/gpu_check.sh
#   GPU_CHECK_ON_CPU=1 GPU_CHECK_ONLY='dpo quickstart' STEPS=2 bash scripts/gpu_check.sh   # dry run
#
# Wheels in .whl/ (e.g. trl, datasets, dill, multiprocess for a box that has torch, transformers,
# peft and accelerate only) are installed into a scratch folder first, without network access.
# Runs: the quickstart DPO/GRPO configs (fp32), the walkthrough's learn_{dpo,grpo}_laptop configs
# (bf16; q_lora through bitsandbytes and GRPO through vLLM when those are installed), then DPO and
# GRPO on a wider tiny Qwen2 (hidden 512, 8 layers, ~25M parameters, fp32 as DESIGN's benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MLXRL_CACHE=${MLXRL_CACHE:-/tmp/mlxrl-cache}

NEEDED="torch transformers peft accelerate trl datasets dill multiprocess xxhash pyarrow click yaml tqdm numpy safetensors huggingface_hub tokenizers"
missing() {
  "$PY" -c "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))" $NEEDED
}

MISSING=$(missing)
echo "missing packages: ${MISSING:-none}"
if [ -n "$MISSING" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing .whl/*.whl into /tmp/mlxrl-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mlxrl-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/mlxrl-site${PYTHONPATH:+:$PYTHONPATH}
  MISSING=$(missing)
  echo "still missing: ${MISSING:-none}"
fi
if [ -n "$MISSING" ]; then
  echo "install them (pip install 'mlxrl[torch]', or put their wheels in .whl/) and rerun" >&2
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

exec "$PY" - "${STEPS:-8}" <<'EOF'
import json, os, statistics, sys, tempfile, time, traceback
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import torch

STEPS = int(sys.argv[1])
CUDA = torch.cuda.is_available()
if not CUDA and not os.environ.get("GPU_CHECK_ON_CPU"):  # GPU_CHECK_ON_CPU=1: dry run of this script
    sys.exit("no CUDA device: this check is for a GPU machine")
print(f"GPU {torch.cuda.get_device_name() if CUDA else 'none'} | torch {torch.__version__} | CUDA {torch.version.cuda}")
print(" | ".join(f"{n} {version(n)}" for n in ("transformers", "peft", "trl", "accelerate", "datasets")))
print("bitsandbytes:", "yes" if find_spec("bitsandbytes") else "no", "| vllm:", "yes" if find_spec("vllm") else "no")

from mlxrl.config import load_config
from mlxrl.tiny_models import build_tiny_model, tiny_model
from mlxrl.torch.train import train

DATA = Path("configs/quickstart/data")
wide = "WIDE"  # built below if a chosen run uses it
common = ["--training.max_steps", str(STEPS), "--training.logging_steps", "1",
          "--training.save_steps", "0", "--training.enable_tensorboard", "false"]
grpo = ["--training.grpo.max_completion_length", "64"]
RUNS = [
    ("dpo quickstart fp32", "configs/quickstart/dpo.yaml", []),
    ("grpo quickstart fp32", "configs/quickstart/grpo.yaml", grpo),
    ("dpo learn_dpo_laptop bf16 q_lora", "configs/examples/learn_dpo_laptop.yaml", [
        "--model.model_name", "tiny://qwen2", "--data.train.datasets[0].dataset_name",
        str(DATA / "preferences.jsonl"), "--training.per_device_train_batch_size", "4"]),
    ("grpo learn_grpo_laptop bf16 vllm", "configs/examples/learn_grpo_laptop.yaml", [
        "--model.model_name", "tiny://qwen2", "--data.train.datasets[0].dataset_path",
        str(DATA / "letter_count.jsonl"), *grpo]),
    ("dpo wide-25M fp32", "configs/quickstart/dpo.yaml", ["--model.model_name", wide]),
    ("grpo wide-25M fp32", "configs/quickstart/grpo.yaml", ["--model.model_name", wide, *grpo]),
    # bf16 SDPA through cuDNN was slow and gave NaN GRPO gradients here; the backend avoids it
    ("dpo wide-25M bf16", "configs/quickstart/dpo.yaml", [
        "--model.model_name", wide, "--model.torch_dtype_str", "bfloat16"]),
    ("grpo wide-25M bf16", "configs/quickstart/grpo.yaml", [
        "--model.model_name", wide, "--model.torch_dtype_str", "bfloat16", *grpo]),
]

ONLY = os.environ.get("GPU_CHECK_ONLY")  # the runs whose name contains it (the test's CPU dry run)
RUNS = [r for r in RUNS if not ONLY or ONLY in r[0]]
if any(wide in extra for _, _, extra in RUNS):
    wide = str(build_tiny_model(Path(tempfile.mkdtemp()) / "qwen2-wide", "qwen2", hidden_size=512,
                                num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=2))
    RUNS = [(name, config, [wide if x == "WIDE" else x for x in extra]) for name, config, extra in RUNS]


def run(name, config, extra):
    out = tempfile.mkdtemp(prefix="gpu_check_")
    cfg = load_config(config, ["--training.output_dir", out, *common, *extra])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = Path(out) / "metrics.jsonl"
    try:
        train(cfg, quiet=True)
    finally:
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            x = json.loads(line)
            print(f"    step {x['step']}: loss {x['loss']:.4g} grad_norm {x['grad_norm']:.4g} "
                  f"{1000 * x['step_time']:.0f} ms")
    wall = time.perf_counter() - started
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    steady = [x["step_time"] for x in lines[1:]] or [lines[0]["step_time"]]
    last = lines[-1]
    extra_metric = (f"reward {last['reward']:.3f}" if "reward" in last
                    else f"acc {last.get('rewards/accuracies', float('nan')):.2f}")
    print(f"OK   {name:34s} {len(lines)} steps | {1000 * statistics.median(steady):7.1f} ms/step "
          f"(median after step 1; step 1 {1000 * lines[0]['step_time']:.0f} ms) | peak GPU "
          f"{torch.cuda.max_memory_allocated() / 2**30 if CUDA else float('nan'):.3f} GiB | loss {last['loss']:.4f} | "
          f"{extra_metric} | wall {wall:.1f} s")


failed = 0
for name, config, extra in RUNS:
    print(f"--- {name}")
    try:
        run(name, config, extra)
    except Exception as e:  # report every run, then fail at the end
        failed += 1
        traceback.print_exc(limit=-4)
        print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
print(f"{len(RUNS) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF
