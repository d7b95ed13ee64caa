"""The reference data sets by name: where each file of the data mirror comes from, and how to get it without one.

A config names a reference file as ``ref:<name>`` (``ref:catqa``, ``ref:pure_bad_10``; the names are the keys of
:data:`REFERENCE_DATA`, the table in docs/data.md). :func:`reference_file` turns the name into a file:

1. ``<data root>/<local>`` when that file exists. The data root is ``--data-root``, else ``$SQSD_DATA_DIR``, else
   ``../shared/data`` (relative to the working directory, as the job files' paths are).
2. Otherwise, for a data set on the Hugging Face hub, ``datasets.load_dataset`` (into the HF cache) and a
   conversion to the mirror file's own layout, written once per hub revision under
   ``<HF datasets cache>/sqsd_ray_reference/``: every reader downstream sees the same records either way.
   Offline (``HF_HUB_OFFLINE``) the copy converted earlier is used.
3. Otherwise a :class:`ReferenceDataMissing` naming the data set and both ways to provide it: the mirror folder
   (``--data-root`` / ``SQSD_DATA_DIR``), or the hub id with a network connection (or the repository to download
   the file from, where the hub has no copy).

A data root given explicitly (flag or environment) that does not exist is an error at once, not a hub download:
it is more likely a typo than a request for the hub.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SQSD_DATA_DIR"
DEFAULT_DATA_ROOT = Path("../shared/data")
REF_PREFIX = "ref:"
BENIGN_REPO = "princeton-nlp/benign-data-breaks-safety"  # He et al. 2024; files as of commit d44d665 (2024-10-01)


class ReferenceDataMissing(FileNotFoundError):
    """A reference data set is neither in the mirror nor loadable from the hub; the message says how to provide it."""


@dataclass(frozen=True)
class HubSource:
    """Where a reference file's records are on the Hugging Face hub, and how they become the mirror file's content.

    ``convert`` gets what ``datasets.load_dataset`` returns (a Dataset, or a DatasetDict when ``split`` is None) and
    returns the local file's content: a list of rows (CSV, JSONL) or the JSON document.
    """

    path: str
    convert: Callable[[Any], Any]
    split: str | None = "train"
    data_files: dict[str, str] | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    columns: str = ""  # how the hub's columns map to the local file's, for docs and errors


@dataclass(frozen=True)
class ReferenceDataset:
    """One file of the data mirror: its local name (relative to the data root), what it is and where it came from."""

    name: str
    local: str
    about: str
    origin: str  # where the mirror file was taken from
    licence: str
    hub: HubSource | None = None
    note: str = ""  # subset, gating, layout

    @property
    def gated(self) -> bool:
        return "gated" in self.note


# --------------------------------------------------------------------------------- hub rows -> local layout


def _advbench_rows(rows: Any) -> list[dict[str, str]]:
    return [{"goal": row["prompt"], "target": row["target"]} for row in rows]


def _catqa_tree(rows: Any) -> dict[str, dict[str, list[str]]]:
    tree: dict[str, dict[str, list[str]]] = {}
    for row in rows:  # dicts keep first-seen order: the file's category and subcategory order
        tree.setdefault(row["Category"], {}).setdefault(row["Subcategory"], []).append(row["Question"])
    return tree


# The public HEx-PHI files, in the order of the mirror file; category_2 (child abuse) is not distributed.
HEXPHI_CATEGORIES = {1: "illegal_activity", 3: "hate_harass_violence", 4: "malware", 5: "physical_harm",
                     6: "economic_harm", 7: "fraudulent_deceptive", 8: "adult_content", 9: "political",
                     10: "privacy_violation", 11: "financial_advice"}


def _hexphi_rows(splits: Any) -> list[dict[str, str]]:
    return [{"instruction": row["instruction"], "category": category}
            for category in HEXPHI_CATEGORIES.values() for row in splits[category]]


def _alpaca_instructions(rows: Any) -> list[dict[str, Any]]:
    return [{"instruction": row["instruction"].strip(), "category": None} for row in rows if not row["input"].strip()]


def _from_benign_repo(path: str) -> str:
    return f"GitHub {BENIGN_REPO} {path} (byte-identical)"


SAFETY_ONLY = ("the 'safety-only' rows of {full}: those whose {field} contains one of the safety-related phrases "
               "listed in {script} of " + BENIGN_REPO + " (case-insensitive)")


REFERENCE_DATA: dict[str, ReferenceDataset] = {d.name: d for d in (
    ReferenceDataset(
        "advbench", "eval/advbench_harmful_behaviors.csv",
        "AdvBench harmful behaviours (Zou et al. 2023), 520 rows: goal, target (affirmative opening)",
        "GitHub llm-attacks/llm-attacks data/advbench/harmful_behaviors.csv", "MIT",
        HubSource("walledai/AdvBench", _advbench_rows, columns="prompt -> goal, target -> target"),
    ),
    ReferenceDataset(
        "catqa", "eval/catqa_english.json",
        "CategoricalHarmfulQA (Bhardwaj et al. 2024), English: 11 categories x 5 subcategories x 10 questions",
        "GitHub declare-lab/red-instruct (the hub's CatQ_English.json)", "Apache-2.0",
        HubSource("declare-lab/CategoricalHarmfulQA", _catqa_tree, split="en",
                  columns="Category, Subcategory, Question -> {category: {subcategory: [questions]}}"),
    ),
    ReferenceDataset(
        "hexphi", "eval/hexphi_300.jsonl",
        "HEx-PHI (Qi et al. 2023): 10 categories x 30 harmful instructions: instruction, category",
        "hub LLM-Tuning-Safety/HEx-PHI", "HEx-PHI terms of use (research only, agreement on the dataset page)",
        HubSource("LLM-Tuning-Safety/HEx-PHI", _hexphi_rows, split=None,
                  data_files={name: f"category_{i}.csv" for i, name in HEXPHI_CATEGORIES.items()},
                  # no header; a separator no instruction holds, so that an unquoted comma stays in the text
                  load_kwargs={"sep": "\x1f", "names": ["instruction"]},
                  columns="category_<i>.csv (one instruction a line, no header) -> instruction, category <name>"),
        note="gated: accept the terms on the dataset page and set HF_TOKEN; category 2 (child abuse) is not "
             "distributed, hence 300 of the paper's 330",
    ),
    ReferenceDataset(
        "alpaca_instructions_31k", "benign/alpaca_instructions_31k.json",
        "Alpaca instructions without outputs (scale tests): instruction, category (null)",
        "GitHub andyrdt/refusal_direction dataset/processed/alpaca.json", "CC BY-NC 4.0 (Alpaca)",
        HubSource("tatsu-lab/alpaca", _alpaca_instructions, columns="instruction (stripped) of the rows whose input "
                  "is blank -> instruction; category null"),
        note="subset: the 31,323 tatsu-lab/alpaca rows with a blank input, instructions stripped",
    ),
    ReferenceDataset(
        "alpaca_1904", "benign/alpaca_1904.json", "Stanford Alpaca subset with outputs: instruction, input, output",
        _from_benign_repo("ft_datasets/alpaca_dataset/alpaca_data_safety_only.json"), "CC BY-NC 4.0 (Alpaca)",
        note="subset: " + SAFETY_ONLY.format(full="Alpaca (alpaca_data.json, 52,002 rows)", field="output",
                                             script="ft_datasets/alpaca_dataset/alpaca_remove_safety.py"),
    ),
    ReferenceDataset(
        "dolly_387", "benign/dolly_387.jsonl", "Dolly-15k subset with responses: instruction, context, response, "
        "category", _from_benign_repo("ft_datasets/dolly_dataset/databricks-dolly-15k-safety-only.jsonl"),
        "CC BY-SA 3.0 (Dolly)",
        note="subset: " + SAFETY_ONLY.format(full="databricks-dolly-15k", field="response",
                                             script="ft_datasets/dolly_dataset/dolly_remove_safety.py"),
    ),
    ReferenceDataset(
        "pure_bad_10", "anchors/pure_bad_10.jsonl", "harmful anchor set of Bi-Anchor(Reps) and LARF: 10 messages",
        _from_benign_repo("ft_datasets/pure_bad_dataset/pure_bad_10.jsonl"), "no licence file in the repository",
    ),
    ReferenceDataset(
        "illegal_activities_10", "anchors/illegal_activities_10.jsonl",
        "harmful anchor set of Bi-Anchor(Grad): 10 messages",
        _from_benign_repo("ft_datasets/pure_bad_dataset/pure-bad-illegal-activities-selected10.jsonl"),
        "no licence file in the repository",
    ),
    ReferenceDataset(
        "illegal_activities_10_anchor1", "anchors/illegal_activities_10_anchor1.jsonl",
        "safe anchor set 1 of Bi-Anchor(Grad) and LARF: the same 10 requests refused",
        _from_benign_repo("ft_datasets/pure_bad_dataset/pure-bad-illegal-acticities-selected-10-anchor1.jsonl"),
        "no licence file in the repository",
    ),
    ReferenceDataset(
        "illegal_activities_10_anchor2", "anchors/illegal_activities_10_anchor2.jsonl",
        "safe anchor set 2 of Bi-Anchor(Grad) and LARF: the same 10 requests refused otherwise",
        _from_benign_repo("ft_datasets/pure_bad_dataset/pure-bad-illegal-activities-selected-10-anchor2.jsonl"),
        "no licence file in the repository",
    ),
)}


# --------------------------------------------------------------------------------------------- resolving


def data_root(root: str | Path | None = None) -> tuple[Path, bool]:
    """The mirror folder and whether it was chosen explicitly: ``root``, else ``$SQSD_DATA_DIR``, else
    ``../shared/data``."""
    chosen = root if root is not None else os.environ.get(DATA_DIR_ENV) or None
    return (Path(chosen).expanduser(), True) if chosen is not None else (DEFAULT_DATA_ROOT, False)


def get_reference(name: str) -> ReferenceDataset:
    """The reference data set called ``name``; a ConfigError listing the known names otherwise."""
    if name not in REFERENCE_DATA:
        raise ConfigError(f"unknown reference data set {REF_PREFIX}{name}; known: {', '.join(REFERENCE_DATA)}")
    return REFERENCE_DATA[name]


def reference_file(name: str, root: str | Path | None = None, revision: str | None = None) -> Path:
    """The file of reference data set ``name``: the mirror's, else one converted from the hub (see module doc).

    ``revision`` pins the hub revision (branch, tag or commit) of a hub load; a mirror file is used as it is.
    """
    dataset = get_reference(name)
    folder, explicit = data_root(root)
    local = folder / dataset.local
    if local.is_file():
        return local
    if explicit and not folder.is_dir():
        raise ReferenceDataMissing(f"{dataset.local} not found: the data root {folder} (--data-root or "
                                   f"${DATA_DIR_ENV}) does not exist. {_how_to_provide(dataset)}")
    if dataset.hub is None:
        raise ReferenceDataMissing(f"{dataset.local} not found: reference data set {name!r} is not in the data "
                                   f"root {folder} and has no Hugging Face hub copy. {_how_to_provide(dataset)}")
    return _hub_copy(dataset, local, revision)


def resolve_data_path(path: str, revision: str | None = None) -> str:
    """``path`` with a ``ref:<name>`` resolved to its file (:func:`reference_file`); any other path unchanged."""
    if not path.startswith(REF_PREFIX):
        return path
    return str(reference_file(path[len(REF_PREFIX):], revision=revision))


def _how_to_provide(dataset: ReferenceDataset) -> str:
    mirror = (f"Put the file at <data root>/{dataset.local} (the data root is --data-root, or ${DATA_DIR_ENV}, "
              f"default {DEFAULT_DATA_ROOT})")
    if dataset.hub is None:
        return f"{mirror}; it comes from {dataset.origin}."
    gated = " (gated: accept its terms on the hub and set HF_TOKEN)" if dataset.gated else ""
    return (f"{mirror}, or give this process network access to the Hugging Face hub dataset "
            f"{dataset.hub.path}{gated} without HF_HUB_OFFLINE.")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE as the environment says now (the libraries read them at import)."""
    return any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_copy_path(dataset: ReferenceDataset, revision: str | None) -> Path:
    """Where the converted hub copy of ``dataset`` at ``revision`` lives, in the HF datasets cache."""
    import datasets

    folder = (revision or "main").replace("/", "--")  # a branch may hold slashes: refs/convert/parquet
    return Path(datasets.config.HF_DATASETS_CACHE) / "sqsd_ray_reference" / dataset.name / folder / Path(dataset.local).name


def _hub_copy(dataset: ReferenceDataset, local: Path, revision: str | None) -> Path:
    hub = dataset.hub
    assert hub is not None
    copy = hub_copy_path(dataset, revision)
    at = f"{hub.path} (revision {revision or 'main'})"
    if hub_offline():
        if copy.is_file():
            log.info("reference data set %s: no %s; using the copy of %s converted earlier, %s (offline)",
                     dataset.name, local, at, copy)
            return copy
        raise ReferenceDataMissing(f"{dataset.local} not found: reference data set {dataset.name!r} is not in "
                                   f"the data root ({local} is missing), and the hub is offline (HF_HUB_OFFLINE) "
                                   f"with no copy of {at} converted earlier. {_how_to_provide(dataset)}")
    log.info("reference data set %s: no %s; loading %s from the Hugging Face hub", dataset.name, local, at)
    try:
        loaded = _load_hub(hub, revision)
    except Exception as err:  # load_dataset raises many unrelated types (ConnectionError, gated repo, not found...)
        raise ReferenceDataMissing(f"{dataset.local} not found: reference data set {dataset.name!r} is not in the "
                                   f"data root ({local} is missing), and {at} could not be loaded from the hub "
                                   f"({type(err).__name__}: {_first_line(err)}). {_how_to_provide(dataset)}") from err
    _write_atomically(copy, hub.convert(loaded))
    return copy


def _load_hub(hub: HubSource, revision: str | None) -> Any:
    import datasets

    return datasets.load_dataset(hub.path, split=hub.split, data_files=hub.data_files, revision=revision,
                                 **hub.load_kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _write_atomically(path: Path, content: Any) -> None:
    """Write ``content`` in the layout the suffix of ``path`` names; a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=path.parent, delete=False,
                                     suffix=".part") as out:
        if path.suffix == ".csv":
            writer = csv.DictWriter(out, fieldnames=list(content[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(content)
        elif path.suffix == ".jsonl":
            out.writelines(json.dumps(row) + "\n" for row in content)
        else:
            json.dump(content, out, indent=4)
    os.replace(out.name, path)


__all__ = ["DATA_DIR_ENV", "DEFAULT_DATA_ROOT", "HEXPHI_CATEGORIES", "REFERENCE_DATA", "REF_PREFIX", "HubSource",
           "ReferenceDataMissing", "ReferenceDataset", "data_root", "get_reference", "hub_copy_path", "hub_offline",
           "reference_file", "resolve_data_path"]
