"""Adapters to and from Hugging Face PEFT, and fuse, proven by logits.

Each adapter is built by mlxrl's own loader and saved by `save_adapter`, exactly as training
writes it, with random lora_b (and DoRA magnitudes) so that it moves the logits. The reference is
transformers (+ PEFT) in float32 on the same token ids.
"""

import json

import mlx.core as mx  # conftest.py has bound OpenBLAS first (mlxrl.runtime)
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlxrl import adapters
from mlxrl.adapter_maps import AdapterError, FalconH1Map, arch_map
from mlxrl.config import load_config
from mlxrl.mlx import model as mlx_model
from mlxrl.testing import tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TOL = 1e-4  # float32, MLX vs transformers
IDS = np.random.default_rng(0).integers(3, 700, size=(2, 24))  # crosses falcon_h1's chunk of 16
# falcon_h1: PEFT refuses LoRA on a Mamba out_proj, so adapters that export leave it out.
EXCLUDE = {"falcon_h1": ["--peft.lora_exclude_modules", "[out_proj]"]}


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def hf_logits(model_dir, peft_dir=None) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS), use_cache=False).logits.numpy()


def make_adapter(folder, arch, *, dora=False, q_lora=False, num_layers=None, seed=0, base=None):
    """An mlxrl adapter with random lora_b in `folder`; returns (folder, loaded model)."""
    args = ["--model.model_name", str(base or tiny_model(arch)), "--peft.lora_r", "4",
            "--peft.lora_alpha", "16", "--peft.use_dora", str(dora).lower(),
            "--peft.q_lora", str(q_lora).lower(), *EXCLUDE.get(arch, [])]
    cfg = load_config(None, args)
    mx.random.seed(seed)
    loaded = mlx_model.load(cfg.model, cfg.peft if num_layers is None else None,
                            for_training=num_layers is None)
    if num_layers is not None:
        loaded.lora = dict(mlx_model.lora_config(loaded.model, cfg.peft), num_layers=num_layers)
        mlx_model.add_lora(loaded.model, loaded.lora)
    params = tree_flatten(loaded.model.trainable_parameters())
    update = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in params if k.endswith("lora_b")]
    update += [(k, v * (1 + 0.1 * mx.random.normal(v.shape))) for k, v in params if k.endswith(".m")]
    loaded.model.update(tree_unflatten(update))
    loaded.model.eval()
    folder.mkdir(parents=True)
    config = mlx_model.adapter_config_for(loaded, {"method": "dpo", "config": {"beta": 0.1}})
    mlx_model.save_adapter(loaded.model, folder, config)
    return folder, loaded.model


CASES = {  # name: (arch, make_adapter options)
    "qwen2": ("qwen2", {"num_layers": 1}),
    "llama": ("llama", {}),
    "falcon_h1": ("falcon_h1", {}),
    "qwen2-dora": ("qwen2", {"dora": True}),
    "falcon_h1-dora": ("falcon_h1", {"dora": True}),
    "llama-qlora": ("llama", {"q_lora": True}),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """case(name) -> dict(ckpt, model, logits, base_logits, peft): built once per module."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            arch, options = CASES[name]
            ckpt, model = make_adapter(root / "ckpt", arch, **options)
            with mlx_model.adapters_disabled(model):
                base = mlx_logits(model)
            built[name] = dict(ckpt=ckpt, model=model, logits=mlx_logits(model), base_logits=base,
                               peft=adapters.export_peft(ckpt, root / "peft"), root=root)
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_peft_logits(case, name):
    c = case(name)
    config = json.loads((c["peft"] / "adapter_config.json").read_text())
    assert np.abs(c["logits"] - c["base_logits"]).max() > 1e-3  # the adapter does something
    diff = np.abs(c["logits"] - hf_logits(config["base_model_name_or_path"], c["peft"])).max()
    assert diff < TOL, f"{name}: MLX vs transformers+PEFT max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", ["qwen2", "llama", "falcon_h1", "qwen2-dora", "llama-qlora"])
def test_fused_model_matches_through_transformers_alone(case, name):
    c = case(name)
    fused = adapters.fuse(c["ckpt"], c["root"] / "fused")
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert (fused / "tokenizer.json").is_file() and (fused / "generation_config.json").is_file()
    assert "library_name: transformers" in (fused / "README.md").read_text()
    diff = np.abs(c["logits"] - hf_logits(fused)).max()
    assert diff < TOL, f"{name}: fused max abs diff {diff:.2e}"


def test_peft_config_and_names(case):
    c = case("qwen2")  # num_layers=1 of 2: only layer 1 is adapted
    config = json.loads((c["peft"] / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "CAUSAL_LM", 4)
    assert config["lora_alpha"] == 16 and config["use_dora"] is False
    assert config["target_modules"] == sorted(config["target_modules"])
    assert all(m.startswith("model.layers.1.") for m in config["target_modules"])
    assert config["base_model_name_or_path"] == str(tiny_model("qwen2"))
    weights = mx.load(str(c["peft"] / "adapter_model.safetensors"))
    mlx = mx.load(str(c["ckpt"] / "adapters.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    assert weights[f"{key}.lora_A.weight"].shape == (4, 64)
    assert mx.array_equal(weights[f"{key}.lora_B.weight"], mlx["model.layers.1.self_attn.q_proj.lora_b"].T)
    card = (c["peft"] / "README.md").read_text()
    assert "dpo" in card and "beta: 0.1" in card and str(tiny_model("qwen2")) in card


def test_dora_magnitudes_are_exported(case):
    weights = mx.load(str(case("qwen2-dora")["peft"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in weights


def test_falcon_h1_factors_are_needed(case, monkeypatch, tmp_path):
    """Without dividing lora_B by the µP multipliers, transformers computes something else."""
    c = case("falcon_h1")
    monkeypatch.setattr(FalconH1Map, "factor", lambda self, module: 1.0)
    wrong = adapters.export_peft(c["ckpt"], tmp_path / "wrong")
    assert np.abs(c["logits"] - hf_logits(tiny_model("falcon_h1"), wrong)).max() > 1e-3


def test_qlora_exports_against_dequantized_base(case):
    c = case("llama-qlora")
    config = json.loads((c["peft"] / "adapter_config.json").read_text())
    base = c["peft"] / "dequantized_base"
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert "dequantized_base" in (c["peft"] / "README.md").read_text()
    base_config = json.loads((base / "config.json").read_text())
    assert "quantization" not in base_config and base_config["model_type"] == "llama"
    # The dequantized base is what the MLX model computed with: adapters off, same logits.
    assert np.abs(c["base_logits"] - hf_logits(base)).max() < TOL


def test_fuse_quantized_keeps_mlx_quantization(case, tmp_path):
    c = case("llama-qlora")
    out = adapters.fuse(c["ckpt"], tmp_path / "q", quantize=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    assert "transformers cannot load it" in (out / "README.md").read_text()
    model, _ = mlx_lm.load(str(out))
    # Re-quantizing W + dW is lossy (mlx-lm #1172): close to the adapter model, not equal.
    moved = np.abs(c["logits"] - c["base_logits"]).max()
    assert np.abs(mlx_logits(model) - c["logits"]).max() < 0.5 * moved
    with pytest.raises(AdapterError, match="not quantized"):
        adapters.fuse(case("llama")["ckpt"], tmp_path / "no", quantize=True)


@pytest.mark.parametrize("name", ["qwen2", "llama-qlora", "qwen2-dora", "falcon_h1-dora"])
def test_import_of_export_is_the_same_adapter(case, name, tmp_path):
    c = case(name)
    back = adapters.import_peft(c["peft"], tmp_path / "back")
    before = mx.load(str(c["ckpt"] / "adapters.safetensors"))
    after = mx.load(str(back / "adapters.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        if name.startswith("falcon_h1"):  # lora_b / m go through a multiply and a divide
            np.testing.assert_allclose(np.array(after[key]), np.array(before[key]), rtol=2e-7,
                                       atol=0)
        else:
            assert np.array_equal(np.array(after[key]), np.array(before[key])), key
    old = json.loads((c["ckpt"] / "adapter_config.json").read_text())
    new = json.loads((back / "adapter_config.json").read_text())
    assert new["lora_parameters"] == old["lora_parameters"]
    assert (new["fine_tune_type"], new["num_layers"]) == (old["fine_tune_type"], old["num_layers"])


@pytest.mark.parametrize("arch,targets,layers,rslora",
                         [("qwen2", ["q_proj", "v_proj", "down_proj"], [0], True),
                          ("falcon_h1", ["in_proj", "k_proj", "gate_proj", "o_proj"], None, False)])
def test_adapter_made_with_peft_imports(arch, targets, layers, rslora, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, layers_to_transform=layers,
                        use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
        expected = peft_model.eval()(torch.tensor(IDS), use_cache=False).logits.numpy()
    peft_model.save_pretrained(tmp_path / "peft")

    out = adapters.import_peft(tmp_path / "peft", tmp_path / "mlx")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["num_layers"] == 2  # L - the lowest adapted layer index (0), not a count
    assert saved["lora_parameters"]["scale"] == pytest.approx(16 / (2.0 if rslora else 4))
    cfg = load_config(None, ["--model.model_name", str(out)])
    loaded = mlx_model.load(cfg.model)
    diff = np.abs(mlx_logits(loaded.model) - expected).max()
    assert diff < TOL, f"{arch}: PEFT -> MLX max abs diff {diff:.2e}"
    stock, _ = mlx_lm.load(str(tiny_model(arch)), adapter_path=str(out))  # plain mlx-lm too
    # mlx-lm's own ops here, mlxrl's fused CPU ops in mlxrl's model: equal up to float32 rounding
    np.testing.assert_allclose(mlx_logits(stock), mlx_logits(loaded.model), atol=1e-5)


def tiny_qwen3(folder, **sizes):
    """mlxrl.testing has no qwen3: the tiny qwen2 (with `sizes`) without q/k/v biases, with q/k
    RMSNorms."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_model("qwen2", **sizes), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.endswith("proj.bias")}
    rng = np.random.default_rng(1)
    for i in range(config["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            w = 1 + 0.1 * rng.standard_normal(config["head_dim"])
            weights[f"model.layers.{i}.self_attn.{norm}.weight"] = w.astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_qwen3_dora_export_and_fuse(tmp_path):
    base = tiny_qwen3(tmp_path / "qwen3")
    ckpt, model = make_adapter(tmp_path / "ckpt", "qwen3", dora=True, base=base)
    logits = mlx_logits(model)
    assert np.abs(mlx_logits(mlx_lm.load(str(base))[0]) - hf_logits(base)).max() < TOL
    peft = adapters.export_peft(ckpt, tmp_path / "peft")
    assert np.abs(logits - hf_logits(base, peft)).max() < TOL
    assert np.abs(logits - hf_logits(adapters.fuse(ckpt, tmp_path / "fused"))).max() < TOL


def _peft_folder(tmp_path, case, **config_changes):
    """A copy of an exported qwen2 adapter with `config_changes` in its adapter_config.json."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(case("qwen2")["peft"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes,reason", [
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"use_dora": True, "lora_dropout": 0.1}, "DoRA with lora_dropout"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"peft_type": "IA3"}, "only LORA"),
])
def test_import_refuses_what_it_cannot_convert(case, tmp_path, changes, reason):
    folder = _peft_folder(tmp_path, case, **changes)
    with pytest.raises(AdapterError, match=reason):
        adapters.import_peft(folder, tmp_path / "out")


def test_import_refuses_embedding_lora(case, tmp_path):
    folder = _peft_folder(tmp_path, case)
    weights = dict(mx.load(str(folder / "adapter_model.safetensors")))
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = mx.zeros((4, 736))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), weights)
    with pytest.raises(AdapterError, match="lora_embedding_A.*model.layers.N"):
        adapters.import_peft(folder, tmp_path / "out")


def test_export_refusals(tmp_path):
    with pytest.raises(AdapterError, match="model_type 'gpt2' is not supported"):
        arch_map({"model_type": "gpt2"})
    # falcon_h1 with LoRA on the Mamba out_proj (mlxrl's default targets include it).
    falcon, _ = make_adapter(tmp_path / "falcon", "falcon_h1")
    weights = dict(mx.load(str(falcon / "adapters.safetensors")))
    weights["model.layers.0.mamba.out_proj.lora_a"] = mx.zeros((128, 4))
    weights["model.layers.0.mamba.out_proj.lora_b"] = mx.zeros((4, 64))
    mx.save_safetensors(str(falcon / "adapters.safetensors"), weights)
    with pytest.raises(AdapterError, match="mamba.out_proj: PEFT refuses LoRA"):
        adapters.export_peft(falcon, tmp_path / "out")
    config = json.loads((falcon / "adapter_config.json").read_text())
    (falcon / "adapter_config.json").write_text(json.dumps(dict(config, fine_tune_type="full")))
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        adapters.export_peft(falcon, tmp_path / "out2")


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, touches no network."""

    calls: list = []

    def __init__(self, token=None, endpoint="http://127.0.0.1:9"):
        self.endpoint = endpoint

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], files))
        return type("CommitInfo", (), {"commit_url": f"{self.endpoint}/{kwargs['repo_id']}/commit/1"})


def test_push_to_hub_uses_hf_api(case, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = adapters.push_to_hub(case("qwen2")["peft"], "me/tiny-dpo", private=True)
    assert url == "http://127.0.0.1:9/me/tiny-dpo/commit/1"
    assert FakeHfApi.calls[0] == ("create_repo", "me/tiny-dpo",
                                  {"private": True, "repo_type": "model", "exist_ok": True})
    assert FakeHfApi.calls[1] == ("upload_folder", "me/tiny-dpo",
                                  ["README.md", "adapter_config.json", "adapter_model.safetensors"])


def test_push_to_hub_failure_is_one_line(case):
    with pytest.raises(AdapterError, match="push to me/x failed"):  # HF_HUB_OFFLINE=1 in tests
        adapters.push_to_hub(case("qwen2")["peft"], "me/x")


def test_falcon_h1_notes_when_mlx_lm_and_transformers_bases_differ():
    config = json.loads((tiny_model("falcon_h1") / "config.json").read_text())
    assert FalconH1Map(config).notes() == []
    notes = FalconH1Map(dict(config, key_multiplier=0.39, mlp_bias=True)).notes()
    assert "does not fold key_multiplier (0.39)" in notes[0] and "mlp_bias" in notes[1]


@pytest.fixture
def cli():
    from click.testing import CliRunner

    from mlxrl.cli import main

    if "export" not in main.commands:  # until mlxrl/cli.py registers them itself
        from mlxrl.cli_adapters import register

        register(main)
    return lambda *args: CliRunner().invoke(main, [str(a) for a in args])


def test_cli_help(cli):
    for command, text in (("export", "PEFT"), ("import", "refused"), ("fuse", "dequantized")):
        result = cli(command, "--help")
        assert result.exit_code == 0 and text in result.output and "--output" in result.output
    assert "--push-to-hub" in cli("fuse", "--help").output and "--base" in cli("import", "--help").output


def test_cli_export_import_fuse_push(case, cli, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    ckpt = case("llama-qlora")["ckpt"]
    result = cli("export", ckpt, "--format", "peft", "--output", tmp_path / "peft",
                 "--push-to-hub", "me/a")
    assert result.exit_code == 0, result.output
    assert "dequantized base" in result.output and "uploaded to" in result.output
    assert "dequantized_base" in FakeHfApi.calls[1][2]
    result = cli("import", tmp_path / "peft", "--output", tmp_path / "back")
    assert result.exit_code == 0 and (tmp_path / "back" / "adapters.safetensors").is_file()
    result = cli("fuse", ckpt, "--output", tmp_path / "fused")
    assert result.exit_code == 0 and "transformers" in result.output
    result = cli("fuse", ckpt, "--output", tmp_path / "fq", "--quantize")
    assert result.exit_code == 0 and "transformers cannot load it" in result.output


def test_cli_errors_are_one_line(case, cli, tmp_path):
    folder = _peft_folder(tmp_path, case, rank_pattern={"q_proj": 8})
    result = cli("import", folder, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "rank_pattern" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_cli_prints_conversion_notes(case, cli, tmp_path, monkeypatch):
    ckpt = case("falcon_h1")["ckpt"]
    monkeypatch.setattr(FalconH1Map, "notes", lambda self: ["bases differ"])
    result = cli("export", ckpt, "--output", tmp_path / "peft")
    assert result.exit_code == 0 and "note: bases differ" in result.output


@pytest.mark.parametrize("name", ["llama", "qwen2-dora"])
def test_decode_weights_sample_as_transformers_peft_generates(case, name, monkeypatch, decode_blas_threads):
    """The sampler's decode weights (Linux CPU: each linear's weight transposed, a LoRA adapter
    folded in; DoRA layers left as they are) give transformers + PEFT's greedy tokens on the
    exported adapter, log-probs of the unfolded model, and leave nothing behind; the decode of
    these 2 rows runs OpenBLAS on one thread. The rule's other branch (split matmuls, AVX-512)
    is switched off so that this runs on any Linux CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlxrl.mlx import cpu_ops, sampling
    from mlxrl.mlx.logprobs import per_token_logps

    c = case(name)
    model, prompts = c["model"], [IDS[0, :9].tolist(), IDS[1, :5].tolist()]
    monkeypatch.setattr(sampling, "_small_kernels", lambda: False)
    folded, original = [], cpu_ops.set_decode_weights
    monkeypatch.setattr(sampling, "set_decode_weights", lambda m: folded.extend(original(m)) or folded)
    _, threads = decode_blas_threads  # OpenBLAS on 2 threads; 2 rows decode on one of them
    ours = sampling.sample(model, prompts, max_tokens=12, temperature=0.0, eos_token_ids=[])
    assert threads == [1]
    adapted, folded_ids = mlx_model.lora_layers(model), {id(m) for m in folded}
    assert adapted and folded
    assert all((id(m) in folded_ids) is ("m" not in m) for m in adapted)  # DoRA keeps its path
    assert not any(cpu_ops.DECODE_WEIGHT in m for _, m in model.named_modules())
    assert not any(".decode_weight" in k or k == "decode_weight" for k, _ in tree_flatten(model.parameters()))

    config = json.loads((c["peft"] / "adapter_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(c["peft"])).eval()
    for row, prompt in enumerate(prompts):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert ours.tokens[row].tolist() == theirs.tolist(), row
        forced = per_token_logps(model, mx.array([prompt + theirs.tolist()]))[0, len(prompt) - 1:]
        np.testing.assert_allclose(ours.logprobs[row], np.array(forced), atol=1e-4)

    monkeypatch.setattr(sampling, "_openblas_cpu", lambda: False)  # the plain decode
    plain = sampling.sample(model, prompts, max_tokens=12, temperature=0.0, eos_token_ids=[])
    np.testing.assert_array_equal(plain.tokens, ours.tokens)
    np.testing.assert_allclose(plain.logprobs, ours.logprobs, atol=1e-5)
