"""Full fine-tuning on MLX (`training.use_peft: false`): every weight trains, and each checkpoint
and the final model is a Hugging Face model folder.

    config.json, model.safetensors       the trained weights in transformers' names and layout
                                         (`mlxrl.adapter_maps`: qwen2, qwen3, llama, falcon_h1;
                                         mlx-lm's own names for other architectures, with a note)
    tokenizer files, generation_config.json
                                         the tokenizer as the run configured it (chat template,
                                         pad token), so `mlxrl infer` renders what training saw

transformers' `AutoModelForCausalLM` and `mlx_lm.load` read the folder as they read the base;
a checkpoint adds `optimizer.safetensors`, `trainer_state.json` and `mlxrl_run.json`
(`mlxrl.mlx.checkpoint`). `read` loads the weights back through mlx-lm's own `sanitize`, so a
resume continues from the weights training left: bit for bit where transformers' layout is
mlx-lm's (qwen2, qwen3, llama and most mlx-lm architectures); falcon_h1's µP multipliers are
divided out and multiplied back, which may move a weight by one float rounding.

The references a full fine-tune needs (the adapter-off model does not exist): DPO precomputes the
starting model's log-probs (`mlxrl.mlx.dpo`); GRPO with `beta > 0` keeps `frozen_copy`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxrl.adapter_maps import SUPPORTED, arch_map
from mlxrl.data.formats import unwrap

MODEL_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "generation_config.json")
_CUSTOM_CODE = "*.py"  # a trust_remote_code architecture travels with its config
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class FullModelFiles:
    """The files of a full fine-tune: `write(folder)` the model as it is now, `read(folder)` it
    back into the model being trained (an exact resume)."""

    def __init__(self, loaded):
        self.model, self.base_path = loaded.model, Path(loaded.base_path)
        self.tokenizer = unwrap(loaded.tokenizer)
        self.config = json.loads((self.base_path / "config.json").read_text())
        model_type = self.config.get("model_type")
        self.amap = arch_map(self.config) if model_type in SUPPORTED else None

    def notes(self) -> list[str]:
        """What the user should know about the saved folder, once, at the start of a run."""
        if self.amap is None:
            return [f"note: training.use_peft: false: {self.config.get('model_type')} models are "
                    f"saved with mlx-lm's tensor names (mlx_lm.load reads them; transformers where "
                    f"they are its own names, as for most architectures; mlxrl checks transformers "
                    f"loading for {', '.join(SUPPORTED)})"]
        return [f"note: {n}" for n in self.amap.notes()]

    def write(self, folder: Path) -> None:
        from mlxrl.adapters import _save_weights

        weights = dict(tree_flatten(self.model.parameters()))
        config = {k: v for k, v in self.config.items() if k not in ("quantization", "quantization_config")}
        if self.amap is not None:
            weights, config = self.amap.hf_weights(weights), self.amap.hf_config(config)
        dtype = str(next(iter(weights.values())).dtype).split(".")[-1]
        config["torch_dtype"] = config["dtype"] = dtype
        _save_weights(folder, weights, {"format": "pt" if self.amap is not None else "mlx"})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save_pretrained(str(folder))
        (folder / "generation_config.json").write_text(json.dumps(self._generation_config(), indent=2) + "\n")
        for path in self.base_path.glob(_CUSTOM_CODE):
            shutil.copy(path, folder / path.name)

    def _generation_config(self) -> dict:
        """The base's generation_config.json, else what transformers derives from config.json."""
        path = self.base_path / "generation_config.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {k: self.config[k] for k in _GENERATION_KEYS if self.config.get(k) is not None}

    def read(self, folder: Path) -> None:
        weights = {}
        for path in sorted(Path(folder).glob("model*.safetensors")):
            weights.update(mx.load(str(path)))
        if hasattr(self.model, "sanitize"):
            weights = self.model.sanitize(weights)  # what mlx_lm.load does with the folder
        self.model.load_weights(list(weights.items()), strict=True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, frozen, for a reference policy (GRPO's KL with `beta > 0`).

    The copy shares the weight arrays (MLX arrays are never changed in place: an update makes new
    ones), so it costs nothing until the first update, then one copy of the weights in the
    model's dtype (no gradients, no optimizer state)."""
    shared = {id(a): a for _, a in tree_flatten(model.parameters())}
    ref = copy.deepcopy(model, shared)
    ref.freeze()
    ref.eval()
    for layer in getattr(ref, "layers", []):
        if hasattr(layer, "grad_checkpoint"):
            layer.grad_checkpoint = False  # forward only: nothing to recompute
    return ref
