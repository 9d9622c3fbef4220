"""GRPO, side by side: mlxrl vs mlx-lm-lora (MLX, same OpenBLAS) vs TRL's GRPOTrainer (torch CPU,
transformers generation).

Workload (DESIGN.md section 8): the 25M-parameter Qwen2-architecture tiny model, fp32, LoRA r 8
(alpha 16) on every linear layer of every block; each step 2 prompts x 4 completions x exactly 64
tokens (EOS is never sampled: mlxrl and mlx-lm-lora get an EOS id outside the vocabulary, TRL
`min_new_tokens=64`), temperature 1, no top-k/top-p; beta 0 (TRL's default: no reference forward;
mlx-lm-lora gets no reference model), one update per rollout, AdamW. Prompts are the letter-count
questions after a one-line system turn (mlx-lm-lora always renders one), chat-templated by each
implementation into the same ids (45-65 tokens; update rows of 110-130 tokens). The reward
(vowel fraction of the completion) is cheap and varies, so advantages are not zero.

Each implementation runs in its own subprocess, n1 and then n2 steps; steady-state time per step
is (T(n2) - T(n1)) / (n2 - n1). mlxrl also reports its rollout / update split (median over its
steps after the first two). Implementations take turns within a repeat; medians over repeats.
The CPU is shared, so expect run-to-run spread. Reports, never asserts.

    python bench/grpo.py [--steps 2 6] [--repeats 3] [--threads N] [--impls mlxrl,mlx-lm-lora,trl]
                         [--mlxrl-python PATH]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as common

IMPLS = ("mlxrl", "mlx-lm-lora", "trl")
PROMPTS, GENERATIONS, TOKENS = 2, 4, 64
NEVER = 10**6  # an EOS id no model here can sample


def vowel_fraction(completions, **kwargs) -> list[float]:
    """A reward that costs nothing and differs between completions (TRL's signature)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t.lower()) / max(len(t), 1) for t in texts]


SYSTEM = "Count the letters. Answer with a number."  # every implementation renders a system turn


def messages(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]


# ----------------------------------------------------------------------------- workers


def mlxrl_config(prompts: Path, out: Path, steps: int):
    """mlxrl's config for this benchmark (also what `bench/profile_grpo.py` profiles)."""
    from mlxrl.config import load_config

    config = out / "grpo.yaml"
    config.write_text(f"""
model: {{model_name: "{common.model_path()}", torch_dtype_str: float32}}
data: {{train: {{datasets: [{{dataset_name: "{prompts}"}}]}}}}
training:
  trainer_type: TRL_GRPO
  max_steps: {steps}
  per_device_train_batch_size: {PROMPTS * GENERATIONS}
  learning_rate: {common.LEARNING_RATE}
  lr_scheduler_type: constant
  logging_steps: 1000000
  save_steps: 0
  save_final_model: false
  use_peft: true
  output_dir: "{out}"
  reward_functions: ["{Path(__file__).resolve()}:vowel_fraction"]
  grpo: {{num_generations: {GENERATIONS}, max_completion_length: {TOKENS}, temperature: 1.0}}
peft: {{lora_r: {common.LORA_R}, lora_alpha: {common.LORA_ALPHA}, lora_dropout: 0.0}}
""")
    return load_config(str(config), [])


def worker_mlxrl(steps: int, workdir: Path) -> None:
    common.setup_mlx()
    import mlx.core as mx

    from mlxrl.data.loading import load_split
    from mlxrl.mlx import model as mlx_model
    from mlxrl.mlx.grpo import GRPOMethod
    from mlxrl.mlx.trainer import Trainer

    out = Path(tempfile.mkdtemp(dir=workdir, prefix="mlxrl-grpo-"))
    cfg = mlxrl_config(workdir / "prompts.jsonl", out, steps)
    rollout_s, next_step_s, step_s, lengths = [], [], [], set()

    class TimedGRPO(GRPOMethod):
        """mlxrl's GRPO with an EOS id that is never sampled, and the time of each phase."""

        def _rollout(self, indices):
            self.eos_ids = [NEVER]
            t = time.perf_counter()
            rollout = super()._rollout(indices)
            rollout_s.append(time.perf_counter() - t)
            lengths.update(int(n) for n in rollout.lengths)
            return rollout

        def next_step(self):
            t = time.perf_counter()
            batch = super().next_step()
            next_step_s.append(time.perf_counter() - t)
            return batch

    timer = common.Timer()
    # what mlxrl.mlx.train.train does, with the method above
    mx.random.seed(cfg.training.seed)
    loaded = mlx_model.load(cfg.model, cfg.peft, for_training=True)
    method = TimedGRPO(cfg, loaded, load_split(cfg.data.train))
    trainer = Trainer(cfg, loaded, method, mlx_model.adapter_config_for(loaded), steps, quiet=True)
    step = trainer.train_step

    def timed_step():
        t = time.perf_counter()
        metrics = step()
        step_s.append(time.perf_counter() - t)
        return metrics

    trainer.train_step = timed_step
    trainer.run()
    common.report(timer, steps, rollout_s=rollout_s, next_step_s=next_step_s, step_s=step_s,
                  completion_tokens=sorted(lengths))


def worker_mlx_lm_lora(steps: int, workdir: Path) -> None:
    common.patch_mlx_for_mlx_lm_lora()  # also binds the same OpenBLAS
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo
    from mlx_lm_lora.utils import from_pretrained

    def vowel_reward(prompts, completions, answer, types=None):  # mlx-lm-lora's signature
        return vowel_fraction(completions)

    np.random.seed(0)
    mx.random.seed(0)
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="mll-grpo-"))
    timer = common.Timer()
    lora = {"rank": common.LORA_R, "dropout": 0.0, "scale": common.LORA_ALPHA / common.LORA_R,
            "num_layers": -1}
    model, tokenizer, _ = from_pretrained(str(common.model_path()), lora_config=lora)
    tokenizer.eos_token_ids = [NEVER]
    rows = [{"system": r["prompt"][0]["content"], "prompt": r["prompt"][1]["content"],
             "answer": r["answer"]} for r in common.read_jsonl(workdir / "prompts.jsonl")]
    train_set = GRPODataset(rows, tokenizer)
    args = GRPOTrainingArgs(batch_size=PROMPTS, group_size=GENERATIONS, iters=steps, val_batches=0,
                            steps_per_report=10**9, steps_per_eval=10**9, steps_per_save=10**9,
                            adapter_file=str(out / "adapters.safetensors"), max_seq_length=512,
                            max_completion_length=TOKENS, beta=0.0, epsilon=0.2,
                            temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    train_grpo(model=model, ref_model=None, tokenizer=tokenizer,
               optimizer=optim.AdamW(learning_rate=common.LEARNING_RATE), train_dataset=train_set,
               val_dataset=None, reward_funcs=[vowel_reward], args=args, end_answer_token="")
    common.report(timer, steps)


def worker_trl(steps: int, workdir: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch = common.seeded_torch()
    path = str(common.model_path())
    rows = common.read_jsonl(workdir / "prompts.jsonl")
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    peft = LoraConfig(r=common.LORA_R, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    args = GRPOConfig(output_dir=str(workdir / "trl-grpo"), max_steps=steps,
                      per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=TOKENS,
                      generation_kwargs={"min_new_tokens": TOKENS}, temperature=1.0, top_p=1.0,
                      top_k=0, beta=0.0, learning_rate=common.LEARNING_RATE,
                      lr_scheduler_type="constant", gradient_checkpointing=False,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                      bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=vowel_fraction, args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft)
    timer = common.Timer()
    trainer.train()
    lengths = sorted({log["completions/mean_length"] for log in trainer.state.log_history
                      if "completions/mean_length" in log})
    common.report(timer, steps, completion_tokens=lengths)


WORKERS = {"mlxrl": worker_mlxrl, "mlx-lm-lora": worker_mlx_lm_lora, "trl": worker_trl}


# ----------------------------------------------------------------------------- driver


def mlxrl_split(result: dict) -> tuple[float, float, float] | None:
    """Median rollout, rest-of-batch-making and update seconds over mlxrl's steps after the 2nd."""
    runs = result.get("runs", [])
    rollout, batch, update = [], [], []
    for run in runs:
        long = run["long"]
        for r, n, s in list(zip(long["rollout_s"], long["next_step_s"], long["step_s"]))[2:]:
            rollout.append(r)
            batch.append(n - r)
            update.append(s - n)
    if not rollout:
        return None
    return statistics.median(rollout), statistics.median(batch), statistics.median(update)


def main() -> None:
    parser = common.bench_parser(__doc__.split("\n")[0], IMPLS, (2, 6))
    args = common.parse_or_work(parser, WORKERS)
    if args is None:
        return

    n2 = args.steps[1]
    with tempfile.TemporaryDirectory(prefix="mlxrl-bench-grpo-") as tmp:
        workdir = Path(tmp)
        rows = [{"prompt": messages(r), "answer": r["answer"]} for r in common.prompt_rows(64)]
        common.write_jsonl(rows, workdir / "prompts.jsonl")
        common.print_header("GRPO", f"{PROMPTS} prompts x {GENERATIONS} completions x {TOKENS} tokens a step",
                            args)
        results = common.run_benchmark(args, __file__, workdir)
    common.print_table(f"GRPO steady-state time per step (median of {args.repeats})", results,
                       rss=False)
    if "mlxrl" in results and (split := mlxrl_split(results["mlxrl"])):
        rollout, batch, update = split
        print(f"\nmlxrl split (median over steps 3..{n2} of the {n2}-step runs): rollout "
              f"{rollout:.3f} s, rewards + batches {batch:.3f} s, update (fwd+bwd+AdamW) "
              f"{update:.3f} s")
    print("\ntargets (DESIGN.md 8): mlxrl <= 1.8 s/step; stretch <= TRL")


if __name__ == "__main__":
    sys.exit(main())
