"""TRL 1.16's DPO and GRPO loss options, by name, and the checks run when a config loads.

Backend-neutral (no MLX, no torch): `config.py` runs `check_dpo` / `check_grpo` on the resolved
settings, so an option no backend can run stops with one line at load, never at the first step.
The MLX loss tables (`mlxrl/mlx/dpo_loss.py`, `mlxrl/mlx/grpo_loss.py`) are keyed by these names,
and a test holds both to TRL's own lists. Where TRL itself raises in its trainer's `__init__`, the
same condition is refused here; where TRL only warns, the MLX method logs the same note.
"""

from __future__ import annotations

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses built on the chosen-rejected score difference: the only ones f-DPO generalises
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                     "discopop", "sft"})
# per-pair WPO weights would be misaligned by the sorting these losses do (TRL refuses them)
UNWEIGHTABLE_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# TRL 1.16 multiplies these losses by the WPO weights in place, which autograd refuses
TRL_WEIGHTING_FAILS = frozenset({"hinge", "sft"})

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


def _names(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def check_dpo(s) -> None:
    """ValueError for DPO settings (`DpoSettings`) that TRL's DPOConfig/DPOTrainer refuse."""
    names = _names(s.loss_type)
    unknown = [n for n in names if n not in DPO_LOSS_TYPES]
    if unknown or not names:
        raise ValueError(f"DPO loss_type {unknown or names} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if s.loss_weights is not None and len(s.loss_weights) != len(names):
        raise ValueError(f"DPO loss_weights has {len(s.loss_weights)} entries but loss_type has {len(names)}")
    if s.f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"DPO f_divergence_type {s.f_divergence_type!r} is not one of {', '.join(F_DIVERGENCES)}")
    if s.f_divergence_type != "reverse_kl" and not set(names) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"DPO f_divergence_type {s.f_divergence_type!r} only works with loss types "
                         f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))} (got {names})")
    if s.use_weighting and set(names) & UNWEIGHTABLE_LOSS_TYPES:
        raise ValueError("DPO use_weighting does not work with loss_type aot / aot_unpaired "
                         "(they sort the pairs, so the per-pair weights would not line up)")
    failing = sorted(set(names) & TRL_WEIGHTING_FAILS)
    if s.use_weighting and failing:
        raise ValueError(f"DPO use_weighting does not work with loss_type {', '.join(failing)} (TRL 1.16's "
                         f"DPOTrainer fails on it at the first step: an in-place product autograd rejects)")
    if "exo_pair" in names and not 0.0 < s.label_smoothing < 1.0:
        raise ValueError(f"DPO loss_type 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses "
                         f"1e-3), got {s.label_smoothing}")


def check_grpo(s) -> None:
    """ValueError for GRPO settings (`GrpoSettings`) that TRL's GRPOConfig/GRPOTrainer refuse."""
    if s.loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"GRPO loss_type {s.loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}")
    if s.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"GRPO importance_sampling_level {s.importance_sampling_level!r} is not one of "
                         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if not isinstance(s.scale_rewards, bool) and s.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"GRPO scale_rewards {s.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)} "
                         f"(or true / false)")


def grpo_notes(s) -> list[str]:
    """TRL's warnings for GRPO settings that run but depart from their papers' setups."""
    notes = []
    if s.loss_type == "luspo" and s.importance_sampling_level != "sequence":
        notes.append("note: GRPO loss_type 'luspo' is meant for importance_sampling_level 'sequence' "
                     "(the LUSPO paper's setup)")
    if s.loss_type == "vespo" and s.importance_sampling_level != "token":
        notes.append("note: GRPO loss_type 'vespo' computes sequence-level weights itself; "
                     "importance_sampling_level should be 'token'")
    if s.importance_sampling_level == "sequence" and s.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        notes.append(f"note: with importance_sampling_level 'sequence', loss_type {s.loss_type!r} weights "
                     f"each sequence by its length; GSPO's setup is loss_type 'grpo'")
    return notes
