"""Training examples: a corpus tokenised for SFT or DPO, and the refusal set SPF projects against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..data.records import DataConfig, DataReport, Sample, load_samples
from ..data.tokenize import TokenizedSample, tokenize_samples
from .spf import DEFAULT_REFUSAL_PAIR, SpfSettings


@dataclass
class TrainingExample:
    """One SFT sample, or one DPO pair (``rejected`` set; same prompt tokens)."""

    chosen: TokenizedSample
    rejected: TokenizedSample | None = None

    @property
    def sample_id(self) -> str:
        return self.chosen.sample_id


def load_training_examples(data: DataConfig, tokenizer: Any, objective: str) -> tuple[list[TrainingExample], DataReport]:
    """Samples (SFT) or preference pairs (DPO) of ``data``, tokenised with response-only labels.

    A DPO pair is kept only if both sides fit ``max_length`` under the data's overlong policy; a dropped
    pair is counted in the report like any other skipped sample.
    """
    samples, report = load_samples(data)
    if objective == "sft":
        return [TrainingExample(t) for t in tokenize_samples(samples, tokenizer, data, report)], report
    missing = [s for s in samples if s.rejected is None]
    if missing:
        raise ConfigError(
            f"train.objective=dpo needs preference pairs (prompt, chosen, rejected), but {missing[0].source} has "
            "no rejected response; use data.schema: preference or a preference preset (e.g. pku_saferlhf_pairs)"
        )
    chosen = {t.sample_id: t for t in tokenize_samples(samples, tokenizer, data, report)}
    rejected_report = DataReport(source=report.source)
    rejected_report.kept = len(samples)
    rejected = {t.sample_id: t for t in tokenize_samples([s.rejected_sample() for s in samples], tokenizer, data,
                                                         rejected_report)}
    examples = [TrainingExample(chosen[s.sample_id], rejected[s.sample_id])
                for s in samples if s.sample_id in chosen and s.sample_id in rejected]
    # a pair whose chosen side fit but whose rejected side did not goes too, counted under the rejected side's
    # reason (rejected_overlong, rejected_prompt_too_long) with its message
    dropped = len(chosen) - len(examples)
    if dropped:
        report.kept -= dropped
        for reason, count in rejected_report.skipped.items():
            report.skipped[f"rejected_{reason}"] = report.skipped.get(f"rejected_{reason}", 0) + count
            report.examples.setdefault(f"rejected_{reason}", []).extend(rejected_report.examples.get(reason, []))
        report.skipped = {k: v for k, v in report.skipped.items() if v}
    report.truncated += rejected_report.truncated
    return examples, report


def load_refusal_examples(spf: SpfSettings, data: DataConfig, tokenizer: Any) -> list[TrainingExample]:
    """SPF's safety set: harmful requests answered with refusals (``spf.safety_path``, or the built-in pair),
    tokenised like the fine-tuning data (same template, system prompt and length limit)."""
    if spf.safety_path is None:
        samples = [Sample(sample_id="spf-default-refusal", messages=tuple(DEFAULT_REFUSAL_PAIR["messages"]),
                          response=DEFAULT_REFUSAL_PAIR["response"], source="built-in refusal pair")]
        report = DataReport(source="built-in refusal pair")
        report.kept = 1
    else:
        safety_data = DataConfig(path=spf.safety_path, system_prompt=data.system_prompt, max_length=data.max_length)
        samples, report = load_samples(safety_data)
    tokenized = tokenize_samples(samples, tokenizer, data, report)
    if not tokenized:
        raise ConfigError(f"train.spf.safety_path {spf.safety_path}: the refusal set is empty (no harmful request "
                          f"+ refusal record left after reading it):\n{report.summary()}")
    return [TrainingExample(t) for t in tokenized]
