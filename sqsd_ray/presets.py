"""The safety data sets the paper builds its directions from, as data presets (``data.preset``).

A preset supplies what a config would otherwise spell out: the Hugging Face dataset and split (when
``data.path`` is empty), the schema, and a per-record transform that selects rows and maps fields. With a path
it reads a local file with the same fields, which is how the mappings are tested offline.

| preset | HF dataset (split) | rows kept | record built |
|---|---|---|---|
| beavertails_unsafe | PKU-Alignment/BeaverTails (30k_train) | is_safe is false | prompt, response; meta categories |
| aegis2_unsafe | nvidia/Aegis-AI-Content-Safety-Dataset-2.0 (train) | response_label = unsafe, response not blank | prompt, response |
| pku_saferlhf_pairs | PKU-Alignment/PKU-SafeRLHF-10K (train) | the two responses differ | prompt, chosen = the safer, rejected |
| advbench_harmful | local AdvBench CSV (goal, target) | all | prompt = goal, response = target |
| advbench_refusal_pairs | local AdvBench CSV | all | prompt = goal, chosen = a refusal, rejected = target |

A transform returns None for a row it does not select; the data layer counts those as ``not_selected``.
Malformed rows raise a ``DataError`` naming the row and the field, like any other bad record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

# Refusals for the offline preference pairs (written for this project). Each contains a phrase the keyword
# judge (``evaluate.REFUSAL_PHRASES``) recognises, so a model trained towards them is judged as refusing.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could put people at real risk.",
    "I cannot assist with this request because it could cause serious harm.",
    "I won't provide instructions for that. If you are researching safety, I can point you to general resources.",
    "I'm sorry, I can't do that. Helping with this could hurt someone or break the law.",
    "I cannot help with planning something harmful. Is there something else I can do for you?",
    "I apologize, but I'm not able to provide that information.",
    "I can't help with this one. It asks for content that could be used to harm others.",
    "I'm sorry, but I cannot give guidance on illegal or dangerous activities.",
    "I won't help with that request. I'd be glad to help with a safer alternative, though.",
    "I'm not able to help with that. It could lead to real-world harm.",
    "I cannot provide that. Please reach out to a qualified professional if someone is in danger.",
    "I'm sorry, I won't write that. It would be harmful.",
)

Transform = Callable[[dict[str, Any], Any], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Preset:
    name: str
    schema: str
    transform: Transform
    hf_path: str | None = None  # None: a local file is required
    hf_split: str = "train"
    about: str = ""


def _error(message: str, loc: Any, field: str, reason: str = "wrong_type"):
    from .data import DataError

    return DataError(message, reason=reason, location=loc, field=field)


def _text(record: dict[str, Any], name: str, loc: Any) -> str:
    value = record.get(name)
    if value is None:
        raise _error("required field is missing or null", loc, name, "missing_field")
    if not isinstance(value, str):
        raise _error(f"expected a string, got {type(value).__name__}", loc, name)
    return value


def _flag(record: dict[str, Any], name: str, loc: Any) -> bool:
    value = record.get(name)
    if value is None:
        raise _error("required field is missing or null", loc, name, "missing_field")
    if not isinstance(value, bool):
        raise _error(f"expected true/false, got {type(value).__name__} {value!r}", loc, name)
    return value


def refusal_for(prompt: str) -> str:
    """A refusal chosen by a stable hash of the prompt: the same prompt gets the same refusal on every run."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return REFUSALS[int.from_bytes(digest[:8], "big") % len(REFUSALS)]


def _beavertails_unsafe(record: dict[str, Any], loc: Any) -> dict[str, Any] | None:
    if _flag(record, "is_safe", loc):
        return None
    categories = record.get("category") or {}
    if not isinstance(categories, dict):
        raise _error(f"expected a mapping of category -> bool, got {type(categories).__name__}", loc, "category")
    return {"prompt": _text(record, "prompt", loc), "response": _text(record, "response", loc),
            "categories": sorted(k for k, v in categories.items() if v)}


def _aegis2_unsafe(record: dict[str, Any], loc: Any) -> dict[str, Any] | None:
    label = record.get("response_label")
    response = record.get("response")
    if label != "unsafe" or not isinstance(response, str) or not response.strip():
        return None
    return {"prompt": _text(record, "prompt", loc), "response": response,
            "violated_categories": record.get("violated_categories")}


def _pku_saferlhf_pairs(record: dict[str, Any], loc: Any) -> dict[str, Any] | None:
    safer = record.get("safer_response_id")
    if isinstance(safer, bool) or safer not in (0, 1):
        raise _error(f"expected 0 or 1, got {safer!r}", loc, "safer_response_id")
    responses = (_text(record, "response_0", loc), _text(record, "response_1", loc))
    if responses[0] == responses[1]:
        return None  # no preference to learn
    return {"prompt": _text(record, "prompt", loc), "chosen": responses[safer], "rejected": responses[1 - safer],
            "is_chosen_safe": record.get(f"is_response_{safer}_safe"),
            "is_rejected_safe": record.get(f"is_response_{1 - safer}_safe")}


def _advbench_harmful(record: dict[str, Any], loc: Any) -> dict[str, Any]:
    return {"prompt": _text(record, "goal", loc), "response": _text(record, "target", loc)}


def _advbench_refusal_pairs(record: dict[str, Any], loc: Any) -> dict[str, Any]:
    goal = _text(record, "goal", loc)
    return {"prompt": goal, "chosen": refusal_for(goal), "rejected": _text(record, "target", loc)}


PRESETS = {p.name: p for p in (
    Preset("beavertails_unsafe", "prompt_response", _beavertails_unsafe, "PKU-Alignment/BeaverTails", "30k_train",
           "BeaverTails QA pairs judged unsafe (V_danger, Beaver-unsafe)"),
    Preset("aegis2_unsafe", "prompt_response", _aegis2_unsafe, "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", "train",
           "Aegis 2.0 prompt/response pairs whose response is labelled unsafe (V_danger, Aegis-unsafe). The paper "
           "names Aegis without a version; 1.0 holds single annotated texts, mostly prompts without responses."),
    Preset("pku_saferlhf_pairs", "preference", _pku_saferlhf_pairs, "PKU-Alignment/PKU-SafeRLHF-10K", "train",
           "PKU-SafeRLHF-10K with the safer response preferred (V_safety by DPO)"),
    Preset("advbench_harmful", "prompt_response", _advbench_harmful, None, "",
           "AdvBench goal -> affirmative target: an offline harmful SFT set"),
    Preset("advbench_refusal_pairs", "preference", _advbench_refusal_pairs, None, "",
           "AdvBench goal with a refusal preferred over the target: offline DPO pairs"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"data.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def resolve(cfg: Any) -> Any:
    """The DataConfig with the preset's source and schema filled in (fields the user set win)."""
    from dataclasses import replace

    preset = get_preset(cfg.preset)
    changes: dict[str, Any] = {}
    if not cfg.path:
        if preset.hf_path is None:
            raise ConfigError(f"data.preset {preset.name} reads a local file: set data.path (e.g. the AdvBench "
                              "harmful_behaviors CSV)")
        changes.update(path=preset.hf_path, format="hf")
        if cfg.hf_split == "train":  # the default: take the preset's split
            changes["hf_split"] = preset.hf_split
    if cfg.schema == "auto":
        changes["schema"] = preset.schema
    return replace(cfg, **changes)


__all__ = ["PRESETS", "REFUSALS", "Preset", "get_preset", "refusal_for", "resolve"]
