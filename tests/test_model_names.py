"""mlxrl.model_names.resolve: the one reading of a model name, for both backends and every command.
Adapter folders come from PEFT's own `save_pretrained` and from mlxrl's MLX training."""

import json

import pytest

from mlxrl.config import ModelParams, PeftParams
from mlxrl.errors import ModelError
from mlxrl.mlx import model as mlx_model
from mlxrl.model_names import resolve
from mlxrl.tiny_models import tiny_model
from mlxrl.torch import model as torch_model


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """A LoRA adapter as PEFT saves it, on the tiny model loaded by transformers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("peft")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model("qwen2")))
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


def test_plain_names():
    ref = resolve("tiny://qwen2")
    assert (ref.base_name, ref.base_path, ref.adapter_path) == ("tiny://qwen2", tiny_model("qwen2"), None)
    folder = str(tiny_model("llama"))
    assert resolve(folder).base_path == tiny_model("llama") and resolve(folder).adapter_format is None
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve("no-such-owner/no-such-model")


def test_a_peft_folder_names_its_base(peft_folder):
    ref = resolve(str(peft_folder))
    assert ref.adapter_format == "peft" and ref.adapter_path == peft_folder
    assert ref.base_path == tiny_model("qwen2")  # base_model_name_or_path, as PEFT wrote it
    assert torch_model.resolve(str(peft_folder)) == ref  # the torch backend takes it as it is


def test_mlx_trains_on_from_a_peft_folder_converted_once(peft_folder):
    first = mlx_model.load(ModelParams(model_name=str(peft_folder)), PeftParams(), for_training=True)
    again = mlx_model.load(ModelParams(model_name=str(peft_folder)))
    assert first.adapter_path == again.adapter_path and first.adapter_path.parent.name == "imported"
    assert first.lora["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    trainable, _ = mlx_model.trainable_count(first.model)
    assert trainable > 0 and first.base_name == str(tiny_model("qwen2"))


def test_an_mlx_adapter_folder_names_its_base_and_torch_refuses_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"model": "tiny://llama", "fine_tune_type": "lora"}))
    ref = resolve(str(folder))  # mlx-lm's own key; mlxrl's checkpoints also write mlxrl.base_model
    assert (ref.adapter_format, ref.base_name, ref.base_path) == ("mlx", "tiny://llama", tiny_model("llama"))
    with pytest.raises(ModelError, match=f"mlxrl export {folder} --format peft"):
        torch_model.resolve(str(folder))


@pytest.mark.parametrize("text, message", [
    ("{}", "does not name its base model"),
    ("{\"model\": 1,", "adapter_config.json:1: not valid JSON"),
])
def test_broken_adapter_folders_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ModelError, match=message):
        resolve(str(tmp_path))
