"""Tokenising: render a sample with the model's chat template, label only the response, batch and pad.

Pipeline::

    tokenize_samples(samples, tok, cfg, report)    -> list[TokenizedSample] (labels -100 on the prompt)
    encode_prompt(sample, tok)                     -> prompt ids for generation (the same render as training)
    length_sorted_batches(...), collate(...)       -> padded torch batches

The prompt/response token boundary is exact: the chat template renders the prompt (with the generation prompt)
and the full conversation as text; the response is the text suffix after the prompt, and the two parts are
tokenised separately and concatenated, instead of searching for the boundary in one tokenisation. The
end-of-turn token is supervised (the model must learn to stop); whitespace the template puts after a final eos
(ChatML's newline after ``<|im_end|>``) is dropped, as the model never generates it.

Every render passes the tokenizer's extra template variables (``model.chat_template_kwargs``, attached by
``models.loading.load_tokenizer`` through :func:`set_chat_template_kwargs`) to ``apply_chat_template``, so
training, scoring and generation see the same text. For Qwen3, ``enable_thinking: false`` moves the empty
``<think>`` block from the supervised response into the prompt (why: docs/scoring.md, Qwen3's think block).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .location import DataError
from .records import DataConfig, DataReport, Sample

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100  # label value the HF/torch cross-entropy ignores
CHAT_TEMPLATE_KWARGS_ATTR = "sqsd_chat_template_kwargs"  # tokenizer attribute read by every render here


@dataclass
class TokenizedSample:
    """Token ids of prompt + response; ``labels`` are -100 on the prompt tokens and equal ``input_ids`` after."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    n_prompt_tokens: int
    n_response_tokens: int  # supervised tokens actually kept (after any truncation)
    truncated: bool
    weight: float = 1.0  # per-sample loss weight, from Sample.weight

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot give an exact prompt/response boundary."""


FALLBACK_FORMAT_DOC = (
    "system turn: '{content}\\n\\n'; user turn: '### Instruction:\\n{content}\\n\\n'; earlier assistant turn: "
    "'### Response:\\n{content}{eos}\\n\\n'; the prompt ends with '### Response:\\n' and the response is "
    "'{response}{eos}'"
)


_warned_no_template = False


def _render_fallback(sample: Sample, eos: str) -> tuple[str, str]:
    blocks = []
    for turn in sample.messages:
        if turn["role"] == "system":
            blocks.append(f"{turn['content']}\n\n")
        elif turn["role"] == "user":
            blocks.append(f"### Instruction:\n{turn['content']}\n\n")
        else:
            blocks.append(f"### Response:\n{turn['content']}{eos}\n\n")
    return "".join(blocks) + "### Response:\n", sample.response + eos


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _has_chat_template(tokenizer: Any) -> bool:
    global _warned_no_template
    if getattr(tokenizer, "chat_template", None):
        return True
    if not _warned_no_template:
        logger.warning("tokenizer %s has no chat template; using the plain fallback format: %s",
                       _tokenizer_name(tokenizer), FALLBACK_FORMAT_DOC)
        _warned_no_template = True
    return False


def set_chat_template_kwargs(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """Attach extra chat-template variables (e.g. ``{"enable_thinking": False}``) to ``tokenizer``; every render
    in this module passes them to ``apply_chat_template``. A plain attribute, so it survives pickling to Ray."""
    setattr(tokenizer, CHAT_TEMPLATE_KWARGS_ATTR, dict(kwargs))


def chat_template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The extra chat-template variables attached by :func:`set_chat_template_kwargs` ({} if none)."""
    return dict(getattr(tokenizer, CHAT_TEMPLATE_KWARGS_ATTR, None) or {})


def _render_prompt(sample: Sample, tokenizer: Any) -> str:
    """The prompt turns as text ending with the generation prompt (the prompt half of the training render)."""
    if not _has_chat_template(tokenizer):
        return _render_fallback(sample, tokenizer.eos_token or "")[0]
    return tokenizer.apply_chat_template(list(sample.messages), add_generation_prompt=True, tokenize=False,
                                         **chat_template_kwargs(tokenizer))


def render_prompt_and_response(sample: Sample, tokenizer: Any) -> tuple[str, str]:
    """(prompt text ending with the generation prompt, response text including the end-of-turn token).

    The response text is what the chat template appends after the generation prompt when the response is added
    as the final assistant turn, so it includes the end-of-turn token (supervised: the model must learn to stop).
    Whitespace the template puts *after* a final eos token (ChatML's newline after ``<|im_end|>``) is dropped:
    the model stops at eos and never generates it, so it would only add a meaningless near-zero-loss token.
    Fixed text a template puts there is supervised too: Qwen3's empty think block, unless ``enable_thinking``
    is false (then the generation prompt holds it). Without a chat template, the plain format in
    ``FALLBACK_FORMAT_DOC`` is used (warned once per process).
    """
    eos = tokenizer.eos_token or ""
    if not _has_chat_template(tokenizer):
        return _render_fallback(sample, eos)
    prompt_text = _render_prompt(sample, tokenizer)
    full_text = tokenizer.apply_chat_template(sample.conversation(), tokenize=False, **chat_template_kwargs(tokenizer))
    if not full_text.startswith(prompt_text):
        at = next((i for i, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b), len(prompt_text))
        raise ChatTemplateError(
            f"chat template of tokenizer {_tokenizer_name(tokenizer)!r} does not render "
            f"the prompt (add_generation_prompt=True) as a prefix of the full conversation (sample {sample.sample_id}, "
            f"{sample.source}); they differ at character {at}: prompt {prompt_text[at:at + 40]!r} vs full "
            f"{full_text[at:at + 40]!r}. The prompt/response boundary cannot be placed exactly"
        )
    response_text = full_text[len(prompt_text):]
    if eos and response_text.rstrip().endswith(eos):
        response_text = response_text.rstrip()
    return prompt_text, response_text


def encode_prompt_and_response(sample: Sample, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Prompt and response token ids, each tokenised on its own (no added special tokens) for an exact boundary."""
    prompt_text, response_text = render_prompt_and_response(sample, tokenizer)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    return prompt_ids, response_ids


def encode_prompt(sample: Sample, tokenizer: Any) -> list[int]:
    """Token ids of the prompt alone, ending with the generation prompt: what a model is given to generate.

    The same text and tokenisation as the prompt part of :func:`tokenize_sample`, so a generated response
    continues exactly the context it was trained in. The response is not rendered (it may be '').
    """
    return list(tokenizer(_render_prompt(sample, tokenizer), add_special_tokens=False)["input_ids"])


def _assemble(sample: Sample, prompt_ids: list[int], response_ids: list[int], max_length: int) -> TokenizedSample:
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"prompt is {len(prompt_ids)} tokens, leaving no room for a response within max_length {max_length}",
            reason="prompt_too_long", location=f"sample {sample.sample_id} ({sample.source})", field="prompt",
        )
    kept_response = response_ids[: max_length - len(prompt_ids)]  # truncation cuts the response tail only
    return TokenizedSample(
        sample_id=sample.sample_id,
        input_ids=prompt_ids + kept_response,
        labels=[IGNORE_INDEX] * len(prompt_ids) + kept_response,
        n_prompt_tokens=len(prompt_ids),
        n_response_tokens=len(kept_response),
        truncated=len(kept_response) < len(response_ids),
        weight=sample.weight,
    )


def tokenize_sample(sample: Sample, tokenizer: Any, max_length: int) -> TokenizedSample:
    """Tokenise one sample, truncating the response tail to fit ``max_length``.

    Raises DataError (reason ``prompt_too_long``) if the prompt leaves no room for one response token.
    """
    prompt_ids, response_ids = encode_prompt_and_response(sample, tokenizer)
    return _assemble(sample, prompt_ids, response_ids, max_length)


def tokenize_samples(
    samples: Sequence[Sample], tokenizer: Any, cfg: DataConfig, report: DataReport
) -> list[TokenizedSample]:
    """Tokenise all samples applying ``cfg.on_overlong``; skips and truncations are recorded in ``report``.

    A skipped sample moves from ``report.kept`` to ``report.skipped`` (reason ``overlong`` or
    ``prompt_too_long``), so the report describes exactly what is returned.
    """
    out: list[TokenizedSample] = []
    for sample in samples:
        prompt_ids, response_ids = encode_prompt_and_response(sample, tokenizer)
        total = len(prompt_ids) + len(response_ids)
        try:
            if total > cfg.max_length and cfg.on_overlong != "truncate" and len(prompt_ids) < cfg.max_length:
                raise DataError(
                    f"{total} tokens (prompt {len(prompt_ids)}, response {len(response_ids)}) "
                    f"exceed max_length {cfg.max_length}",
                    reason="overlong", location=f"sample {sample.sample_id} ({sample.source})", field="response",
                )
            tokenized = _assemble(sample, prompt_ids, response_ids, cfg.max_length)
        except DataError as err:
            if cfg.on_overlong == "error":
                raise
            report.add_skip(err)
            report.kept -= 1
            continue
        report.truncated += int(tokenized.truncated)
        out.append(tokenized)
    return out


def collate(
    batch: Sequence[TokenizedSample], pad_token_id: int | None, padding_side: Literal["right", "left"] = "right"
) -> dict[str, Any]:
    """Pad a batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on pads) as long tensors; ``sample_ids``."""
    import torch

    if not batch:
        raise ValueError("collate needs at least one sample")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer has no pad token; set one (e.g. the eos token)")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(s.input_ids) for s in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(batch):
        n = len(sample.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_ids": [s.sample_id for s in batch],
    }


def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int, side: Literal["left", "right"] = "left"):
    """(input_ids, attention_mask) long tensors for token lists of different lengths. Left padding makes every
    row end at the last column (generation continues there); right padding keeps each row's start aligned."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def length_sorted_batches(
    samples: Sequence[TokenizedSample] | Sequence[int], max_batch_size: int, max_tokens: int
) -> list[list[int]]:
    """Group indices of ``samples`` (or of a list of lengths) into batches, longest first.

    Each batch has at most ``max_batch_size`` samples and a padded size (longest × count) of at most
    ``max_tokens``; a single sample longer than ``max_tokens`` forms a batch of its own. Longest first so an
    out-of-memory batch shows up at once. Ties keep input order, so the result is deterministic.
    """
    if max_batch_size < 1 or max_tokens < 1:
        raise ValueError(f"max_batch_size and max_tokens must be >= 1, got {max_batch_size}, {max_tokens}")
    lengths = [s if isinstance(s, int) else len(s.input_ids) for s in samples]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted descending, so the batch's first (longest) sample sets its padded width
        if current and (len(current) + 1 > max_batch_size or lengths[current[0]] * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
