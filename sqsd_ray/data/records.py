r"""Reading and normalising: fine-tuning records from a file or HF dataset -> canonical chat samples.

Pipeline::

    load_samples(cfg)                     file or HF dataset -> list[Sample], DataReport
    (data.tokenize)                       -> TokenizedSample with response-only labels, batches

Design
------
* One canonical record, :class:`Sample`: the prompt turns (system/user/..., up to but not including the final
  assistant turn) and the response text. Every source schema (alpaca, dolly, messages, prompt_response,
  preference) normalises to it, so later stages never see source-specific fields.
  Single-turn schemas give one user turn: alpaca ``instruction + "\n\n" + input``, dolly
  ``instruction + "\n\n" + context`` (the extra text is simply appended after a blank line when non-empty,
  so both schemas read alike and no template-specific "### Input:" header is baked into the data);
  prompt_response ``prompt``. In a messages record the final turn must be the assistant's (the response) and
  every earlier turn is prompt; turns after the last assistant turn are never dropped (the record is bad, or,
  without ``require_response``, all of it is prompt). The config ``system_prompt`` is prepended only to
  samples that do not start with their own system turn.
* Nothing is dropped silently. A bad record is either a :class:`DataError` whose message names the file, the
  position (1-based *line* for JSONL/CSV, 0-based *record index* for JSON/Parquet/HF; the message says which)
  and the field, or, with ``on_bad_record: skip``, a skip counted by reason in the :class:`DataReport`, which
  keeps the first few messages per reason. The report's counts always satisfy
  ``records_read == kept + sum(skipped.values())``, including skips made at tokenisation time.
* ``sample_id`` is the record's own id field when it has one; otherwise a hash of the normalised content
  (prompt turns + response, *before* the config ``system_prompt`` is added). So ids are stable across runs,
  record order, file formats and schemas, and do not change with the system prompt: scores join back to rows.
* Text is kept verbatim (never stripped); "empty" means empty after stripping whitespace.
* ``path: ref:<name>`` reads a reference data set (:mod:`sqsd_ray.data.reference`): the data mirror's file, or,
  without a mirror, the same records converted from the Hugging Face hub (``revision`` pins the hub revision).

Bad-record reasons (the keys of ``DataReport.skipped``): ``malformed_json``, ``malformed_csv``,
``not_an_object``, ``field_map_conflict``, ``missing_field``, ``empty_field``, ``wrong_type``,
``unknown_role``, ``no_prompt_turns``, ``no_final_assistant_turn``, ``invalid_value``, ``duplicate``,
``duplicate_id_conflict``;
at tokenisation: ``overlong``, ``prompt_too_long``. Rows a ``preset`` or ``keep_if`` does not select are
counted as ``not_selected`` (whatever ``on_bad_record`` says: they are not bad, just not wanted).

Row selection. Each record goes: ``field_map`` -> the preset's transform (:mod:`sqsd_ray.data.presets`; it maps
the data set's fields and returns None for rows it does not select) -> ``keep_if`` (every listed field present
and equal; a bool only equals a bool) -> schema normalisation. A record lacking a ``keep_if`` field is not
selected; a ``keep_if`` field that *no* record has is a ConfigError after reading (most likely a typo).

Preference pairs (schema ``preference``: ``prompt``, or ``messages`` that are all prompt and do not end with an
assistant turn, plus non-blank ``chosen`` and ``rejected`` strings) are samples whose ``response`` is the
chosen answer and ``rejected`` the other; their content id covers both (ids of other samples are unchanged).
``Sample.rejected_sample()`` gives the rejected side, with the same prompt and id, for tokenising.

Per-sample loss weights. With ``weight_field`` set, each record's value of that field (a number, or a numeric
string as CSV cells are, finite and >= 0) becomes ``Sample.weight`` and, through tokenisation,
``TokenizedSample.weight`` (default 1.0 everywhere). The field is not part of the content id, so a re-weighted
copy of a corpus (``sqsd-ray curate`` in reweight mode) keeps the ids its scores were made under. A record
lacking it, or holding a non-number or a negative value, is a bad record (``missing_field``, ``wrong_type``,
``invalid_value``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_type_hints

from ..config import ConfigError, help_field
from .location import DataError, Location
from .reference import REF_PREFIX, get_reference, resolve_data_path

logger = logging.getLogger(__name__)

DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hf"]
DataSchema = Literal["auto", "alpaca", "dolly", "messages", "prompt_response", "preference"]
OverlongPolicy = Literal["truncate", "skip", "error"]
BadRecordPolicy = Literal["error", "skip"]
DuplicatePolicy = Literal["error", "skip", "keep_first"]

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
ROLES = ("system", "user", "assistant")


@dataclass
class DataSample:
    """A seeded random subset of the samples that survive validation and de-duplication (the paper's "random 5k
    subset", §5.1): each sample's rank is a hash of (seed, sample_id), and the ``n`` lowest are drawn, kept in file
    order. So the draw depends only on the seed and the ids, not on the library versions or the record order."""

    n: int = help_field(help="how many samples to draw (all of them, with a warning, when fewer survive)")
    seed: int = help_field(0, help="seed of the draw; another seed draws another subset")

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"data.sample.n must be an integer >= 1, got {self.n!r}")


@dataclass
class DataConfig:
    """Where the fine-tuning data is and how strictly to read it."""

    path: str = help_field(
        "", help="JSONL, JSON (a list of objects, or {'data': [...]}), CSV or Parquet file; or, with format: hf, "
        "a Hugging Face dataset name or local dataset directory; or ref:<name>, a reference data set from the data "
        "mirror or the hub (docs/data.md, e.g. ref:dolly_387)."
    )
    format: DataFormat = help_field(
        "auto", help="File format; auto = from the file suffix (.jsonl/.ndjson, .json, .csv, .parquet/.pq)."
    )
    hf_split: str = help_field("train", help="Split to load when format is hf.")
    hf_subset: str | None = help_field(None, help="Subset (config name) to load when format is hf.")
    revision: str | None = help_field(
        None, help="Hub revision (branch, tag or commit sha) of a Hugging Face dataset: format hf, or a ref: name "
        "loaded from the hub for want of a mirror; null: the default branch. Part of the run's identity when set.",
        identity_if_set=True,
    )
    schema: DataSchema = help_field(
        "auto", help="Record layout; auto = detect from the first record's keys: alpaca (instruction/input/output),"
        " dolly (instruction/context/response), messages (list of {role, content}), prompt_response, preference"
        " (prompt or messages, chosen, rejected: DPO pairs)."
    )
    preset: str | None = help_field(
        None, help="A known data set's mapping (sqsd_ray.presets: beavertails_unsafe, aegis2_unsafe, "
        "pku_saferlhf_pairs, advbench_harmful, advbench_refusal_pairs): row selection, field mapping, schema and, "
        "with path empty, the HF dataset name and split."
    )
    keep_if: dict[str, Any] = help_field(
        {}, help="Keep only records whose fields equal these values (after field_map and the preset), e.g. "
        "{is_safe: false}; the others, and records lacking a field, are counted as not_selected."
    )
    field_map: dict[str, str] = help_field(
        {}, help="Rename source fields before schema detection, e.g. {question: prompt, answer: response}."
    )
    id_field: str = help_field(
        "id", help="Record field used as sample_id when present; otherwise sample_id is a content hash 'h-...'."
    )
    system_prompt: str | None = help_field(
        None, help="System message prepended to every sample that does not already start with a system turn."
    )
    max_length: int = help_field(1024, help="Maximum tokens per sample (prompt + response).")
    on_overlong: OverlongPolicy = help_field(
        "truncate", help="Sample longer than max_length: truncate the response tail (prompt kept), skip, or error."
        " A prompt leaving no room for one response token is skipped (or an error with 'error')."
    )
    on_bad_record: BadRecordPolicy = help_field(
        "error", help="Malformed / incomplete / ill-typed record: raise, or skip it (counted in the report)."
    )
    on_duplicate: DuplicatePolicy = help_field(
        "skip", help="Repeated sample_id. skip: drop identical repeats (counted), treat an id reused for different"
        " content as a bad record; keep_first: drop every repeat (counted), first wins; error: raise."
    )
    limit: int | None = help_field(None, help="Keep only the first N valid records (see sample for a random subset).")
    sample: DataSample | None = help_field(
        None, help="{n, seed}: a seeded random subset of n samples drawn from those that survive validation and "
        "de-duplication (the paper's random 5k subsets); recorded in the report with the drawn ids' fingerprint. "
        "Not together with limit.", identity_if_set=True,
    )
    require_response: bool = help_field(
        True, help="If false, records without a response are kept with response '' (responses generated later)."
    )
    weight_field: str | None = help_field(
        None, help="Record field holding a per-sample loss weight (a number >= 0, e.g. 'loss_weight' as written "
        "by `sqsd-ray curate` in reweight mode); null: every sample weighs 1."
    )

    def __post_init__(self) -> None:
        # from_dict checks types, but direct construction does not: check the Literal fields here too.
        hints = get_type_hints(type(self))
        for f in fields(self):
            allowed = get_args(hints[f.name]) if getattr(hints[f.name], "__origin__", None) is Literal else ()
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"data.{f.name}: expected one of {allowed}, got {getattr(self, f.name)!r}")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2 (a prompt and a response token), got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 or null, got {self.limit}")
        if self.limit is not None and self.sample is not None:
            raise ConfigError(f"data.limit ({self.limit}: the first N records) and data.sample ({self.sample.n} drawn "
                              "at random) are both set; give one of them")
        if not isinstance(self.keep_if, dict):
            raise ConfigError(f"data.keep_if must be a mapping of field -> value, got {self.keep_if!r}")
        if self.path.startswith(REF_PREFIX):
            get_reference(self.path[len(REF_PREFIX):])  # an unknown name fails here, listing the known ones
            if self.format == "hf":
                raise ConfigError(f"data.format: {self.path} names a reference file (read from the mirror, or "
                                  "converted from the hub); leave data.format auto")
        if self.preset is not None:  # an unknown name fails here, listing the known ones, not at load time
            from .presets import get_preset

            get_preset(self.preset)


@dataclass
class DataReport:
    """What loading and tokenisation did: counts per outcome and, per skip reason, the first few messages."""

    source: str = ""
    format: str = ""
    schema: str = ""
    records_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    # record_index -> sample_id of each record skipped as an identical repeat of a kept sample: a tool that
    # rewrites the file (curate) gives such a record the fate of its first occurrence
    duplicates: dict[int, str] = field(default_factory=dict)
    # data.sample: {n, seed, pool (samples it drew from), drawn, ids_fingerprint}; None without it
    sampled: dict[str, Any] | None = None

    max_examples: ClassVar[int] = 3

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, error: DataError) -> None:
        """Count a skipped record under ``error.reason`` and keep its message if it is among the first few."""
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.max_examples:
            examples.append(str(error))

    def summary(self) -> str:
        lines = [
            f"data: {self.source} (format {self.format or '?'}, schema {self.schema or '?'})",
            f"  records read: {self.records_read}",
            f"  kept:         {self.kept}",
            f"  truncated:    {self.truncated}",
            f"  skipped:      {self.n_skipped}",
        ]
        if self.sampled is not None:
            lines.insert(3, f"  sampled:      {self.sampled['drawn']} of {self.sampled['pool']} (data.sample seed "
                            f"{self.sampled['seed']}, ids {self.sampled['ids_fingerprint']})")
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason}: {count}")
            lines.extend(f"      e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "schema": self.schema,
            "records_read": self.records_read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "n_skipped": self.n_skipped,
            "truncated": self.truncated,
            "examples": {reason: list(msgs) for reason, msgs in self.examples.items()},
            "sampled": self.sampled,
        }


@dataclass(frozen=True)
class Sample:
    """One normalised training example.

    ``messages`` are the prompt turns as ``{"role", "content"}`` dicts (treat them as read-only); ``response``
    is the final assistant turn ("" for prompt-only records when ``require_response`` is false). ``source`` is
    ``file.jsonl:12`` (1-based line) or ``file.json[12]`` (0-based record index). ``meta`` holds the record's
    other fields (e.g. ``category``) plus ``record_index``, the 0-based position among the file's records.
    ``weight`` is the per-sample loss weight (``DataConfig.weight_field``; 1.0 without it).
    Hashing uses ``sample_id`` only, since the dict fields are unhashable.
    """

    sample_id: str
    messages: tuple[dict[str, str], ...]
    response: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None  # preference pairs: the dispreferred response (``response`` is the chosen one)
    weight: float = 1.0

    def __hash__(self) -> int:
        return hash(self.sample_id)

    def rejected_sample(self) -> Sample:
        """The pair's rejected side as a sample with the same prompt and id (for tokenising it)."""
        if self.rejected is None:
            raise ValueError(f"sample {self.sample_id} ({self.source}) is not a preference pair")
        return Sample(self.sample_id, self.messages, self.rejected, self.source, self.meta, weight=self.weight)

    def conversation(self) -> list[dict[str, str]]:
        """Prompt turns plus the response as the final assistant turn."""
        return [*self.messages, {"role": "assistant", "content": self.response}]


def content_id(messages: Sequence[dict[str, str]], response: str, rejected: str | None = None) -> str:
    """``h-`` + 16 hex of sha256 over the roles, contents and response (and a pair's rejected response); the
    same content gives the same id."""
    content: dict[str, Any] = {"messages": [[m["role"], m["content"]] for m in messages], "response": response}
    if rejected is not None:
        content["rejected"] = rejected
    payload = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return "h-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- reading


def _resolve_format(cfg: DataConfig) -> str:
    if not cfg.path:
        raise ConfigError("data.path is empty: set it to a data file, or to a dataset name with data.format: hf")
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.path)
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    known = ", ".join(SUFFIX_FORMATS)
    if path.is_file():
        raise ConfigError(
            f"cannot tell the format of {cfg.path} from its suffix {path.suffix!r} (known: {known}); "
            "set data.format to jsonl, json, csv or parquet"
        )
    raise ConfigError(
        f"data.path {cfg.path!r} is not an existing file and has no known suffix ({known}); if it is a Hugging Face "
        "dataset name or dataset directory, set data.format: hf"
    )


def _iter_jsonl(path: Path, file: str) -> Iterator[tuple[Location, Any]]:
    """Stream (location, value) per non-blank line; an unparsable line yields a DataError as its value."""
    with open(path, "rb") as fh:  # bytes, so only b"\n" splits lines and a bad UTF-8 line is just one bad record
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines are not records
            loc = Location(file, path.name, "line", line_no)
            try:
                value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            except UnicodeDecodeError as err:
                message = f"not valid UTF-8 ({err.reason} at byte {err.start})"
                yield loc, DataError(message, reason="malformed_json", location=loc)
            except json.JSONDecodeError as err:
                message = f"malformed JSON: {err.msg} at column {err.colno}"
                yield loc, DataError(message, reason="malformed_json", location=loc)
            else:
                yield loc, value


def _iter_json(path: Path, file: str) -> Iterator[tuple[Location, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not valid UTF-8 ({err.reason} at byte {err.start})", reason="invalid_file") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":  # several top-level values, typically one object per line
            hint = "; it looks like JSON Lines, set data.format: jsonl"
        raise DataError(
            f"{file}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}{hint}", reason="invalid_file"
        ) from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f"{file}: expected a JSON list of records or an object with a 'data' list, got {type(data).__name__}"
            + (f" with keys {sorted(data)[:10]}" if isinstance(data, dict) else ""),
            reason="invalid_file",
        )
    for index, value in enumerate(data):
        yield Location(file, path.name, "record", index), value


def _iter_csv(path: Path, file: str) -> Iterator[tuple[Location, Any]]:
    """Rows as {header: cell}; the location is the row's first line (quoted cells may span lines)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return
            last_line = reader.line_num
            for row in reader:
                loc = Location(file, path.name, "line", last_line + 1)
                last_line = reader.line_num
                if not row:
                    continue  # blank line
                if len(row) != len(header):
                    message = f"row has {len(row)} cells but the header has {len(header)}"
                    yield loc, DataError(message, reason="malformed_csv", location=loc)
                else:
                    yield loc, dict(zip(header, row))
        except (csv.Error, UnicodeDecodeError) as err:  # the reader cannot resume after these
            raise DataError(f"{file} line {reader.line_num}: unreadable CSV: {err}", reason="invalid_file") from err


def _iter_parquet(path: Path, file: str) -> Iterator[tuple[Location, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise DataError(f"{file}: not a readable Parquet file: {err}", reason="invalid_file") from err
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Location(file, path.name, "record", index), row
            index += 1


def _iter_hf(cfg: DataConfig, file: str) -> Iterator[tuple[Location, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.path, name=cfg.hf_subset, split=cfg.hf_split, revision=cfg.revision)
    except Exception as err:  # load_dataset raises many unrelated types (FileNotFound, ValueError, hub errors...)
        message = f"could not load HF dataset: {type(err).__name__}: {err}"
        raise DataError(message, reason="invalid_file", location=file) from err
    name = f"{cfg.path}/{cfg.hf_split}"
    for index, row in enumerate(dataset):
        yield Location(file, name, "record", index), row


def iter_raw_records(cfg: DataConfig, fmt: str, file: str) -> Iterator[tuple[Location, Any]]:
    if fmt == "hf":
        return _iter_hf(cfg, file)
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data file {cfg.path} does not exist", reason="file_not_found")
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}
    return readers[fmt](path, file)


# ---------------------------------------------------------------------------------------------- normalising


def _as_record(value: Any, loc: Location, field_map: dict[str, str]) -> dict[str, Any]:
    if isinstance(value, DataError):
        raise value
    if not isinstance(value, dict):
        raise DataError(f"record is a JSON {type(value).__name__}, not an object", reason="not_an_object", location=loc)
    if not field_map:
        return value
    record = {k: v for k, v in value.items() if k not in field_map}
    for src, dst in field_map.items():
        if src not in value:
            continue
        if dst in value and dst not in field_map:
            raise DataError(
                f"field_map renames {src!r} to {dst!r} but the record already has {dst!r}",
                reason="field_map_conflict",
                location=loc,
                field=dst,
            )
        record[dst] = value[src]
    return record


def detect_schema(keys: Sequence[str] | set[str], where: str) -> str:
    """Schema from one record's keys (after field_map); a DataError naming ``where`` and the keys if none fits.

    Order: chosen with rejected -> preference (such records also have prompt or messages); ``messages``;
    instruction with output/input -> alpaca; instruction with response/context -> dolly; instruction alone ->
    alpaca (prompt-only); prompt -> prompt_response.
    """
    keys = set(keys)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        if keys & {"output", "input"}:
            return "alpaca"
        if keys & {"response", "context"}:
            return "dolly"
        return "alpaca"
    if "prompt" in keys:
        return "prompt_response"
    raise DataError(
        f"{where}: cannot detect the record schema from the first record's keys {sorted(keys)}; expected "
        "instruction/input/output (alpaca), instruction/context/response (dolly), messages, prompt/response, "
        "or prompt (or messages) with chosen/rejected (preference). "
        "Set data.schema, or rename fields with data.field_map",
        reason="schema_detection",
    )


def _text(record: dict[str, Any], name: str, loc: Location, *, required: bool, label: str | None = None) -> str:
    """A string field. Required: must be present, a string, and not blank. Optional: absent/null/blank -> ''.

    ``label`` is the field as named in errors (e.g. ``messages[2].content``); default ``name``.
    """
    value, present = record.get(name), name in record
    name = label or name
    if value is None:
        if required:
            what = "is null" if present else "is missing"
            raise DataError(f"required field {what}", reason="missing_field", location=loc, field=name)
        return ""
    if not isinstance(value, str):
        message = f"expected a string, got {type(value).__name__} {_preview(value)}"
        raise DataError(message, reason="wrong_type", location=loc, field=name)
    if not value.strip():
        if required:
            raise DataError("empty or whitespace-only", reason="empty_field", location=loc, field=name)
        return ""
    return value


def _preview(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _joined(first: str, second: str) -> str:
    return first + "\n\n" + second if second else first


def _normalise_fields(
    record: dict[str, Any], schema: str, loc: Location, require_response: bool
) -> tuple[list[dict[str, str]], str, set[str]]:
    """(prompt turns, response, fields consumed) for one record of ``schema``."""
    if schema == "alpaca":
        user = _joined(_text(record, "instruction", loc, required=True), _text(record, "input", loc, required=False))
        response = _text(record, "output", loc, required=require_response)
        return [{"role": "user", "content": user}], response, {"instruction", "input", "output"}
    if schema == "dolly":
        user = _joined(_text(record, "instruction", loc, required=True), _text(record, "context", loc, required=False))
        response = _text(record, "response", loc, required=require_response)
        return [{"role": "user", "content": user}], response, {"instruction", "context", "response"}
    if schema == "prompt_response":
        user = _text(record, "prompt", loc, required=True)
        response = _text(record, "response", loc, required=require_response)
        return [{"role": "user", "content": user}], response, {"prompt", "response"}
    if schema == "messages":
        prompt, response = _normalise_messages(record, loc, require_response)
        return prompt, response, {"messages"}
    if schema == "preference":
        if "messages" in record:  # every turn is prompt: the responses are chosen / rejected
            # checked on the raw turns: _normalise_messages would take even an empty final assistant turn as
            # the response, and it would vanish from the prompt unnoticed
            last = record["messages"][-1] if isinstance(record["messages"], list) and record["messages"] else None
            if isinstance(last, dict) and last.get("role") == "assistant":
                raise DataError("a preference record's messages are the prompt and must not end with an assistant "
                                "turn; put the responses in chosen / rejected", reason="wrong_type", location=loc,
                                field="messages")
            prompt, _ = _normalise_messages(record, loc, require_response=False)
        else:
            prompt = [{"role": "user", "content": _text(record, "prompt", loc, required=True)}]
        return prompt, _text(record, "chosen", loc, required=True), {"prompt", "messages", "chosen"}
    raise ValueError(f"unknown schema {schema!r}")


def _normalise_messages(
    record: dict[str, Any], loc: Location, require_response: bool
) -> tuple[list[dict[str, str]], str]:
    """The final turn, if it is an assistant turn, is the response; every turn before it is the prompt.

    A conversation that does not end with an assistant turn is a bad record (``no_final_assistant_turn``)
    unless ``require_response`` is false, in which case all of it is the prompt and the response is ''.
    Turns after the last assistant turn are never dropped silently.
    """
    def bad(message: str, reason: str, field: str = "messages") -> DataError:
        return DataError(message, reason=reason, location=loc, field=field)

    turns = record.get("messages")
    if turns is None:
        raise bad("required field is missing or null", "missing_field")
    if not isinstance(turns, list):
        raise bad(f"expected a list of turns, got {type(turns).__name__} {_preview(turns)}", "wrong_type")
    final_is_response = bool(turns) and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant"
    normalised: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise bad(f"expected a {{role, content}} object, got {type(turn).__name__}", "wrong_type", where)
        role = turn.get("role")
        if role not in ROLES:
            if role is None:
                raise bad("required field is missing or null", "missing_field", f"{where}.role")
            raise bad(f"unknown role {_preview(role)}; expected one of {ROLES}", "unknown_role", f"{where}.role")
        is_response = final_is_response and i == len(turns) - 1
        content = _text(turn, "content", loc, required=require_response or not is_response, label=f"{where}.content")
        normalised.append({"role": role, "content": content})
    if final_is_response:
        response = normalised.pop()["content"]
    elif require_response:
        last = normalised[-1]["role"] if normalised else "none"
        raise bad(f"the conversation must end with an assistant turn (the response); last role is {last}",
                  "no_final_assistant_turn")
    else:
        response = ""
    if not normalised:
        raise bad("no prompt turns before the response", "no_prompt_turns")
    return normalised, response


def _sample_id(
    record: dict[str, Any], id_field: str, loc: Location, messages: list[dict[str, str]], response: str,
    rejected: str | None = None,
) -> str:
    value = record.get(id_field)
    if value is None:
        return content_id(messages, response, rejected)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        message = f"id must be a string or integer, got {type(value).__name__} {_preview(value)}"
        raise DataError(message, reason="wrong_type", location=loc, field=id_field)
    if isinstance(value, str) and not value.strip():
        raise DataError("id is empty or whitespace-only", reason="empty_field", location=loc, field=id_field)
    return str(value)


def _weight(record: dict[str, Any], name: str, loc: Location) -> float:
    """The record's loss weight: a finite number >= 0 (a numeric string too: CSV cells are strings)."""
    if record.get(name) is None:
        what = "is null" if name in record else "is missing"
        raise DataError(f"loss-weight field {what} (data.weight_field)", reason="missing_field", location=loc,
                        field=name)
    value = record[name]
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        message = f"loss weight must be a number, got {type(value).__name__} {_preview(value)}"
        raise DataError(message, reason="wrong_type", location=loc, field=name)
    if not math.isfinite(number) or number < 0:
        raise DataError(f"loss weight must be finite and >= 0, got {_preview(value)}", reason="invalid_value",
                        location=loc, field=name)
    return number


def normalise_record(record: dict[str, Any], schema: str, loc: Location, record_index: int, cfg: DataConfig) -> Sample:
    """One record (already field-mapped) of ``schema`` -> Sample; a DataError for anything unusable."""
    prompt, response, consumed = _normalise_fields(record, schema, loc, cfg.require_response)
    rejected = None
    if schema == "preference":
        rejected = _text(record, "rejected", loc, required=True)
        consumed = consumed | {"rejected"}
    weight = 1.0
    if cfg.weight_field is not None:
        weight = _weight(record, cfg.weight_field, loc)
        consumed = consumed | {cfg.weight_field}
    sample_id = _sample_id(record, cfg.id_field, loc, prompt, response, rejected)  # before the system prompt
    if cfg.system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    meta = {k: v for k, v in record.items() if k not in consumed and k != cfg.id_field}
    meta["record_index"] = record_index
    return Sample(sample_id=sample_id, messages=tuple(prompt), response=response, source=loc.source, meta=meta,
                  rejected=rejected, weight=weight)


def load_samples(cfg: DataConfig) -> tuple[list[Sample], DataReport]:
    """Read ``cfg.path`` and normalise every record; bad records and duplicates per the config's policies.

    JSONL is streamed line by line; other formats are read whole. The schema is detected (when ``auto``) from
    the first record that is an object. ``limit`` stops reading once that many samples are kept; ``sample`` draws
    its seeded subset from every sample that survives (:func:`draw_sample`).
    """
    transform = None
    if cfg.preset:
        from .presets import get_preset, resolve

        cfg, transform = resolve(cfg), get_preset(cfg.preset).transform
    if cfg.path.startswith(REF_PREFIX):
        cfg = replace(cfg, path=resolve_data_path(cfg.path, cfg.revision))
    fmt = _resolve_format(cfg)
    file = f"{cfg.path} (HF subset {cfg.hf_subset}, split {cfg.hf_split})" if fmt == "hf" else cfg.path
    report = DataReport(source=file, format=fmt, schema="" if cfg.schema == "auto" else cfg.schema)
    skip_bad = cfg.on_bad_record == "skip"
    samples: list[Sample] = []
    first_by_id: dict[str, Sample] = {}
    keep_if_seen = dict.fromkeys(cfg.keep_if, False)  # was each keep_if field in any record it checked?
    keep_if_keys: list[str] | None = None  # the fields of the first record keep_if checked, for its error

    def reject(err: DataError, skip: bool) -> None:
        if not skip:
            raise err
        report.add_skip(err)

    for record_index, (loc, value) in enumerate(iter_raw_records(cfg, fmt, file)):
        if cfg.limit is not None and len(samples) >= cfg.limit:
            break
        report.records_read += 1
        try:
            record = _as_record(value, loc, cfg.field_map)
            if transform is not None:
                record = transform(record, loc)  # None: the preset does not select the row
        except DataError as err:
            reject(err, skip_bad)
            continue
        if record is not None and cfg.keep_if:
            keep_if_keys = sorted(record) if keep_if_keys is None else keep_if_keys
            if not _keep(record, cfg.keep_if, keep_if_seen):
                record = None
        if record is None:  # not a bad record, so counted whatever on_bad_record says
            by = "data.keep_if" if transform is None else f"data.preset {cfg.preset} or data.keep_if"
            report.add_skip(DataError(f"not selected by {by}", reason="not_selected", location=loc))
            continue
        if not report.schema:
            report.schema = detect_schema(record.keys(), file)  # a file-level error: never skipped
        try:
            sample = normalise_record(record, report.schema, loc, record_index, cfg)
        except DataError as err:
            reject(err, skip_bad)
            continue
        first = first_by_id.get(sample.sample_id)
        if first is not None:
            err, skip, same = _repeat_error(first, sample, loc, cfg)
            reject(err, skip)
            if same:
                report.duplicates[record_index] = sample.sample_id
            continue
        first_by_id[sample.sample_id] = sample
        samples.append(sample)
        report.kept += 1
    # A field no record has is more likely a typo than a filter that rightly keeps nothing.
    never_seen = [name for name, seen in keep_if_seen.items() if not seen]
    if never_seen and keep_if_keys is not None:
        after = " after the preset's transform" if transform is not None else ""
        raise ConfigError(f"data.keep_if field {never_seen[0]!r} is in no record of {file}, so none was selected; "
                          f"the first record has the fields {keep_if_keys}{after}")
    if cfg.sample is not None:
        samples = draw_sample(samples, cfg.sample, report)
    if report.n_skipped:
        only_unselected = set(report.skipped) <= {"not_selected", "not_drawn"}
        logger.log(logging.INFO if only_unselected else logging.WARNING, "%s", report.summary())
    return samples, report


def draw_sample(samples: list[Sample], spec: DataSample, report: DataReport) -> list[Sample]:
    """The ``spec.n`` samples whose hash of (seed, sample_id) is lowest, in their input order; the others are
    counted as skipped ``not_drawn`` (so ``records_read == kept + skipped`` still holds) and the draw is recorded
    in ``report.sampled`` with a fingerprint of the drawn ids."""
    def rank(sample: Sample) -> str:
        return hashlib.sha256(f"{spec.seed}\0{sample.sample_id}".encode()).hexdigest()

    pool = len(samples)
    if spec.n >= pool:
        if spec.n > pool:
            logger.warning("data.sample.n is %d but only %d samples of %s survive validation: all are kept",
                           spec.n, pool, report.source)
        drawn = samples
    else:
        chosen = {s.sample_id for s in sorted(samples, key=rank)[:spec.n]}
        drawn = [s for s in samples if s.sample_id in chosen]
        report.skipped["not_drawn"] = report.skipped.get("not_drawn", 0) + pool - len(drawn)
        report.examples.setdefault("not_drawn", []).append(
            f"{pool - len(drawn)} samples not drawn by data.sample (n {spec.n}, seed {spec.seed})")
    report.kept = len(drawn)
    drawn_ids = {s.sample_id for s in drawn}
    # an identical repeat shares its first occurrence's fate (curate): not drawn, it is not read as a sample either
    report.duplicates = {i: sid for i, sid in report.duplicates.items() if sid in drawn_ids}
    ids = hashlib.sha256("\n".join(sorted(drawn_ids)).encode()).hexdigest()[:16]
    report.sampled = {"n": spec.n, "seed": spec.seed, "pool": pool, "drawn": len(drawn), "ids_fingerprint": ids}
    return drawn


def _repeat_error(first: Sample, sample: Sample, loc: Location, cfg: DataConfig) -> tuple[DataError, bool, bool]:
    """A record whose sample_id an earlier one already has: the error, whether the config skips it, and whether
    the content is identical (an identical repeat shares its first occurrence's fate when curate rewrites)."""
    same = (first.messages, first.response, first.rejected) == (sample.messages, sample.response, sample.rejected)
    if cfg.on_duplicate == "skip" and not same:
        conflict = DataError(f"sample_id {sample.sample_id!r} was already used by {first.source} for different content",
                             reason="duplicate_id_conflict", location=loc, field=cfg.id_field)
        return conflict, cfg.on_bad_record == "skip", same
    duplicate = DataError(f"duplicate of {first.source} (sample_id {sample.sample_id!r}"
                          + (")" if same else ", different content; the first is kept)"),
                          reason="duplicate", location=loc)
    return duplicate, cfg.on_duplicate != "error", same


def _keep(record: dict[str, Any], keep_if: dict[str, Any], seen: dict[str, bool]) -> bool:
    """Whether every ``keep_if`` field is present and equal; marks in ``seen`` the fields the record has.

    A bool only equals a bool (``is_safe: false`` must not select a 0 score), while ``1`` still equals ``1.0``.
    """
    keep = True
    for name, wanted in keep_if.items():  # no early exit: every field present is marked seen
        if name not in record:
            keep = False
            continue
        seen[name] = True
        value = record[name]
        keep = keep and isinstance(value, bool) == isinstance(wanted, bool) and value == wanted
    return keep
