"""Generation on vLLM engines through ``ray.data.llm`` (``generation.engine: vllm``).

    plan_generation(model, states, benchmarks, rows, generation)   one EnginePlan per engine: its
                                                                    vLLMEngineProcessorConfig and request rows
    generate_on_vllm(...)                                           the plans run: the rows with a ``response``
    evaluate_states_on_vllm(...)                                    ``job.evaluate_states`` for in-memory
                                                                    LoRA states (steering grid of ``directions
                                                                    validate``)

What the HF path (``generate.generate_responses``) does, and how this path matches it:

* Prompts are rendered and tokenised here by the HF path's own ``encode_eval_prompt`` (the job's tokenizer,
  ``model.chat_template`` and ``chat_template_kwargs``, the benchmark's system prompt, the generation prompt) and
  sent as token ids (``tokenized_prompt``); the processor's chat-template and tokenize stages are off. Sending
  text would let vLLM tokenise it again with special tokens added (a second BOS before a template's own), and the
  processor's template stage reads neither ``model.chat_template`` nor its kwargs: token ids are the one input
  that is the same by construction.
* Decoding: temperature 0 is greedy (``do_sample=False``); sampling maps temperature, top_p and seed, top-k off in
  both; ``max_new_tokens`` -> ``max_tokens``; the stop tokens are the HF path's (``generate.stop_token_ids``: the
  model's generation-config eos ids plus the tokenizer's eos); a generation-config ``repetition_penalty``, which
  HF ``generate`` applies on its own, is passed on.
* Responses: the processor's detokenize stage decodes the generated ids with ``batch_decode(...,
  skip_special_tokens=True)``, the HF path's decode. The rows keep the HF path's columns, plus ``response``.
* LoRA states are vLLM LoRA adapters (the adapter dir is the row's ``model``), not merged weights: one engine
  serves every adapter state of a base model, where a merged copy per state would be a full checkpoint and an
  engine start each; and ΔW = s·B·A stays apart from W, as in peft, instead of being rounded into W's dtype. A
  full fine-tuned model (``model/`` of a full fine-tune) gets its own engine.

What may differ is numerics: vLLM's kernels (paged attention, fused LoRA, batch-dependent reductions) are not
the HF kernels, so a near tie between two tokens can break the other way and the answers part from there.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..models.loading import SMOLLM2_ALIAS, ModelConfig
from .generate import (
    EvalPrompt,
    EvalSettings,
    GenerationSettings,
    StateResult,
    check_generation,
    check_vllm_model,
    state_kind,
    encode_eval_prompt,
    score_responses,
    stop_token_ids,
)

log = logging.getLogger(__name__)

# ranks vLLM's LoRA kernels are built for (max_lora_rank must be one of them)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# the vLLM stage pops a row's "prompt" (it would be sent as text), so the benchmark prompt travels under this key
PROMPT_TEXT_KEY = "eval_prompt"


# ------------------------------------------------------------------------------------------ model source


def vllm_model_source(model: ModelConfig) -> str:
    """The hub id or local directory vLLM loads as the base model."""
    from ..models.loading import resolve_model_source

    check_vllm_model(model)
    return resolve_model_source(model).path


def tokenizer_source(model: ModelConfig) -> str:
    """Where the engine and the detokenize stage read the tokenizer: ``model.tokenizer``, else the base model's
    (a full fine-tune's ``model/`` is decoded with it too, as in the HF path)."""
    return str(Path(model.tokenizer).expanduser()) if model.tokenizer else vllm_model_source(model)


def _generation_config(path: str, model: ModelConfig, is_base: bool) -> Any:
    """The generation config ``from_pretrained`` gives the model at ``path``: its generation_config.json, else one
    made from its config.json."""
    from transformers import AutoConfig, GenerationConfig

    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if is_base and model.revision is not None:
        kwargs["revision"] = model.revision
    try:
        return GenerationConfig.from_pretrained(path, **kwargs)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path, **kwargs))


# ------------------------------------------------------------------------------------------ request rows


def sampling_params(generation: GenerationSettings, max_new_tokens: int, stop_ids: Sequence[int],
                    repetition_penalty: float | None = None) -> dict[str, Any]:
    """vLLM ``SamplingParams`` (as the dict the processor takes) of one row: the HF path's decoding."""
    params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": generation.temperature,
                              "top_p": generation.top_p if not generation.greedy else 1.0,
                              "stop_token_ids": [int(i) for i in stop_ids],
                              "skip_special_tokens": True, "detokenize": False}  # the detokenize stage decodes
    if not generation.greedy:
        params["seed"] = generation.seed
    if repetition_penalty is not None and repetition_penalty != 1.0:
        params["repetition_penalty"] = float(repetition_penalty)
    return params


def lora_rank_limit(adapter_dirs: Sequence[str], configured: int | None) -> int:
    """``max_lora_rank``: ``configured``, else the largest rank of the adapters (``r`` and ``rank_pattern``) rounded up
    to a rank vLLM is built for."""
    if configured is not None:
        return configured
    ranks = [8]
    for directory in adapter_dirs:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        ranks += [int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    largest = max(ranks)
    fitting = [r for r in VLLM_LORA_RANKS if r >= largest]
    if not fitting:
        raise ConfigError(f"an adapter has LoRA rank {largest}, above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    return fitting[0]


def engine_kwargs(model: ModelConfig, generation: GenerationSettings, max_model_len: int,
                  adapter_dirs: Sequence[str], is_base: bool) -> dict[str, Any]:
    """vLLM engine arguments: the model's dtype and tokenizer, parallelism and memory from ``generation.vllm``,
    LoRA when the engine serves adapters; ``generation.vllm.engine_kwargs`` last, so they win."""
    settings = generation.vllm
    kwargs: dict[str, Any] = {
        "dtype": model.dtype,
        "tokenizer": tokenizer_source(model),
        "trust_remote_code": model.trust_remote_code,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.max_model_len or max_model_len,
        "seed": generation.seed,
    }
    if is_base and model.revision is not None:
        kwargs["revision"] = model.revision
    if adapter_dirs:
        kwargs.update(enable_lora=True, max_loras=settings.max_loras,
                      max_lora_rank=lora_rank_limit(adapter_dirs, settings.max_lora_rank))
    return {**kwargs, **settings.engine_kwargs}


@dataclass
class EnginePlan:
    """One engine's work: its processor config (``ray.data.llm.vLLMEngineProcessorConfig``) and the rows it is sent
    (the job's row columns, the prompt under ``PROMPT_TEXT_KEY``, ``tokenized_prompt``, ``sampling_params`` and the
    ``model``: the base model, or a LoRA adapter dir)."""

    config: Any
    rows: list[dict[str, Any]]


def plan_generation(
    model: ModelConfig, states: Mapping[str, str], benchmarks: Mapping[str, EvalSettings],
    rows: Sequence[Mapping[str, Any]], generation: GenerationSettings,
) -> list[EnginePlan]:
    """The engines that answer ``rows`` (``evaluation.job`` rows: state, benchmark_key, prompt_id, prompt, ...):
    one for the base model and its adapter states, one per full fine-tuned model. Nothing runs; only tokenizers
    and generation configs are read. ``states`` maps a name to 'base', an adapter dir or a model dir."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from ..models.loading import load_tokenizer

    base = vllm_model_source(model)
    tokenizer = load_tokenizer(model)
    token_ids: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        key = (row["benchmark_key"], row["prompt_id"])
        if key not in token_ids:
            bench = benchmarks[row["benchmark_key"]]
            token_ids[key] = encode_eval_prompt(EvalPrompt(row["prompt_id"], row["prompt"]), tokenizer,
                                                bench.system_prompt)
    kinds = {name: state_kind(spec) for name, spec in states.items()}
    # engine source -> its states: the base model serves θ0 and every adapter; a full model serves itself
    engines: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        engines.setdefault(states[name] if kind == "full" else base, []).append(name)
    plans = []
    for source, state_names in engines.items():
        names = set(state_names)
        is_base = source == base
        generation_config = _generation_config(source, model, is_base)
        stop_ids = stop_token_ids(generation_config, tokenizer)
        penalty = getattr(generation_config, "repetition_penalty", None)
        adapters = sorted({states[n] for n in names if kinds[n] == "adapter"})
        requests = []
        for row in rows:
            if row["state"] not in names:
                continue
            bench = benchmarks[row["benchmark_key"]]
            ids = token_ids[(row["benchmark_key"], row["prompt_id"])]
            request = {(PROMPT_TEXT_KEY if k == "prompt" else k): v for k, v in row.items()}
            request.update(tokenized_prompt=ids, model=states[row["state"]] if kinds[row["state"]] == "adapter"
                           else source, sampling_params=sampling_params(generation, bench.max_new_tokens, stop_ids,
                                                                        penalty))
            requests.append(request)
        longest = max(len(r["tokenized_prompt"]) + r["sampling_params"]["max_tokens"] for r in requests)
        config = vLLMEngineProcessorConfig(
            model_source=source,
            engine_kwargs=engine_kwargs(model, generation, longest, adapters, is_base),
            batch_size=generation.vllm.batch_size,
            concurrency=generation.vllm.concurrency,
            accelerator_type=generation.vllm.accelerator_type,
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage={"enabled": True, "model_source": tokenizer_source(model)},
        )
        plans.append(EnginePlan(config, requests))
    return plans


def response_row(row: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """An engine's output row as the HF path writes it: the job's columns and ``response``."""
    out = {c: row[PROMPT_TEXT_KEY] if c == "prompt" else row[c] for c in columns}
    out["response"] = row["generated_text"]
    return out


# ---------------------------------------------------------------------------------------------- running


def generate_on_vllm(
    model: ModelConfig, states: Mapping[str, str], benchmarks: Mapping[str, EvalSettings],
    rows: Sequence[Mapping[str, Any]], generation: GenerationSettings,
) -> Any:
    """``rows`` with a ``response`` column, as a Ray Dataset, generated by vLLM engines on the Ray cluster this
    process is attached to. The engines run one after the other, each to the end, so that one at a time holds
    the GPUs (and the judges after them find those free)."""
    import ray.data
    from ray.data.llm import build_processor

    if not rows:
        raise ValueError("generate_on_vllm: no rows to answer")
    columns = list(rows[0])
    parts = []
    for plan in plan_generation(model, states, benchmarks, rows, generation):
        log.info("vLLM engine %s: %d rows", plan.config.model_source, len(plan.rows))
        processor = build_processor(plan.config, postprocess=functools.partial(response_row, columns=columns))
        parts.append(processor(ray.data.from_items(plan.rows)).materialize())
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def evaluate_states_on_vllm(
    model: ModelConfig, lora: Any, states: Mapping[str, Any], eval_cfg: EvalSettings, prompts: Sequence[EvalPrompt],
    scaling: Any, generation: GenerationSettings, adapter_root: str | Path | None = None,
) -> list[StateResult]:
    """``job.evaluate_states`` on vLLM: each state's LoRA factors (None = θ0) are written as a peft adapter
    (``models.lora.save_adapter``: s·B·A is the state's ΔW) in a new folder under ``adapter_root`` (default the
    system's temporary folder), which the engines must be able to read, removed when the answers are in. Results
    keep the order of ``states``."""
    from ..models.loading import with_absolute_paths
    from ..models.lora import save_adapter
    from ..runtime import init_ray

    check_generation(generation, model, scaling.use_ray, "scaling")
    model = with_absolute_paths(model)
    if adapter_root is not None:
        Path(adapter_root).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="sqsd-vllm-adapters-", dir=adapter_root))  # a folder of its own to remove
    try:
        specs = {name: "base" if factors is None else
                 str(save_adapter(factors, lora, root / f"state{i:04d}", model.name_or_path).resolve())
                 for i, (name, factors) in enumerate(states.items())}
        rows = [{"state": name, "benchmark": eval_cfg.label, "benchmark_key": eval_cfg.label,
                 "prompt_id": p.prompt_id, "category": p.category, "prompt": p.prompt} for name in states
                for p in prompts]
        init_ray(scaling)
        frame = generate_on_vllm(model, specs, {eval_cfg.label: eval_cfg}, rows, generation).to_pandas()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    answers = {(s, p): r for s, p, r in zip(frame["state"], frame["prompt_id"], frame["response"])}
    results = []
    for name in states:
        result = score_responses(name, prompts, [answers[(name, p.prompt_id)] for p in prompts])
        log.info("state %s: %d responses (keyword ASR %.1f %%)", name, result.n, result.asr)
        results.append(result)
    return results


__all__ = [
    "PROMPT_TEXT_KEY",
    "EnginePlan",
    "engine_kwargs",
    "evaluate_states_on_vllm",
    "generate_on_vllm",
    "lora_rank_limit",
    "plan_generation",
    "response_row",
    "sampling_params",
    "tokenizer_source",
    "vllm_model_source",
]
