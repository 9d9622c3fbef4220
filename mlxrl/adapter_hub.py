"""Model cards (README.md) for exported adapters and fused models, and uploads to the hub."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlxrl.adapter_maps import AdapterError

_USAGE = {
    "adapter": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_base}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
```""",
    "fused": """```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")
```""",
    "mlx": """```python
from mlx_lm import load

model, tokenizer = load("<this repo or folder>")
```""",
}


def model_card(kind: str, base_name: str, load_base: str, mlxrl_block: dict,
               notes: list[str]) -> str:
    """`kind`: "adapter" (PEFT), "fused" (transformers) or "mlx" (MLX-quantized fused model)."""
    method = mlxrl_block.get("method") or "unknown"
    library = {"adapter": "peft", "fused": "transformers", "mlx": "mlx"}[kind]
    front = {"library_name": library, "tags": ["mlxrl", "lora", str(method)]}
    if _is_hub_id(base_name):  # the hub rejects local paths in base_model
        front = {"base_model": base_name, **front}
    what = {"adapter": "A LoRA adapter (Hugging Face PEFT format)",
            "fused": "A LoRA adapter merged into its base model",
            "mlx": "A LoRA adapter merged into its MLX-quantized base model"}[kind]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {what}", "", f"Trained with mlxrl by **{method}** on base model `{base_name}`.", "", "## Use", "",
             _USAGE[kind].replace("{load_base}", load_base), ""]
    if load_base != base_name:
        lines += [f"Load it on `{load_base}`: the adapter was trained on a quantized base and is "
                  f"exact on its dequantized weights (the original `{base_name}` is only close). "
                  "From the hub: `AutoModelForCausalLM.from_pretrained(repo, "
                  "subfolder=\"dequantized_base\")`.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if mlxrl_block.get("quantization"):
        q = mlxrl_block["quantization"]
        source = " (the base GGUF file's own blocks)" if q.get("source") == "gguf" else ""
        lines += [f"Base quantization during training: MLX affine, {q.get('bits')} bits, "
                  f"group size {q.get('group_size')}{source}.", ""]
    config = mlxrl_block.get("config")
    if config:
        lines += ["## Training config", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _is_hub_id(name: str) -> bool:
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not Path(name).expanduser().exists())


def push_to_hub(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload `folder`; returns the commit URL.

    `folder` is an export or fuse output (its README.md is the model card).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise AdapterError(f"{folder} has no README.md model card; push an `mlxrl export` or "
                           "`mlxrl fuse` output")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 revision=revision,
                                 commit_message=commit_message or "Upload with mlxrl")
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; report them in one line
        raise AdapterError(f"push to {repo_id} failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}"
