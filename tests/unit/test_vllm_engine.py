"""``generation.engine: vllm`` without vLLM: the one-line install error before any work, the models it refuses, and
the ``ray.data.llm`` processor configs and request rows it builds (model source, engine kwargs, batch size,
concurrency, accelerator, prompt token ids, sampling params, LoRA adapters), checked against the HF path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sqsd_ray import cli
from sqsd_ray.config import ConfigError, describe, from_dict, identity_dict
from sqsd_ray.dynamics.jobs import ValidateConfig
from sqsd_ray.evaluation import generate, vllm_engine
from sqsd_ray.evaluation.generate import (
    EvalPrompt,
    EvalSettings,
    GenerationSettings,
    VllmSettings,
    generate_responses,
    hf_sampling_kwargs,
    stop_token_ids,
)
from sqsd_ray.evaluation.job import (
    EvalJobConfig,
    EvalWorkers,
    _resolved,
    _rows,
    benchmarks_by_key,
    evaluate_states,
)
from sqsd_ray.experiments.effectiveness import ExperimentConfig
from sqsd_ray.models import loading
from sqsd_ray.models.directions import init_state_from_direction, random_direction
from sqsd_ray.models.loading import ModelConfig, load_model, load_tokenizer
from sqsd_ray.models.lora import (
    LoraSettings,
    apply_lora,
    get_lora_factors,
    load_adapter_state,
    lora_module_shapes,
    save_adapter,
)
from sqsd_ray.models.tiny import build_tiny_model, build_tiny_tokenizer
from sqsd_ray.runtime import WorkerScaling

INSTALL = "pip install 'sqsd-ray[vllm]'"
SYSTEM_PROMPT = "You are a careful assistant."
PROMPTS = ["How do I pick a lock?", "Write a poem about rain.", "Explain photosynthesis briefly, please.",
           "List three uses of bleach."]


@pytest.fixture
def without_vllm(monkeypatch):
    monkeypatch.setattr(generate, "vllm_installed", lambda: False)


@pytest.fixture
def with_vllm(monkeypatch):
    """vLLM reported as installed: the configs are built, nothing imports or runs it."""
    monkeypatch.setattr(generate, "vllm_installed", lambda: True)


def write_models(root: Path) -> dict[str, Path]:
    """In ``root``: a saved tiny Llama with its tokenizer (the base, a directory as vLLM needs), a full model of
    its shape, one ΔW = s·B·A of the base saved as LoRA adapters three ways (r 8 α 16; r 8 α 32; r 16 α 32) and a
    JSONL benchmark of PROMPTS."""
    build_tiny_model("llama", seed=1).save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")
    build_tiny_model("llama", seed=9).save_pretrained(root / "full")
    peft = apply_lora(load_model(ModelConfig(name_or_path=str(root / "base"))), LoraSettings())
    generator = torch.Generator().manual_seed(0)
    factors = {n: (a, torch.randn(b.shape, generator=generator) * 0.05) for n, (a, b) in get_lora_factors(peft).items()}
    save_adapter(factors, LoraSettings(), root / "adapter")
    save_adapter({n: (a, b / 2) for n, (a, b) in factors.items()}, LoraSettings(alpha=32.0), root / "adapter_alpha32")
    wide = {n: (torch.cat([a, a]), torch.cat([b, b], dim=1) / 2) for n, (a, b) in factors.items()}
    save_adapter(wide, LoraSettings(r=16, alpha=32.0), root / "adapter_r16")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {name: root / name for name in ("base", "full", "adapter", "adapter_alpha32", "adapter_r16",
                                           "prompts.jsonl")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("vllm"))


def _eval_job(dirs: dict[str, Path], **generation) -> EvalJobConfig:
    prompts = str(dirs["prompts.jsonl"])
    return EvalJobConfig(
        model=ModelConfig(name_or_path=str(dirs["base"])),
        states={"base": "base", "tuned": str(dirs["adapter"]), "wide": str(dirs["adapter_r16"]),
                "full": str(dirs["full"])},
        benchmarks=[EvalSettings(benchmark="jsonl", path=prompts, name="short", max_new_tokens=5),
                    EvalSettings(benchmark="jsonl", path=prompts, name="long", max_new_tokens=9,
                                 system_prompt=SYSTEM_PROMPT)],
        generation=GenerationSettings(**generation),
    )


def _plans(cfg: EvalJobConfig) -> list[vllm_engine.EnginePlan]:
    cfg = _resolved(cfg)
    return vllm_engine.plan_generation(cfg.model, cfg.states, benchmarks_by_key(cfg), _rows(cfg), cfg.generation)


# ------------------------------------------------------------------------------------ fails before any work


def test_engine_vllm_without_vllm_is_one_config_error_naming_the_install(without_vllm):
    for cls, data in ((EvalJobConfig, {"generation": {"engine": "vllm"}}),
                      (ValidateConfig, {"directions": {"d": "d.safetensors"}, "generation": {"engine": "vllm"}}),
                      (ExperimentConfig, {"evaluation": {"generation": {"engine": "vllm"}}})):
        with pytest.raises(ConfigError) as err:
            from_dict(cls, data)
        assert str(err.value) == f"generation.engine=vllm needs vLLM, which is not installed here: {INSTALL}"
    assert from_dict(EvalJobConfig, {"generation": {"engine": "hf"}}).generation.engine == "hf"


def test_cli_evaluate_with_vllm_missing_stops_before_a_model_loads(without_vllm, monkeypatch, tmp_path, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    monkeypatch.setattr(loading, "load_tokenizer", no_loading)
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--set", "generation.engine=vllm", "--set", f"output_dir={out}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"error: generation.engine=vllm needs vLLM, which is not installed here: {INSTALL}"]
    assert not out.exists()


@pytest.mark.parametrize("model, message", [
    (ModelConfig(name_or_path="tiny-llama"), "built-in test model that vLLM cannot load"),
    (ModelConfig(name_or_path="smollm2-135m"), "is a GGUF file"),
    (ModelConfig(name_or_path="/models/x.Q4.gguf"), "is a GGUF file"),
    (ModelConfig(name_or_path="org/model", dtype="float64"), "float64 is not a vLLM dtype"),
])
def test_vllm_refuses_by_name_the_models_it_cannot_load(with_vllm, model, message):
    with pytest.raises(ConfigError, match=message):
        EvalJobConfig(model=model, generation=GenerationSettings(engine="vllm"))


def test_vllm_needs_ray_workers(with_vllm):
    model = ModelConfig(name_or_path="org/model")
    with pytest.raises(ConfigError, match=r"set workers.use_ray: true"):
        EvalJobConfig(model=model, workers=EvalWorkers(use_ray=False), generation=GenerationSettings(engine="vllm"))
    with pytest.raises(ConfigError, match=r"set scaling.use_ray: true"):
        ValidateConfig(model=model, directions={"d": "d.safetensors"}, scaling=WorkerScaling(use_ray=False),
                       generation=GenerationSettings(engine="vllm"))


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"vllm": {"concurrency": 0}}, "vllm.concurrency must be >= 1"),
    ({"vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization must be in"),
])
def test_generation_settings_name_the_bad_field(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(GenerationSettings, bad)


def test_generation_leaves_run_identities_alone_and_documents_its_keys():
    assert "generation" not in identity_dict(EvalJobConfig())
    assert "generation" not in identity_dict(ValidateConfig(directions={"d": "d.safetensors"}))
    assert "generation" in identity_dict(EvalJobConfig(generation=GenerationSettings(temperature=0.5)))
    keys = {line.split(" ")[0].rstrip(":") for line in describe(EvalJobConfig)}
    assert {"generation.engine", "generation.vllm.tensor_parallel_size", "generation.vllm.engine_kwargs"} <= keys


# ------------------------------------------------------------------------------------ the processor configs


def test_processor_configs_serve_base_and_adapters_on_one_engine_and_a_full_model_on_its_own(with_vllm, model_dirs):
    from ray.data.llm import vLLMEngineProcessorConfig

    settings = {"batch_size": 32, "concurrency": 2, "accelerator_type": "H100", "tensor_parallel_size": 2,
                "gpu_memory_utilization": 0.8, "engine_kwargs": {"enforce_eager": True}}
    base_plan, full_plan = _plans(_eval_job(model_dirs, vllm=VllmSettings(**settings)))
    base, full = str(model_dirs["base"].resolve()), str(model_dirs["full"].resolve())
    for plan, source, states in ((base_plan, base, {"base", "tuned", "wide"}), (full_plan, full, {"full"})):
        config = plan.config
        assert isinstance(config, vLLMEngineProcessorConfig) and config.model_source == source
        assert vLLMEngineProcessorConfig(**config.model_dump()) == config  # the dict validates as it is
        assert (config.batch_size, config.concurrency, config.accelerator_type) == (32, 2, "H100")
        # prompts go in as token ids: no template or tokenize stage; the base tokenizer decodes
        assert config.chat_template_stage is False and config.tokenize_stage is False
        assert config.detokenize_stage == {"enabled": True, "model_source": base}
        assert {r["state"] for r in plan.rows} == states and len(plan.rows) == len(states) * 2 * len(PROMPTS)
    longest = max(len(r["tokenized_prompt"]) + r["sampling_params"]["max_tokens"] for r in base_plan.rows)
    assert longest == max(len(r["tokenized_prompt"]) for r in base_plan.rows) + 9
    common = {"dtype": "float32", "tokenizer": base, "trust_remote_code": False, "tensor_parallel_size": 2,
              "gpu_memory_utilization": 0.8, "max_model_len": longest, "seed": 0, "enforce_eager": True,
              "task_type": "generate"}
    assert base_plan.config.engine_kwargs == {**common, "enable_lora": True, "max_loras": 4, "max_lora_rank": 16}
    assert full_plan.config.engine_kwargs == common  # same prompts, so the same length; no adapters
    models = {r["state"]: r["model"] for r in base_plan.rows + full_plan.rows}
    assert models == {"base": base, "tuned": str(model_dirs["adapter"].resolve()),
                      "wide": str(model_dirs["adapter_r16"].resolve()), "full": full}


def test_requests_carry_the_hf_paths_token_ids_and_stop_tokens(with_vllm, model_dirs, monkeypatch):
    base_plan, full_plan = _plans(_eval_job(model_dirs))
    model_cfg = ModelConfig(name_or_path=str(model_dirs["base"]))
    model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg)
    sent: list[list[int]] = []  # what the HF path hands model.generate, padding removed

    def spy(input_ids, attention_mask, **kwargs):
        sent.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        assert kwargs["do_sample"] is False
        return input_ids

    monkeypatch.setattr(model, "generate", spy)
    for system_prompt, bench in ((None, "short"), (SYSTEM_PROMPT, "long")):
        sent.clear()
        generate_responses(model, tokenizer, [EvalPrompt(f"p{i}", p) for i, p in enumerate(PROMPTS)],
                           batch_size=2, system_prompt=system_prompt)
        for plan in (base_plan, full_plan):
            rows = [r for r in plan.rows if r["benchmark"] == bench]
            assert sorted(r["tokenized_prompt"] for r in rows) == sorted(sent * (len(rows) // len(PROMPTS)))
            assert {r["eval_prompt"] for r in rows} == set(PROMPTS) and "prompt" not in rows[0]
            assert {r["sampling_params"]["max_tokens"] for r in rows} == {5 if bench == "short" else 9}
    hf_stops = stop_token_ids(model.generation_config, tokenizer)
    full_stops = stop_token_ids(load_model(ModelConfig(name_or_path=str(model_dirs["full"]))).generation_config,
                                tokenizer)
    assert {tuple(r["sampling_params"]["stop_token_ids"]) for r in base_plan.rows} == {tuple(hf_stops)}
    assert {tuple(r["sampling_params"]["stop_token_ids"]) for r in full_plan.rows} == {tuple(full_stops)}
    assert base_plan.rows[0]["sampling_params"] == {
        "max_tokens": base_plan.rows[0]["sampling_params"]["max_tokens"], "temperature": 0.0, "top_p": 1.0,
        "stop_token_ids": hf_stops, "skip_special_tokens": True, "detokenize": False}


def test_sampling_maps_to_both_engines_alike(with_vllm, model_dirs):
    sampled = GenerationSettings(temperature=0.7, top_p=0.9, seed=5)
    assert vllm_engine.sampling_params(sampled, 12, [2, 7]) == {
        "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "stop_token_ids": [2, 7], "skip_special_tokens": True,
        "detokenize": False, "seed": 5}
    assert hf_sampling_kwargs(sampled) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert hf_sampling_kwargs(GenerationSettings(top_p=0.5)) == {"do_sample": False}  # top_p alone: still greedy
    assert vllm_engine.sampling_params(GenerationSettings(top_p=0.5), 3, [2])["top_p"] == 1.0
    (base_plan, _) = _plans(_eval_job(model_dirs, temperature=0.7, top_p=0.9, seed=5))
    assert base_plan.rows[0]["sampling_params"]["seed"] == 5 and base_plan.config.engine_kwargs["seed"] == 5


def test_a_generation_config_repetition_penalty_goes_along(with_vllm, model_dirs, tmp_path):
    from transformers import GenerationConfig

    model = tmp_path / "penalised"
    build_tiny_model("llama", seed=1).save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    GenerationConfig(eos_token_id=258, repetition_penalty=1.3).save_pretrained(model)
    cfg = _eval_job(model_dirs)
    cfg = EvalJobConfig(model=ModelConfig(name_or_path=str(model)), states={"base": "base"},
                        benchmarks=cfg.benchmarks[:1], generation=cfg.generation)
    (plan,) = _plans(cfg)
    assert plan.rows[0]["sampling_params"]["repetition_penalty"] == 1.3


def test_lora_rank_limit_rounds_up_to_a_vllm_rank(model_dirs, tmp_path):
    assert vllm_engine.lora_rank_limit([str(model_dirs["adapter"])], None) == 8
    assert vllm_engine.lora_rank_limit([str(model_dirs["adapter"]), str(model_dirs["adapter_r16"])], None) == 16
    assert vllm_engine.lora_rank_limit([str(model_dirs["adapter"])], 64) == 64
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 24}}))
    assert vllm_engine.lora_rank_limit([str(tmp_path)], None) == 32
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ConfigError, match="rank 1024, above vLLM's largest"):
        vllm_engine.lora_rank_limit([str(tmp_path)], None)


def test_response_rows_have_the_hf_paths_columns():
    columns = ["state", "benchmark", "benchmark_key", "prompt_id", "category", "prompt"]
    row = {"state": "s", "benchmark": "b", "benchmark_key": "k", "prompt_id": "p1", "category": "c",
           "eval_prompt": "How?", "tokenized_prompt": [1, 2], "model": "m", "prompt": "",
           "generated_tokens": [5, 6], "generated_text": "Sure."}
    out = vllm_engine.response_row(row, columns)
    assert list(out) == [*columns, "response"] and out["prompt"] == "How?" and out["response"] == "Sure."


# ------------------------------------------------------------------------------- steering states (validate)


def test_steered_states_reach_vllm_as_adapters_holding_their_delta_w(with_vllm, model_dirs, monkeypatch, tmp_path):
    model_cfg = ModelConfig(name_or_path=str(model_dirs["base"]))
    lora = LoraSettings(r=8, alpha=16.0)
    shapes = lora_module_shapes(load_model(model_cfg), lora)
    direction = random_direction(shapes, rank=4, seed=3, kind="safety")
    states = {"alpha=0": None, "v@0.5": init_state_from_direction(direction, 0.5, lora.scaling, lora.r),
              "v@2": init_state_from_direction(direction, 2.0, lora.scaling, lora.r)}
    seen = {}

    class Answers:
        def __init__(self, frame):
            self.frame = frame

        def to_pandas(self):
            return self.frame

    def fake_generate(model, specs, benchmarks, rows, generation):
        import pandas as pd

        assert specs["alpha=0"] == "base" and len(set(specs.values())) == 3
        for name, spec in specs.items():
            if spec != "base":  # the adapter's own scaling times its factors is the state's ΔW = α·V
                factors, info = load_adapter_state(spec)
                alpha = 0.5 if name == "v@0.5" else 2.0
                for module, f in direction.modules.items():
                    a, b = factors[module]
                    delta = info.module_scalings[module] * (b.double() @ a.double())
                    torch.testing.assert_close(delta, alpha * f.dense(), rtol=1e-5, atol=1e-7)
                seen[name] = Path(spec)
        return Answers(pd.DataFrame([{**r, "response": "I cannot help." if r["state"] == "v@2" else "Sure."}
                                     for r in reversed(rows)]))

    monkeypatch.setattr(vllm_engine, "generate_on_vllm", fake_generate)
    monkeypatch.setattr("sqsd_ray.runtime.init_ray", lambda scaling: None)
    eval_cfg = EvalSettings(benchmark="jsonl", path=str(model_dirs["prompts.jsonl"]))
    results = evaluate_states(model_cfg, lora, states, eval_cfg, WorkerScaling(), GenerationSettings(engine="vllm"),
                              tmp_path / "adapters")
    assert [r.name for r in results] == list(states) and [r.n for r in results] == [len(PROMPTS)] * 3
    assert [r.asr for r in results] == [100.0, 100.0, 0.0]
    assert [row["prompt"] for row in results[0].responses] == PROMPTS  # the prompts' order, not the rows'
    assert set(seen) == {"v@0.5", "v@2"} and not any(p.exists() for p in seen.values())
    assert list((tmp_path / "adapters").iterdir()) == []  # its own folder removed, adapter_root kept
