"""Which linear layers get LoRA adapters: one rule for both backends."""

from __future__ import annotations

from mlxrl.errors import ModelError


def select_lora_targets(available: list[str], peft_params) -> list[str]:
    """Block-relative module names (e.g. `self_attn.q_proj`) to adapt, from the `peft` section.

    Default: every linear layer of the blocks except Mamba's out_proj (PEFT cannot target it, so
    such an adapter could not be exported; Falcon-H1 recipes elsewhere leave it out too). Targets
    match a full block-relative name or its last part (`q_proj`).
    """
    targets = peft_params.lora_target_modules
    if targets in (None, [], "all-linear", ["all-linear"]):
        keys = [k for k in available if not k.endswith("mamba.out_proj")]
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        keys = [k for k in available if k in wanted or k.split(".")[-1] in wanted]
        missing = [t for t in wanted if not any(k == t or k.split(".")[-1] == t for k in available)]
        if missing:
            short = sorted({k.split(".")[-1] for k in available})
            raise ModelError(f"peft.lora_target_modules {missing} not found in the model; "
                             f"its linear layers are {short}")
    if peft_params.lora_exclude_modules:
        keys = [k for k in keys if k.split(".")[-1] not in peft_params.lora_exclude_modules]
    return keys
