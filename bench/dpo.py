"""DPO, side by side: mlxrl vs mlx-lm-lora (MLX, same OpenBLAS) vs TRL's DPOTrainer (torch CPU).

Workload (DESIGN.md section 8): the 25M-parameter Qwen2-architecture tiny model, fp32, LoRA r 8
(alpha 16) on every linear layer of every block, 4 pairs a step, sequences <= 128 tokens (the
same generated letter-count pairs for all, chat-templated by each implementation, most 95-124
tokens), sigmoid loss, beta 0.1, AdamW, the reference = the base model (mlxrl and TRL: the adapter
switched off; mlx-lm-lora: its second model copy, as its own `train.py` loads it).

mlxrl precomputes the reference log-probs up front when a run visits every pair (max_steps x 4 >=
pairs); with the default 256 pairs and <= 16 steps it does not, so every implementation runs a
reference forward each step. `--pairs 16` shows the other case: mlxrl's up-front reference pass
is then in both runs and cancels, and its steps have no reference forward (TRL and mlx-lm-lora
still run one per step: TRL's precompute_ref_log_probs is off by default).

Each implementation trains in its own subprocess, n1 and then n2 steps; the steady-state time per
step is (T(n2) - T(n1)) / (n2 - n1) over the two whole training calls (model load, data encoding,
tracing and compilation cancel). Peak RSS is the n2 process's own `ru_maxrss` (imports included:
mlx-lm-lora and TRL import torch). Implementations take turns within each repeat; the median over
repeats is printed. The CPU is shared, so expect run-to-run spread. Reports, never asserts.

    python bench/dpo.py [--steps 4 16] [--repeats 3] [--threads N] [--rows long|short]
                        [--model tiny|smollm2]
                        [--impls mlxrl,mlx-lm-lora,trl] [--mlxrl-python PATH]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _common as common

IMPLS = ("mlxrl", "mlx-lm-lora", "trl", "mlxrl-torch")
PAIRS = 4
MAX_LENGTH = 128
BETA = 0.1


# ----------------------------------------------------------------------------- workers


def mlxrl_config(steps: int, workdir: Path, prefix: str):
    from mlxrl.config import load_config

    out = Path(tempfile.mkdtemp(dir=workdir, prefix=prefix))
    config = out / "dpo.yaml"
    config.write_text(f"""
model: {{model_name: "{common.model_path()}", model_max_length: {MAX_LENGTH}, torch_dtype_str: float32}}
data: {{train: {{datasets: [{{dataset_name: "{workdir / 'pairs.jsonl'}"}}]}}}}
training:
  trainer_type: TRL_DPO
  max_steps: {steps}
  per_device_train_batch_size: {PAIRS}
  learning_rate: {common.LEARNING_RATE}
  lr_scheduler_type: constant
  logging_steps: 1000000
  save_steps: 0
  save_final_model: false
  use_peft: true
  enable_tensorboard: false
  output_dir: "{out}"
  trainer_kwargs: {{beta: {BETA}, loss_type: sigmoid}}
peft: {{lora_r: {common.LORA_R}, lora_alpha: {common.LORA_ALPHA}, lora_dropout: 0.0}}
""")
    return load_config(str(config), [])


def worker_mlxrl(steps: int, workdir: Path) -> None:
    common.setup_mlx()
    from mlxrl.mlx.train import train

    cfg = mlxrl_config(steps, workdir, "mlxrl-dpo-")
    timer = common.Timer()
    train(cfg, quiet=True)
    common.report(timer, steps)


def worker_mlxrl_torch(steps: int, workdir: Path) -> None:
    """`mlxrl train --backend torch` on the same YAML: what it adds to plain TRL (the `trl` worker)."""
    common.seeded_torch()
    from mlxrl.torch.train import train

    cfg = mlxrl_config(steps, workdir, "mlxrl-torch-dpo-")
    timer = common.Timer()
    train(cfg, quiet=True)
    common.report(timer, steps)


def worker_mlx_lm_lora(steps: int, workdir: Path) -> None:
    common.patch_mlx_for_mlx_lm_lora()  # also binds the same OpenBLAS
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import load
    from mlx_lm_lora.trainer.datasets import CacheDataset, DPODataset
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo
    from mlx_lm_lora.utils import from_pretrained

    np.random.seed(0)
    mx.random.seed(0)
    path = str(common.model_path())
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="mll-dpo-"))
    timer = common.Timer()
    lora = {"rank": common.LORA_R, "dropout": 0.0, "scale": common.LORA_ALPHA / common.LORA_R,
            "num_layers": -1}
    model, tokenizer, _ = from_pretrained(path, lora_config=lora)
    reference, _ = load(path)  # what mlx_lm_lora.train.load_reference_model does
    reference.freeze()
    train_set = CacheDataset(DPODataset(common.read_jsonl(workdir / "pairs.jsonl"), tokenizer))
    args = DPOTrainingArgs(batch_size=PAIRS, iters=steps, val_batches=0, steps_per_report=10**9,
                           steps_per_eval=10**9, steps_per_save=10**9,
                           adapter_file=str(out / "adapters.safetensors"),
                           max_seq_length=MAX_LENGTH, beta=BETA, loss_type="sigmoid")
    train_dpo(model=model, ref_model=reference, optimizer=optim.AdamW(learning_rate=common.LEARNING_RATE),
              train_dataset=train_set, val_dataset=None, args=args, loss_type="sigmoid")
    common.report(timer, steps)


def worker_trl(steps: int, workdir: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch = common.seeded_torch()
    path = str(common.model_path())
    rows = common.read_jsonl(workdir / "pairs.jsonl")
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    peft = LoraConfig(r=common.LORA_R, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(workdir / "trl-dpo"), max_steps=steps,
                     per_device_train_batch_size=PAIRS, learning_rate=common.LEARNING_RATE,
                     lr_scheduler_type="constant", max_length=MAX_LENGTH, beta=BETA,
                     gradient_checkpointing=False,
                     loss_type=["sigmoid"], logging_steps=10**6, save_strategy="no",
                     report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft)
    timer = common.Timer()
    trainer.train()
    common.report(timer, steps)


WORKERS = {"mlxrl": worker_mlxrl, "mlx-lm-lora": worker_mlx_lm_lora, "trl": worker_trl,
           "mlxrl-torch": worker_mlxrl_torch}


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = common.bench_parser(__doc__.split("\n")[0], IMPLS, (4, 16))
    parser.add_argument("--pairs", type=int, default=256, help="rows in the generated dataset")
    parser.add_argument("--rows", choices=("long", "short"), default="long",
                        help="long: answers spelled out, 95-124 tokens (default); short: "
                             "the quickstart pairs that fit in 48 tokens")
    args = common.parse_or_work(parser, WORKERS)
    if args is None:
        return

    n1, n2 = args.steps
    with tempfile.TemporaryDirectory(prefix="mlxrl-bench-dpo-") as tmp:
        workdir = Path(tmp)
        if args.rows == "long":
            rows = common.long_preference_rows(args.pairs)
        else:
            rows = common.short_preference_rows(args.pairs)
        common.write_jsonl(rows, workdir / "pairs.jsonl")
        common.print_header("DPO", f"{PAIRS} pairs/step, {len(rows)} {args.rows} pairs", args)
        if n1 * PAIRS >= len(rows):
            print(f"  both runs visit all {len(rows)} pairs: mlxrl precomputes the reference up front")
        results = common.run_benchmark(args, __file__, workdir)
    common.print_table(f"DPO steady-state time per step (median of {args.repeats})", results)
    print("\ntargets (DESIGN.md 8): mlxrl <= 0.45 s/step, peak RSS <= 540 MB")


if __name__ == "__main__":
    sys.exit(main())
