"""TRL checkpoints made as mlxrl's MLX checkpoints are: atomic, and holding only safetensors and
JSON (transformers writes optimizer.pt / scheduler.pt / rng_state.pth / training_args.bin with
torch.save and reads them back with torch.load, which is pickle).

    checkpoint-<step>/   adapter_model.safetensors, adapter_config.json, tokenizer files,
                         optimizer.safetensors   optimizer state tensors (+ param groups as JSON metadata)
                         scheduler.json, scaler.json (fp16 only), training_args.json
                         rng_state.safetensors   python / numpy / torch RNG (rng_state_<rank> when distributed)
                         trainer_state.json

`SafeCheckpoints` goes in front of a TRL trainer class (`safe_trainer_class`): it lets TRL and
transformers write a checkpoint as they do, into a hidden staging folder, and renames it into
place when complete; it swaps the pickle writers and readers for the formats above; and it stops
(or skips) a step whose gradient is not finite before the optimizer sees it.
DeepSpeed and FSDP keep their own checkpoint formats (transformers' code, neither atomic nor
pickle-free).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file

from mlxrl.errors import ConfigError
from mlxrl.run_dir import (
    RUN_FILE,
    publish_files,
    publish_folder,
    staging_folder,
    staging_path,
    write_json,
)
from mlxrl.stopping import is_write_error, non_finite, save_failed, write_error_text

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
ARGS_FILE = "training_args.json"
PICKLE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth")


# ----------------------------------------------------------------------------- state <-> files


def save_optimizer_state(state: dict, path: Path) -> None:
    """A torch optimizer `state_dict()`: per-parameter tensors as safetensors, the rest as JSON."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    save_file(tensors, str(path), metadata={"mlxrl_optimizer": json.dumps(meta)})


def load_optimizer_state(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["mlxrl_optimizer"])
    per_param: dict[int, dict] = {}
    for key, value in [*load_file(str(path)).items(), *meta["scalars"].items()]:
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {"state": per_param, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON metadata) of every RNG a step draws from."""
    version, python_keys, gauss = random.getstate()
    name, numpy_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(python_keys, dtype=torch.int64),
               "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        tensors["torch_mps"] = torch.mps.get_rng_state()
    meta = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    version, gauss = meta["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(sum(k.startswith("torch_cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    if "torch_mps" in tensors and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["torch_mps"])


def refuse_pickle(folder: Path) -> None:
    found = [name for name in PICKLE_FILES if (folder / name).is_file()]
    if found:
        raise ConfigError(f"{folder} holds {', '.join(found)} (pickle files, written by plain TRL or "
                          f"an older mlxrl); mlxrl reads back only safetensors and JSON. Resume from "
                          f"a checkpoint mlxrl wrote, or start over with --overwrite")


# ----------------------------------------------------------------------------- the trainer mixin


class SafeCheckpoints:
    """Mixed in front of a transformers Trainer subclass (see the module docstring)."""

    _staging_dir: Path | None = None
    run_record: dict = {}  # RUN_FILE's content (set by safe_trainer_class)
    skip_non_finite_steps = False  # training.skip_non_finite_steps (set by safe_trainer_class)
    adapter_fields: dict = {}  # added to adapter_config.json (a GGUF base: torch_model.Loaded)

    def _plain_files(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_dir) if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        if not self._plain_files() or trial is not None:
            return super()._save_checkpoint(model, trial)
        run_dir, name = Path(self.args.output_dir), f"checkpoint-{self.state.global_step}"
        try:
            if self.args.should_save:
                staging_folder(run_dir, name)
            self.accelerator.wait_for_everyone()
            self._staging_dir = staging_path(run_dir, name)
            super()._save_checkpoint(model, trial)  # TRL's extras, then transformers' writers below
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_json(self._staging_dir / name / RUN_FILE, self.run_record)
                publish_folder(self._staging_dir / name, run_dir / name)
                shutil.rmtree(self._staging_dir, ignore_errors=True)
        except BaseException as e:
            reason = write_error_text(e, run_dir) if is_write_error(e) else None
            if self.args.should_save and self._staging_dir is not None:
                shutil.rmtree(self._staging_dir, ignore_errors=True)
            if reason is None:
                raise
            raise save_failed(run_dir, name, reason) from None
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()

    def create_model_card(self, *args, **kwargs):
        """TRL writes its model card into output_dir at every checkpoint, where a run killed or
        stopped by a full disk leaves it behind as if it were a finished adapter's; the final
        adapter's card comes with `save_final`."""
        if self._staging_dir is None:
            return super().create_model_card(*args, **kwargs)
        return None

    def save_final(self, output_dir: str) -> list[str]:
        """The final adapter into output_dir, each file replaced atomically; returns the names."""
        out = Path(output_dir)
        tmp = staging_path(out, "final")
        try:
            if self.args.should_save:
                staging_folder(out, "final")
            self.accelerator.wait_for_everyone()
            self.save_model(str(tmp))
            self.accelerator.wait_for_everyone()
            return publish_files(tmp, out) if self.args.should_save else []
        except BaseException as e:
            reason = write_error_text(e, out) if is_write_error(e) else None
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            if reason is None:
                raise
            raise save_failed(out, "the final adapter", reason) from None

    def _save(self, output_dir=None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            (folder / "training_args.bin").unlink(missing_ok=True)
            (folder / ARGS_FILE).write_text(self.args.to_json_string())
            add_adapter_fields(folder / "adapter_config.json", self.adapter_fields)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._plain_files():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer_state(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_FILE)
            write_json(Path(output_dir) / SCHEDULER_FILE, self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None or not self._plain_files():
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        refuse_pickle(folder)
        if (folder / OPTIMIZER_FILE).is_file():
            fresh = keep_new_settings(self.optimizer, self.lr_scheduler)
            self.optimizer.load_state_dict(load_optimizer_state(folder / OPTIMIZER_FILE))
            self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
            fresh()

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            write_json(Path(output_dir) / SCALER_FILE, scaler.state_dict())

    def _load_scaler(self, checkpoint) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / SCALER_FILE).is_file():
            scaler.load_state_dict(json.loads((Path(checkpoint) / SCALER_FILE).read_text()))

    def _rng_file(self, folder) -> Path:
        rank = "" if self.args.world_size <= 1 else f"_{self.args.process_index}"
        return Path(folder) / f"rng_state{rank}.safetensors"

    def _save_rng_state(self, output_dir: str) -> None:
        tensors, meta = rng_state()
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # another rank may not have made it yet
        save_file(tensors, str(self._rng_file(output_dir)), metadata={"mlxrl_rng": json.dumps(meta)})

    def _load_rng_state(self, checkpoint) -> None:
        path = self._rng_file(checkpoint) if checkpoint is not None else None
        if path is None or not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["mlxrl_rng"])
        set_rng_state(load_file(str(path)), meta)

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's gradient norm; a non-finite one stops the run before the update, or, with
        training.skip_non_finite_steps, drops the gradients so the optimizer leaves the weights.
        (fp16's loss scaler skips inf steps itself.)"""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is None or getattr(self.accelerator, "scaler", None) is not None:
            return grad_norm
        value = float(grad_norm)
        if math.isfinite(value):
            return grad_norm
        what = f"non-finite gradient (grad norm {value}) at step {self.state.global_step + 1}"
        if not self.skip_non_finite_steps:
            raise non_finite(what, Path(self.args.output_dir))
        model.zero_grad(set_to_none=True)
        logger.warning(f"warning: {what}; step skipped (no update)")
        return grad_norm


def keep_new_settings(optimizer, scheduler):
    """Loading a checkpoint's optimizer and scheduler state brings back the old run's learning
    rate, weight decay, betas and epsilon (in `param_groups` and the scheduler's `base_lrs`).
    mlxrl applies the settings of the resuming command instead, as the MLX backend does: call
    this before loading and the returned function after it; the moments and the step count stay
    the checkpoint's, and the learning rate becomes the new schedule's at the resumed step."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base_lrs = list(getattr(scheduler, "base_lrs", []))

    def restore() -> None:
        for group, settings in zip(optimizer.param_groups, groups):
            group.update({k: v for k, v in settings.items() if k != "lr"})
        if not hasattr(scheduler, "lr_lambdas"):  # not one of HF's LambdaLR schedules
            return
        scheduler.base_lrs = list(base_lrs)
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    return restore


def add_adapter_fields(path: Path, fields: dict) -> None:
    """PEFT's adapter_config.json with mlxrl's `fields` (its `mlxrl` block merged)."""
    if not fields or not path.is_file():
        return
    config = json.loads(path.read_text())
    config.update({k: v for k, v in fields.items() if k != "mlxrl"})
    config["mlxrl"] = {**(config.get("mlxrl") or {}), **fields.get("mlxrl", {})}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def safe_trainer_class(trainer_class: type, skip_non_finite_steps: bool,
                       run_record: dict | None = None, adapter_fields: dict | None = None) -> type:
    """`trainer_class` with `SafeCheckpoints` in front of it."""
    return type(f"Mlxrl{trainer_class.__name__}", (SafeCheckpoints, trainer_class),
                {"skip_non_finite_steps": skip_non_finite_steps, "run_record": run_record or {},
                 "adapter_fields": adapter_fields or {}})
