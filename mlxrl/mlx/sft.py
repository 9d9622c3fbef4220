"""SFT: next-token cross-entropy on completion tokens only.

Objective, as TRL's `SFTTrainer` with a completion mask: the mean negative log-likelihood of the
completion (assistant) tokens of a micro-batch; prompt, system and padding tokens are masked out.
`data.train.collator_name` / `train_target` choose those tokens and `data.train.pack` packs rows
into bins (`mlxrl/data/collators.py`).
With gradient accumulation each micro-batch's mean is divided by the number of micro-batches.
"""

from __future__ import annotations

import logging

import mlx.core as mx

from mlxrl.data.collators import apply_target, pack_bfd, sft_target
from mlxrl.data.formats import Truncation, encode_sft
from mlxrl.errors import DataError
from mlxrl.mlx.logprobs import per_token_logps
from mlxrl.mlx.trainer import IndexStream, StepBatch, StreamPosition, bucket, pad_rows, row_width

logger = logging.getLogger(__name__)


def sft_loss(token_logps: mx.array, loss_mask: mx.array) -> mx.array:
    """Mean NLL over the masked tokens; `token_logps`, `loss_mask` are [B, L-1]."""
    mask = loss_mask.astype(mx.float32)
    return -(token_logps * mask).sum() / mx.maximum(mask.sum(), 1.0)


def encode_rows(dataset, tokenizer, max_length: int, target) -> list[tuple[list[int], list[int]]]:
    """(input ids, completion mask) of each row, truncated to `max_length` (one note if any was)."""
    truncation = Truncation(max_length)
    rows = []
    for i, row in enumerate(dataset):
        row = truncation.cut(row, tokenizer)
        enc = truncation.sft(apply_target(encode_sft(row, tokenizer, i), target))
        if enc is not None:
            rows.append((enc["input_ids"], enc["completion_mask"]))
    if truncation.message():
        logger.warning(truncation.message())
    if not rows:
        raise DataError("no SFT rows left after truncation to model.model_max_length")
    return rows


class SFTMethod(StreamPosition):
    name = "sft"

    def __init__(self, cfg, loaded, dataset):
        self.model = loaded.model
        self.training = cfg.training
        self.tokenizer = loaded.tokenizer
        self.max_length = cfg.model.model_max_length or 1024  # TRL SFTConfig.max_length
        self.target = sft_target(cfg.data.train)
        logger.info(f"tokenizing {len(dataset)} rows")
        rows = encode_rows(dataset, loaded.tokenizer, self.max_length, self.target)
        # An example is a row, or with data.train.pack a bin of rows (TRL's bfd packing).
        self.examples = [[r] for r in rows]
        self.pack = cfg.data.train.pack
        if self.pack:
            self.examples = [[rows[i] for i in b] for b in pack_bfd([len(r[0]) for r in rows], self.max_length)]
        self.stream = IndexStream(len(self.examples), self.training.seed)
        self.accum = self.training.gradient_accumulation_steps

    def evaluation(self, dataset):
        """`eval_loss` on `dataset` as TRL's SFTTrainer reports it: each batch's mean token NLL,
        averaged over the batches weighted by their rows (transformers' evaluation loop)."""
        rows = encode_rows(dataset, self.tokenizer, self.max_length, self.target)
        size = self.training.per_device_eval_batch_size

        def run() -> dict:
            total, batches = 0.0, 0
            self.model.eval()
            try:
                for start in range(0, len(rows), size):
                    chunk = rows[start:start + size]
                    width = row_width(max(len(ids) for ids, _ in chunk))
                    ids, mask = pad_rows([r[0] for r in chunk], width), pad_rows([r[1] for r in chunk], width)
                    loss = sft_loss(per_token_logps(self.model, ids), mask[:, 1:])
                    total += float(loss) * len(chunk)
                    batches += 1
            finally:
                self.model.train()
            return {"loss": total / len(rows), "num_samples": len(rows), "num_batches": batches}

        return run

    @property
    def examples_per_step(self) -> int:
        return self.training.per_device_train_batch_size * self.accum

    @property
    def dataset_size(self) -> int:
        return len(self.examples)

    def loss(self, input_ids, completion_mask):
        logps = per_token_logps(self.model, input_ids)
        mask = completion_mask[:, 1:]
        nll = sft_loss(logps, mask)
        return nll / self.accum, {}

    def next_step(self) -> StepBatch:
        bs = self.training.per_device_train_batch_size
        micro, tokens = [], 0
        for _ in range(self.accum):
            rows = [r for i in self.stream.take(bs) for r in self.examples[i]]
            width = row_width(max(len(ids) for ids, _ in rows))
            if self.pack:  # bins hold varying numbers of rows: pad with empty ones
                rows += [([], [])] * (bucket(len(rows), 4) - len(rows))
            micro.append((pad_rows([r[0] for r in rows], width), pad_rows([r[1] for r in rows], width)))
            tokens += sum(len(ids) for ids, _ in rows)
        return StepBatch(micro, num_tokens=tokens)
