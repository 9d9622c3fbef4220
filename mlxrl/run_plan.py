"""What a training command does with its output_dir, the same on both backends: start a fresh
run, resume one, say that the run there is finished, or refuse to mix two runs.

Every checkpoint and the final output carry `mlxrl_run.json` (`RUN_FILE`): the backend and the
whole config of the run that wrote them. A new command's config is compared with it:
- fields that make it another run (`IDENTITY`: the model and tokenizer, the training data and
  its length limit, the method, the LoRA shape, quantization) refuse a resume in one line that
  lists them;
- every other field may change on `--resume`: both backends apply the new value from the resumed
  step on (the learning-rate schedule is the new settings' schedule at that step) and a note
  lists what changed.

`plan_run` decides before the model loads; `RunPlan.start()` clears what `--overwrite` replaces
just before the first write, so a config that fails to load loses nothing.

Backend-neutral (no mlx or torch import).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlxrl.errors import ConfigError
from mlxrl.integrity import adapter_kind, checkpoint_problem, json_problem
from mlxrl.run_dir import RUN_FILE, STATE_FILE, checkpoint_folders, leftovers, read_state
from mlxrl.run_lock import LOCK_FILE

logger = logging.getLogger(__name__)

BACKEND_NAMES = {"mlx": "MLX", "torch": "torch"}
# Fields whose change makes another run: (dotted key or prefix ending in ".")
IDENTITY = ("model.model_name", "model.model_revision", "model.adapter_model", "model.tokenizer_name",
            "model.tokenizer_pad_token", "model.tokenizer_kwargs", "model.chat_template",
            "model.chat_template_kwargs", "model.model_max_length", "model.torch_dtype_str",
            "model.trust_remote_code", "data.train.", "training.method", "training.use_peft",
            "peft.lora_r", "peft.lora_alpha", "peft.lora_target_modules", "peft.lora_exclude_modules",
            "peft.lora_target_parameters", "peft.lora_modules_to_save", "peft.lora_bias",
            "peft.use_dora", "peft.q_lora", "peft.bnb_", "peft.llm_int8_skip_modules",
            "peft.use_bnb_nested_quant")
# Fields that say where and how to resume, not what the run is.
IGNORED = ("training.output_dir", "training.resume_from_checkpoint",
           "training.try_resume_from_last_checkpoint", "training.trainer_type")
# What a run writes into output_dir besides its checkpoints (the final files are listed in the
# final RUN_FILE; these names cover runs from before it).
RUN_LOGS = ("metrics.jsonl", "completions.jsonl")
TENSORBOARD_DIR = "runs"  # output_dir/runs/<date>_<host>/events.out.tfevents.* (both backends)
FINAL_FILES = {"mlx": ("adapters.safetensors", "adapter_config.json"),
               "torch": ("adapter_model.safetensors", "adapter_config.json", "README.md",
                         "training_args.json", "tokenizer.json", "tokenizer_config.json",
                         "chat_template.jinja", "special_tokens_map.json")}


def run_record(cfg, backend: str) -> dict:
    """What RUN_FILE holds for a run of `cfg` on `backend`."""
    import mlxrl

    return {"backend": backend, "mlxrl_version": mlxrl.__version__, "config": dataclasses.asdict(cfg)}


def read_record(folder: Path) -> dict | None:
    """The RUN_FILE of a checkpoint or output_dir; for an MLX folder written before it, the config
    in adapter_config.json; None when unknown."""
    folder = Path(folder)
    if json_problem(folder / RUN_FILE) is None:
        return json.loads((folder / RUN_FILE).read_text())
    config = folder / "adapter_config.json"
    if json_problem(config) is None:
        block = json.loads(config.read_text()).get("mlxrl") or {}
        if isinstance(block.get("config"), dict):
            return {"backend": "mlx", "config": block["config"]}
    return None


# ----------------------------------------------------------------------------- comparing configs


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {f"{prefix[:-1]}.length": len(value)}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix[:-1]}[{i}]."))
        return out
    return {prefix[:-1]: value}


def _method(config: dict) -> str | None:
    from mlxrl.config import METHODS

    trainer_type = str((config.get("training") or {}).get("trainer_type", "")).upper()
    return METHODS.get(trainer_type, trainer_type or None)


def compare(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that make another run, changes that may be applied on resume), as
    "key old -> new" texts."""
    a, b = _flat(old), _flat(new)
    a["training.method"], b["training.method"] = _method(old), _method(new)
    identity, other = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key) or key.startswith(IGNORED):
            continue
        text = f"{key} {_show(a.get(key))} -> {_show(b.get(key))}"
        (identity if _is_identity(key) else other).append(text)
    return identity, other


def _is_identity(key: str) -> bool:
    for name in IDENTITY:
        if name.endswith((".", "_")):
            if key.startswith(name):
                return True
        elif key == name or key.startswith((name + ".", name + "[")):
            return True
    return False


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    output_dir: Path
    resume: Path | None = None  # the checkpoint to resume from
    finished: dict | None = None  # the state of a finished run: nothing to train
    overwrite: bool = False
    messages: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Before the first write (main process only): `--overwrite` removes the previous run;
        a fresh run drops the logs of a run that was killed before its first checkpoint."""
        if self.resume is not None:
            return
        if self.overwrite:
            clear_run(self.output_dir)
        else:
            for name in RUN_LOGS:
                (self.output_dir / name).unlink(missing_ok=True)


def clear_run(output_dir: Path) -> None:
    """Remove what mlxrl runs wrote in output_dir; keep (and name) everything else."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    record = read_record(output_dir) or {}
    ours = {STATE_FILE, RUN_FILE, *RUN_LOGS, *record.get("files", [])}
    if not record.get("files") and (output_dir / STATE_FILE).is_file():  # a run from before RUN_FILE
        ours.update(FINAL_FILES.get(adapter_kind(output_dir), ()))
    folders = {*checkpoint_folders(output_dir, complete=False), *leftovers(output_dir)}
    board = output_dir / TENSORBOARD_DIR  # TensorBoard's event files, of this run's runs alone
    if board.is_dir() and all("tfevents" in p.name for p in board.rglob("*") if p.is_file()):
        folders.add(board)
    kept = []
    for path in sorted(output_dir.iterdir()):
        if path in folders:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name in ours and path.is_file():
            path.unlink()
        elif path.name != LOCK_FILE:
            kept.append(path.name + ("/" if path.is_dir() else ""))
    if kept:
        logger.warning(f"note: --overwrite removed the previous run in {output_dir} and kept what mlxrl did "
            f"not write there: {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}")


def _backend_of(folder: Path, record: dict | None) -> str | None:
    return (record or {}).get("backend") or adapter_kind(folder)


def _check_same_run(folder: Path, cfg_record: dict, backend: str, what: str) -> None:
    """Refuse another backend's or another run's checkpoint; note the settings that change."""
    record = read_record(folder)
    theirs = _backend_of(folder, record)
    if theirs and theirs != backend:
        raise ConfigError(f"{folder} was written by the {BACKEND_NAMES.get(theirs, theirs)} backend; "
                          f"resume it with --backend {theirs}, or start over with --overwrite")
    if record is None:
        logger.warning(f"note: {folder} does not record its config; cannot check that it is the same run")
        return
    identity, changed = compare(record["config"], cfg_record["config"])
    if identity:
        raise ConfigError(f"{what} {folder} is another run: {'; '.join(identity)}. Resume it with "
                          f"its settings, start over with --overwrite, or set training.output_dir "
                          f"elsewhere")
    if changed:
        logger.warning(f"note: resuming with changed settings, applied from the resumed step on: "
            f"{'; '.join(changed)}")


def _newest_readable(output_dir: Path) -> Path | None:
    damaged = []
    for folder in reversed(checkpoint_folders(output_dir, complete=False)):
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                logger.warning(f"warning: skipping damaged checkpoints ({'; '.join(damaged)}); resuming from "
                    f"{folder.name}, the newest complete and readable one")
            return folder
        damaged.append(f"{folder.name}: {problem}")
    if damaged:
        raise ConfigError(f"--resume: no complete and readable checkpoint in {output_dir} "
                          f"({'; '.join(damaged)}); start over with --overwrite")
    return None


def finished_state(output_dir: Path) -> tuple[dict, Path] | None:
    """(state, folder) of a run in output_dir that reached its last step: the final output
    (unless a later checkpoint continued it), else the newest checkpoint; None otherwise."""
    output_dir = Path(output_dir)
    newest = ([p for p in checkpoint_folders(output_dir) if json_problem(p / STATE_FILE) is None]
              or [None])[-1]
    newest_state = read_state(newest) if newest is not None else {}
    for folder, state in ((output_dir, _final_state(output_dir)), (newest, newest_state)):
        if state and state.get("global_step", 0) >= max(1, state.get("max_steps") or 0) \
                and state["global_step"] >= newest_state.get("global_step", 0):
            return state, folder
    return None


def _final_state(output_dir: Path) -> dict:
    if json_problem(output_dir / STATE_FILE) is not None:
        return {}
    state = read_state(output_dir)
    return state if isinstance(state, dict) else {}


def finished_message(output_dir: Path, state: dict, backend: str | None) -> str:
    method = state.get("method", "run")
    on = f" on {BACKEND_NAMES.get(backend, backend)}" if backend else ""
    return (f"{output_dir} holds a finished {method} run{on} ({state['global_step']}/"
            f"{state['max_steps']} steps); nothing to train. Train it again from scratch with "
            f"--overwrite, or further with --resume and a higher training.max_steps")


def plan_run(cfg, backend: str, *, overwrite: bool = False, main: bool = True) -> RunPlan:
    """Decide, before anything loads, what this command does with training.output_dir."""
    t = cfg.training
    out = Path(t.output_dir)
    if main:
        for path in leftovers(out):  # what a killed save left: never a complete checkpoint
            shutil.rmtree(path, ignore_errors=True)
    record = run_record(cfg, backend)
    if t.resume_from_checkpoint:
        folder = Path(t.resume_from_checkpoint)
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise ConfigError(f"training.resume_from_checkpoint: cannot resume from {folder}: {problem}")
        _check_same_run(folder, record, backend, "training.resume_from_checkpoint:")
        return RunPlan(out, resume=folder)
    existing = checkpoint_folders(out, complete=False)
    done = finished_state(out)
    if overwrite or (not existing and done is None):
        if t.try_resume_from_last_checkpoint and not existing:
            logger.warning(f"note: --resume: no checkpoint in {out} yet; starting a fresh run")
        return RunPlan(out, overwrite=overwrite)
    if done is not None:
        state, folder = done
        theirs = read_record(folder) or read_record(out)
        backend_done = _backend_of(folder, theirs)
        identity, changed = compare(theirs["config"], record["config"]) if theirs else ([], [])
        if identity:
            raise ConfigError(f"{out} holds a finished run with other settings ({'; '.join(identity)}); "
                              f"start over with --overwrite, or set training.output_dir elsewhere")
        if not changed:
            return RunPlan(out, finished=state, messages=[finished_message(out, state, backend_done)])
        if not t.try_resume_from_last_checkpoint:
            raise ConfigError(f"{out} holds a finished run ({state['global_step']}/{state['max_steps']} "
                              f"steps) trained with other settings ({'; '.join(changed)}); add --resume "
                              f"to train it further with the new ones, --overwrite to start over, or "
                              f"set training.output_dir elsewhere")
    elif not t.try_resume_from_last_checkpoint:
        newest = existing[-1].name
        kind = _backend_of(existing[-1], read_record(existing[-1]))
        of = f" of the {BACKEND_NAMES.get(kind, kind)} backend" if kind and kind != backend else ""
        raise ConfigError(f"{out} already holds checkpoints of an unfinished run{of} ({newest}); "
                          f"resume it with --resume, start over with --overwrite, or set "
                          f"training.output_dir elsewhere")
    folder = _newest_readable(out)
    if folder is None:
        raise ConfigError(f"{out} holds a finished run but no checkpoint to continue from; train "
                          f"its adapter further as a new run (--model.model_name {out} "
                          f"--training.output_dir NEW), or start over with --overwrite")
    _check_same_run(folder, record, backend, "--resume:")
    return RunPlan(out, resume=folder)
