"""`evaluate` with ``generation.engine: vllm`` through the real ``ray.data.llm`` processor (its preprocess, detokenize
and postprocess stages, our request and response rows), with the vLLM stage's engine replaced by a stand-in that
keeps vLLM's contract (prompt token ids, sampling params and a LoRA adapter dir in, generated token ids out) and
decodes greedily with transformers + peft on the CPU. Everything but vLLM's kernels is the real path, so its
responses and verdicts must be the HF path's, to the character."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sqsd_ray.evaluation import generate
from sqsd_ray.evaluation.generate import EvalSettings, GenerationSettings
from sqsd_ray.evaluation.job import EvalJobConfig, EvalWorkers, run_evaluate
from sqsd_ray.models.loading import ModelConfig
from tests.unit.test_vllm_engine import PROMPTS, write_models

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def stand_in_engine():
    """A vLLM engine stage UDF that answers with transformers generate, one row at a time (defined here, in a
    function, so that Ray ships the class by value to its actor)."""
    from ray.llm._internal.batch.stages.base import StatefulStageUDF

    class TransformersEngine(StatefulStageUDF):
        def __init__(self, data_column, expected_input_keys, model, engine_kwargs, **_):
            super().__init__(data_column, expected_input_keys)
            self.source, self.dtype = model, getattr(torch, engine_kwargs["dtype"])
            self.models = {}

        def _model(self, name: str):
            """The base model for the engine's own source, else the base with the LoRA adapter dir ``name``."""
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            if name not in self.models:
                base = AutoModelForCausalLM.from_pretrained(self.source, dtype=self.dtype).eval()
                self.models[name] = base if name == self.source else PeftModel.from_pretrained(base, name).eval()
            return self.models[name]

        async def udf(self, batch):
            for row in batch:
                params = row["sampling_params"]
                assert params["temperature"] == 0 and params["skip_special_tokens"]
                stops = [int(i) for i in params["stop_token_ids"]]
                ids = torch.tensor([[int(i) for i in row["tokenized_prompt"]]])
                with torch.no_grad():
                    out = self._model(row["model"]).generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(params["max_tokens"]),
                        do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
                yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                       "generated_tokens": out[0, ids.shape[1]:].tolist()}

    return TransformersEngine


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """vLLM reported installed; every processor ``build_processor`` makes gets the stand-in engine, on no GPU."""
    import ray.data.llm

    build = ray.data.llm.build_processor
    engine = stand_in_engine()

    def with_stand_in(config, **kwargs):
        processor = build(config, **kwargs)
        stage = processor.stages["vLLMEngineStage"]
        stage.fn = engine
        stage.map_batches_kwargs.update(num_gpus=0, num_cpus=0.25)
        processor.stages["DetokenizeStage"].map_batches_kwargs["num_cpus"] = 0.25
        return processor

    monkeypatch.setattr(generate, "vllm_installed", lambda: True)
    monkeypatch.setattr(ray.data.llm, "build_processor", with_stand_in)


def test_vllm_path_answers_and_judges_as_the_hf_path(local_ray, stand_in_vllm, tmp_path):
    dirs = write_models(tmp_path)
    prompts = str(dirs["prompts.jsonl"])
    # tuned_alpha32 holds tuned's ΔW with α = 32: vLLM reads an adapter's own scaling, the HF path rescales B
    cfg = dict(model=ModelConfig(name_or_path=str(dirs["base"])),
               states={"base": "base", "tuned": str(dirs["adapter"]), "tuned_alpha32": str(dirs["adapter_alpha32"]),
                       "full": str(dirs["full"])},
               benchmarks=[EvalSettings(benchmark="jsonl", path=prompts, name="plain", max_new_tokens=6),
                           EvalSettings(benchmark="jsonl", path=prompts, name="system", max_new_tokens=4,
                                        system_prompt="Answer in one word.")])
    hf = run_evaluate(EvalJobConfig(**cfg, workers=EvalWorkers(use_ray=False), output_dir=str(tmp_path / "hf")))
    vllm = run_evaluate(EvalJobConfig(**cfg, workers=EvalWorkers(cpus_per_actor=0.5),
                                      generation=GenerationSettings(engine="vllm"), output_dir=str(tmp_path / "vllm")))
    a, b = pd.read_parquet(hf / "responses.parquet"), pd.read_parquet(vllm / "responses.parquet")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 4 * 2 * len(PROMPTS)
    # the same table, once missing values are spelt alike (a frame through Ray Data has None or NA where an
    # in-process one has NaN: the keyword judge's empty score column)
    same = [f.astype(object).where(f.notna(), None).reset_index(drop=True) for f in (a, b)]
    pd.testing.assert_frame_equal(*same)
    # the adapter changes the answers (LoRA was applied) and full is another model
    assert len({tuple(a[a["state"] == s]["response"]) for s in ("base", "tuned", "full")}) == 3
    pd.testing.assert_frame_equal(pd.read_csv(hf / "metrics.csv"), pd.read_csv(vllm / "metrics.csv"))
