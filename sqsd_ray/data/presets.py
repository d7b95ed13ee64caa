"""The safety data sets the paper builds its directions from, as data presets (``data.preset``).

A preset supplies what a config would otherwise spell out: the Hugging Face dataset and split, or for the AdvBench
presets the reference file ``ref:advbench`` (when ``data.path`` is empty), the schema, and a per-record transform
that selects rows and maps fields. With a path it reads a local file with the same fields, which is how the
mappings are tested offline.

======================  ==========================================  =====================  =========================
preset                  source (split)                              rows kept              record built
======================  ==========================================  =====================  =========================
beavertails_unsafe      HF PKU-Alignment/BeaverTails (30k_train)    is_safe is false       prompt, response;
                                                                                           meta categories (true
                                                                                           ``category`` names)
aegis2_unsafe           HF nvidia/Aegis-AI-Content-Safety-          response_label is      prompt, response;
                        Dataset-2.0 (train)                         "unsafe" and the       meta violated_categories
                                                                    response is not blank
pku_saferlhf_pairs      HF PKU-Alignment/PKU-SafeRLHF-10K (train)   the two responses      preference: prompt,
                                                                    differ                 chosen = the safer,
                                                                                           rejected = the other
advbench_harmful        AdvBench CSV (goal, target), ref:advbench   all                    prompt = goal,
                                                                                           response = target
advbench_refusal_pairs  AdvBench CSV (goal, target), ref:advbench   all                    preference: prompt = goal,
                                                                                           chosen = a refusal,
                                                                                           rejected = target
======================  ==========================================  =====================  =========================

A transform gets the raw record (after ``data.field_map``) and its :class:`~sqsd_ray.data.Location`, and
returns the mapped record, or None for a row it does not select; the data layer counts those as
``not_selected`` and then applies ``data.keep_if`` to the mapped record. A malformed row raises a
:class:`~sqsd_ray.data.DataError` naming the row and the source field, like any other bad record (so
``on_bad_record: skip`` counts it instead).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from .location import DataError, Location

if TYPE_CHECKING:
    from .records import DataConfig

# Refusals for the offline preference pairs. Each contains a phrase the keyword judge
# (``evaluation.generate.REFUSAL_PHRASES``) recognises, so a model trained towards them is judged as refusing.
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

Transform = Callable[[dict[str, Any], Location], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Preset:
    """A data set's source, schema and row transform; ``hf_path`` None means it reads a file: ``reference`` (a
    ``ref:`` name of :mod:`sqsd_ray.data.reference`) unless ``data.path`` names another."""

    name: str
    schema: str
    transform: Transform
    hf_path: str | None = None
    hf_split: str = "train"
    about: str = ""
    reference: str | None = None


def _text(record: dict[str, Any], name: str, loc: Location) -> str:
    """A required, non-blank string field, checked here so errors name the data set's field, not the mapped one."""
    value = record.get(name)
    if value is None:
        raise DataError("required field is missing or null", reason="missing_field", location=loc, field=name)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", reason="wrong_type", location=loc,
                        field=name)
    if not value.strip():
        raise DataError("empty or whitespace-only", reason="empty_field", location=loc, field=name)
    return value


def refusal_for(prompt: str) -> str:
    """A refusal chosen by sha256 of the prompt: the same prompt gets the same refusal in every run and process
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return REFUSALS[int.from_bytes(digest[:8], "big") % len(REFUSALS)]


def beavertails_unsafe(record: dict[str, Any], loc: Location) -> dict[str, Any] | None:
    """BeaverTails QA pairs judged unsafe: the harmful SFT set behind V_danger (Beaver-unsafe).

    ``prompt`` -> prompt, ``response`` -> response, ``category`` (a mapping of harm category -> bool) -> meta
    ``categories``, the sorted names that are true. Kept when ``is_safe`` is false; ``is_safe`` must be a bool
    (anything else is a ``wrong_type`` error: guessing would let safe rows into the unsafe set).
    """
    is_safe = record.get("is_safe")
    if is_safe is None:
        raise DataError("required field is missing or null", reason="missing_field", location=loc, field="is_safe")
    if not isinstance(is_safe, bool):
        raise DataError(f"expected true/false, got {type(is_safe).__name__} {is_safe!r}", reason="wrong_type",
                        location=loc, field="is_safe")
    if is_safe:
        return None
    categories = record.get("category") or {}
    if not isinstance(categories, dict):
        raise DataError(f"expected a mapping of category -> bool, got {type(categories).__name__}",
                        reason="wrong_type", location=loc, field="category")
    return {"prompt": _text(record, "prompt", loc), "response": _text(record, "response", loc),
            "categories": sorted(name for name, flagged in categories.items() if flagged)}


def aegis2_unsafe(record: dict[str, Any], loc: Location) -> dict[str, Any] | None:
    """Aegis 2.0 prompt/response pairs whose response is labelled unsafe: V_danger (Aegis-unsafe).

    ``prompt`` -> prompt, ``response`` -> response, ``violated_categories`` -> meta (``prompt_label`` is not
    used). Kept when ``response_label`` is ``"unsafe"`` and the response is not blank: a row without a response
    has nothing to train on, whatever its labels.
    The paper cites Aegis without naming a version. 1.0 rows are single texts with annotator labels and mostly
    no responses, so 2.0's prompt/response pairs are what SFT needs.
    """
    if record.get("response_label") != "unsafe":
        return None
    response = record.get("response")
    if response is None or (isinstance(response, str) and not response.strip()):
        return None
    return {"prompt": _text(record, "prompt", loc), "response": _text(record, "response", loc),
            "violated_categories": record.get("violated_categories")}


def pku_saferlhf_pairs(record: dict[str, Any], loc: Location) -> dict[str, Any] | None:
    """PKU-SafeRLHF-10K preference pairs with the safer response preferred: V_safety by DPO.

    ``prompt`` -> prompt, ``response_{safer_response_id}`` -> chosen, the other response -> rejected,
    ``is_response_{i}_safe`` -> meta ``is_chosen_safe`` / ``is_rejected_safe``; ``better_response_id``
    (helpfulness) is not used. ``safer_response_id`` must be 0 or 1 (else a ``wrong_type`` error); a pair with
    identical responses has no preference to learn and is not selected.
    """
    safer = record.get("safer_response_id")
    if safer is None:
        raise DataError("required field is missing or null", reason="missing_field", location=loc,
                        field="safer_response_id")
    if isinstance(safer, bool) or safer not in (0, 1):
        raise DataError(f"expected 0 or 1, got {safer!r}", reason="wrong_type", location=loc,
                        field="safer_response_id")
    safer = int(safer)
    responses = (_text(record, "response_0", loc), _text(record, "response_1", loc))
    if responses[0] == responses[1]:
        return None
    return {"prompt": _text(record, "prompt", loc), "chosen": responses[safer], "rejected": responses[1 - safer],
            "is_chosen_safe": record.get(f"is_response_{safer}_safe"),
            "is_rejected_safe": record.get(f"is_response_{1 - safer}_safe")}


def advbench_harmful(record: dict[str, Any], loc: Location) -> dict[str, Any]:
    """AdvBench harmful behaviours as an offline harmful SFT set (a V_danger without HF access).

    ``goal`` -> prompt, ``target`` (the affirmative opening, "Sure, here is ...") -> response. Every row kept.
    """
    return {"prompt": _text(record, "goal", loc), "response": _text(record, "target", loc)}


def advbench_refusal_pairs(record: dict[str, Any], loc: Location) -> dict[str, Any]:
    """AdvBench goals as offline DPO pairs with a refusal preferred (a V_safety without HF access).

    ``goal`` -> prompt, a refusal from :data:`REFUSALS` chosen by a stable hash of the goal -> chosen,
    ``target`` -> rejected. Every row kept.
    """
    goal = _text(record, "goal", loc)
    return {"prompt": goal, "chosen": refusal_for(goal), "rejected": _text(record, "target", loc)}


PRESETS = {p.name: p for p in (
    Preset("beavertails_unsafe", "prompt_response", beavertails_unsafe, "PKU-Alignment/BeaverTails", "30k_train",
           "BeaverTails QA pairs judged unsafe (V_danger, Beaver-unsafe)"),
    Preset("aegis2_unsafe", "prompt_response", aegis2_unsafe, "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", "train",
           "Aegis 2.0 prompt/response pairs whose response is labelled unsafe (V_danger, Aegis-unsafe)"),
    Preset("pku_saferlhf_pairs", "preference", pku_saferlhf_pairs, "PKU-Alignment/PKU-SafeRLHF-10K", "train",
           "PKU-SafeRLHF-10K with the safer response preferred (V_safety by DPO)"),
    Preset("advbench_harmful", "prompt_response", advbench_harmful, None, "",
           "AdvBench goal -> affirmative target: an offline harmful SFT set", "ref:advbench"),
    Preset("advbench_refusal_pairs", "preference", advbench_refusal_pairs, None, "",
           "AdvBench goal with a refusal preferred over the target: offline DPO pairs", "ref:advbench"),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ConfigError listing the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"data.preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def resolve(cfg: DataConfig) -> DataConfig:
    """``cfg`` with its preset's source and schema filled in; what the user set wins.

    With ``path`` empty: the preset's HF dataset, ``format: hf`` and its split (unless ``hf_split`` was changed
    from the default ``train``), or a file preset's reference file. ``schema: auto`` becomes the preset's schema.
    Without a preset, ``cfg`` is returned as is.
    """
    if not cfg.preset:
        return cfg
    preset = get_preset(cfg.preset)
    changes: dict[str, Any] = {}
    if not cfg.path:
        if preset.hf_path is None:
            changes["path"] = preset.reference
        else:
            changes.update(path=preset.hf_path, format="hf")
            if cfg.hf_split == "train":
                changes["hf_split"] = preset.hf_split
    if cfg.schema == "auto":
        changes["schema"] = preset.schema
    return replace(cfg, **changes)


__all__ = ["PRESETS", "REFUSALS", "Preset", "Transform", "get_preset", "refusal_for", "resolve"]
