"""``sqsd-ray curate``: act on a score file — drop the riskiest samples of a corpus, or down-weight them.

The corpus records are matched to the score rows by the ``sample_id`` the scorer gave them (``data.records.load_samples``
with the same data config: the record's id field, else its content hash). The matched samples with a usable score
(finite, status ``ok``) are ranked exactly as ``partition`` ranks them (``partition.rank_bands``: highest risk first,
ties by sample_id), and then, with n ranked samples:

    drop_top_fraction   remove the k = ⌈q·n⌉ highest-ranked samples (q = ``fraction``)
    drop_above          remove every sample riskier than ``threshold`` (score > t; < t when lower is riskier)
    reweight            keep every record and add a loss weight  w = 1 − (1 − w_min) · u^p
                        u ∈ [0, 1] is the sample's risk position: with ``basis: rank`` its average rank
                        from the safest (0) to the riskiest (1), ties sharing a value; with ``basis: value``
                        the score min-max scaled over the ranked samples. So w ∈ [w_min, 1], 1 for the safest,
                        w_min for the riskiest, never larger for a riskier sample; p = ``power`` > 1 puts the
                        down-weighting on the risky tail (p = 4, w_min = 0.1: the median sample keeps ≈ 0.94,
                        the 90th percentile ≈ 0.41). ``data.weight_field`` reads the weights back into
                        ``Sample.weight`` / ``TokenizedSample.weight``.

Records that have no usable score are kept (weight ``unscored_weight`` in reweight mode) and counted by why:
no score row, a score that is not ok / not finite, or not read as a sample at all (not selected by a preset or
``keep_if``, skipped as a bad record, beyond ``data.limit``, outside the ``data.sample`` draw). An identical repeat of a sample (a duplicate
``load_samples`` skipped) shares its first occurrence's fate. Score rows without a corpus record are counted.

Outputs in ``output.dir``:

    <stem>.curated.<ext>   the corpus in its own format (jsonl, json, csv, parquet; a Hugging Face dataset is
                           written as JSON Lines), every kept record unchanged (JSONL and CSV byte for byte,
                           JSON and Parquet value for value) and in the input order
    manifest.json          every removed sample_id with its score, rank and record index; counts; the config
                           hash; the score file's own metadata (its config hash and fingerprints)
    curate.md, curate.png  counts, and removed vs kept on response length and source (see below)
    curate.csv             one row per corpus sample: score, rank, removed or weight, lengths, source
    config.yaml            the resolved config

Risk scores correlate with response length (paper App. H): unnormalised gradient scores rank short responses
first, and a ranking can reduce to a length filter. ``curate.md`` therefore compares the removed set with the kept
one on response length (tokens from the score file, characters from the corpus) and on source, gives the Spearman
correlation of the score with length over the corpus, and the share of the removed samples that a plain "drop the
k longest" (or "k shortest") filter would also have removed, next to the k/n a random pick would share.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from .. import __version__
from ..config import ConfigError, help_field, stable_hash, to_dict
from ..data.records import SUFFIX_FORMATS, DataConfig, Sample, load_samples
from ..experiments.partition import PartitionSettings, rank_bands
from ..scoring.summary import markdown_table, save_figure, spearman

log = logging.getLogger(__name__)

CurateMode = Literal["drop_top_fraction", "drop_above", "reweight"]
TOKENS = "n_response_tokens"  # the score file's response length (after the chat template and max_length)
MAX_SOURCE_ROWS = 15  # sources shown in curate.md; the rest are summed in one row
OWN_FILES = ("manifest.json", "curate.md", "curate.png", "curate.csv", "config.yaml")


@dataclass
class ReweightSettings:
    """mode reweight: w = 1 − (1 − w_min) · u^power, u the risk position in [0, 1] (module docstring)."""

    basis: Literal["rank", "value"] = help_field(
        "rank", help="u from the average rank (robust to outlying scores) or from the min-max scaled score value"
    )
    w_min: float = help_field(0.1, help="weight of the riskiest sample; every weight lies in [w_min, 1]")
    power: float = help_field(
        4.0, help="p in w = 1 − (1 − w_min)·u^p: 1 is linear in u; larger keeps the bulk near 1 and down-weights "
        "the risky tail (p = 4: median ≈ 0.94, 90th percentile ≈ 0.41 with w_min 0.1)"
    )
    weight_field: str = help_field(
        "loss_weight", help="field added to every record; read it back with data.weight_field"
    )
    unscored_weight: float = help_field(1.0, help="weight of records without a usable score")

    def __post_init__(self) -> None:
        if self.basis not in ("rank", "value"):
            raise ConfigError(f"reweight.basis: expected 'rank' or 'value', got {self.basis!r}")
        if not 0.0 <= self.w_min <= 1.0:
            raise ConfigError(f"reweight.w_min must be in [0, 1], got {self.w_min}")
        if not self.power > 0:
            raise ConfigError(f"reweight.power must be > 0, got {self.power}")
        if not (math.isfinite(self.unscored_weight) and self.unscored_weight >= 0):
            raise ConfigError(f"reweight.unscored_weight must be a finite number >= 0, got {self.unscored_weight}")
        if not self.weight_field.strip():
            raise ConfigError("reweight.weight_field is empty: name the field the weights are written to")


@dataclass
class CurateOutput:
    """Not a ``RunOutput``: output.dir may hold other files (the corpus's own directory, say), and overwrite
    replaces only what an earlier curation wrote there."""

    dir: str = help_field("runs/curate", help="where the curated corpus, manifest.json and curate.md are written")
    overwrite: bool = help_field(False, help="replace an earlier curation in output.dir")
    figure: bool = help_field(True, help="draw curate.png (score vs response length, removed samples marked)")


@dataclass
class CurateConfig:
    scores: str = help_field("", help="scores.parquet of a `score` run (or any Parquet with sample_id + the column)")
    column: str = help_field("sqsd", help="score column to act on (sqsd, sqsd_raw, danger_proj, a baseline's score)")
    higher_is_riskier: bool = help_field(True, help="true for SQSD and the danger projection")
    data: DataConfig = field(default_factory=DataConfig)
    source_field: str | None = help_field(
        None, help="record field grouping the corpus by source in curate.md (e.g. category); default: 'source', "
        "else 'category' when records have it, else the file"
    )
    mode: CurateMode = help_field(
        "drop_top_fraction", help="drop_top_fraction: remove the ⌈fraction·n⌉ riskiest of the n scored samples; "
        "drop_above: remove those riskier than threshold; reweight: keep all, add a loss weight"
    )
    fraction: float = help_field(
        0.1, help="q in (0, 1): share of the scored samples drop_top_fraction removes; in reweight mode the share "
        "shown as the most down-weighted group in curate.md"
    )
    threshold: float | None = help_field(None, help="drop_above: scores beyond it are removed")
    unread_records: Literal["keep", "drop"] = help_field(
        "keep", help="records the data config does not read as samples (beyond data.limit, outside the data.sample "
        "draw, not selected by a preset "
        "or keep_if, bad records skipped): keep writes them unchanged, drop leaves them out (e.g. to keep only the "
        "scored data.limit subset); counted either way"
    )
    reweight: ReweightSettings = field(default_factory=ReweightSettings)
    output: CurateOutput = field(default_factory=CurateOutput)

    def __post_init__(self) -> None:
        if self.mode not in get_args(CurateMode):
            raise ConfigError(f"mode: expected one of {get_args(CurateMode)}, got {self.mode!r}")
        if self.unread_records not in ("keep", "drop"):
            raise ConfigError(f"unread_records: expected 'keep' or 'drop', got {self.unread_records!r}")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction must be in (0, 1) (the share of the scored samples, e.g. 0.1), got "
                              f"{self.fraction}")
        if self.mode == "drop_above":
            if self.threshold is None:
                raise ConfigError("mode drop_above needs threshold: samples scoring beyond it are removed")
            if not math.isfinite(self.threshold):
                raise ConfigError(f"threshold must be a finite number, got {self.threshold}")


# ---------------------------------------------------------------------------------------------- deciding


def read_scores(path: str | Path, column: str) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The score table and its ``sqsd_ray`` schema metadata (None for a Parquet written elsewhere)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score file {path} does not exist (scores: the scores.parquet of a `score` run)")
    scores = pd.read_parquet(path)
    if "sample_id" not in scores.columns:
        raise ValueError(f"score file {path} has no sample_id column; columns: {sorted(scores.columns)}")
    if column not in scores.columns:
        raise ConfigError(f"column {column!r} is not in the score file {path}; available columns: "
                          f"{sorted(scores.columns)}")
    scores["sample_id"] = scores["sample_id"].astype(str)  # as data.records makes them: an integer id field -> str
    repeated = scores["sample_id"][scores["sample_id"].duplicated()]
    if len(repeated):
        raise ValueError(f"score file {path} has {len(repeated)} repeated sample_id(s) (first: "
                         f"{repeated.iloc[0]!r}); a scores.parquet from `score` holds each id once")
    raw = (pq.read_schema(path).metadata or {}).get(b"sqsd_ray")
    return scores, (json.loads(raw) if raw else None)


def _source_groups(samples: list[Sample], source_field: str | None) -> tuple[str, list[str]]:
    """(what groups the samples, each sample's group): the configured field, 'source', 'category' or the file."""
    if source_field is not None:
        if not any(source_field in s.meta for s in samples):
            fields = sorted({k for s in samples[:100] for k in s.meta} - {"record_index"})
            raise ConfigError(f"source_field {source_field!r} is in no corpus record; the records' other fields: "
                              f"{fields}")
        name = source_field
    else:
        name = next((f for f in ("source", "category") if any(f in s.meta for s in samples)), "file")
    if name == "file":
        return name, [re.sub(r"(:\d+|\[\d+\])$", "", s.source) for s in samples]
    return name, ["(none)" if s.meta.get(name) is None else str(s.meta[name]) for s in samples]


def rank_weights(scores: np.ndarray, settings: ReweightSettings, higher_is_riskier: bool = True) -> np.ndarray:
    """w = 1 − (1 − w_min)·u^power for the ranked samples' scores; u from average ranks or min-max values."""
    n = len(scores)
    if settings.basis == "rank":
        risk = scores if higher_is_riskier else -scores
        u = (pd.Series(risk).rank(method="average").to_numpy() - 1.0) / max(n - 1, 1)  # 0 safest .. 1 riskiest
    else:
        lo, hi = float(scores.min()), float(scores.max())
        if hi == lo:
            log.warning("every ranked sample has the same score %g: all weights are 1", lo)
            u = np.zeros(n)
        else:
            u = (scores - lo) / (hi - lo) if higher_is_riskier else (hi - scores) / (hi - lo)
    weights = 1.0 - (1.0 - settings.w_min) * np.clip(u, 0.0, 1.0) ** settings.power
    return np.clip(np.round(weights, 6), settings.w_min, 1.0)


def decide(cfg: CurateConfig, scores: pd.DataFrame, samples: list[Sample]) -> tuple[pd.DataFrame, int]:
    """One row per corpus sample (sample_id, record_index, state, score, rank, removed, flagged, weight, lengths)
    and the number of score rows that match no corpus record.

    ``state``: scored (ranked), no_score_row, or score_not_usable. ``flagged``: the removed samples, or in
    reweight mode the ⌈fraction·n⌉ riskiest (the most down-weighted), the group curate.md compares.
    """
    if not samples:
        raise ValueError(f"the corpus {cfg.data.path} has no samples to curate")
    ids = [s.sample_id for s in samples]
    in_corpus = scores["sample_id"].isin(set(ids))
    if not in_corpus.any():
        raise ValueError(
            f"the score file {cfg.scores} and the corpus {cfg.data.path} share no sample_id (scores e.g. "
            f"{scores['sample_id'].head(3).tolist()}, corpus e.g. {ids[:3]}); curate with the data config the "
            "scores were made from (data.id_field, field_map, preset, keep_if: the config.yaml next to the scores)")
    matched = scores[in_corpus]
    try:  # the same ranking as partition's S1..S5; n_bands only has to be valid
        ranked, _ = rank_bands(matched, PartitionSettings(column=cfg.column, higher_is_riskier=cfg.higher_is_riskier,
                                                          n_bands=2))
    except ValueError as err:
        raise ValueError(f"fewer than 2 corpus samples have a usable {cfg.column!r} score (finite, status ok): "
                         f"nothing to rank ({err})") from err
    n = len(ranked)
    values, ranks = ranked["score"].to_numpy(float), ranked["rank"].to_numpy()
    k_top = math.ceil(round(cfg.fraction * n, 9))  # round first: 0.1 * 30 is 3.0000000000000004
    removed = np.zeros(n, bool)
    if cfg.mode == "drop_top_fraction":
        removed = ranks <= k_top
        if removed.all():
            raise ConfigError(f"fraction {cfg.fraction} of the {n} scored samples rounds up to all {n} "
                              f"(k = ⌈q·n⌉ = {k_top}): nothing would be left; lower fraction")
    elif cfg.mode == "drop_above":
        removed = values > cfg.threshold if cfg.higher_is_riskier else values < cfg.threshold
        if removed.all():
            side = "above" if cfg.higher_is_riskier else "below"
            raise ConfigError(
                f"threshold {cfg.threshold:g} removes all {n} scored samples (every {cfg.column} is {side} it: "
                f"range {values.min():.4g} .. {values.max():.4g}, median {np.median(values):.4g}); "
                f"{'raise' if cfg.higher_is_riskier else 'lower'} threshold")
    flagged = removed if cfg.mode != "reweight" else ranks <= k_top
    weights = (rank_weights(values, cfg.reweight, cfg.higher_is_riskier) if cfg.mode == "reweight"
               else np.ones(n))
    decided = pd.DataFrame({"sample_id": ranked["sample_id"].to_numpy(), "score": values, "rank": ranks,
                            "removed": removed, "flagged": flagged, "weight": weights})
    table = pd.DataFrame({"sample_id": ids, "record_index": [int(s.meta["record_index"]) for s in samples],
                          "response_chars": [len(s.response) for s in samples]})
    table = table.merge(decided, on="sample_id", how="left")
    table["state"] = np.where(table["rank"].notna(), "scored",
                              np.where(table["sample_id"].isin(set(matched["sample_id"])), "score_not_usable",
                                       "no_score_row"))
    table["removed"] = table["removed"].astype("boolean").fillna(False).astype(bool)
    table["flagged"] = table["flagged"].astype("boolean").fillna(False).astype(bool)
    table["weight"] = table["weight"].fillna(cfg.reweight.unscored_weight)
    table["rank"] = table["rank"].astype("Int64")
    if TOKENS in scores.columns:
        table["response_tokens"] = table["sample_id"].map(scores.set_index("sample_id")[TOKENS]).astype(float)
    else:
        table["response_tokens"] = np.nan
    return table, int((~in_corpus).sum())


# ---------------------------------------------------------------------------------------------- writing


def _format_weight(weight: float) -> str:
    return json.dumps(round(float(weight), 6))


def _clash(weight_field: str, where: str) -> ConfigError:
    return ConfigError(f"{where} already has a field {weight_field!r}; set reweight.weight_field to another name "
                       "(or curate the original corpus)")


def _split_ending(raw: Any) -> tuple[Any, Any]:
    body = raw.rstrip(b"\r\n" if isinstance(raw, bytes) else "\r\n")
    return body, raw[len(body):]


def _write_jsonl(src: Path, dst: Path, drop: set[int], weight_of: Callable[[int], float] | None,
                 weight_field: str) -> int:
    """Lines copied byte for byte; record indices count non-blank lines, as ``data`` reads them."""
    index = 0
    key = json.dumps(weight_field, ensure_ascii=False).encode("utf-8")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for raw in fin:
            if not raw.strip():
                fout.write(raw)  # blank lines are not records: kept as they are
                continue
            index += 1
            if index - 1 in drop:
                continue
            if weight_of is not None:
                where = f"{src} record index {index - 1} (0-based, counting non-blank lines)"
                raw = _jsonl_with_weight(raw, key, weight_field, weight_of(index - 1), where)
            fout.write(raw)
    return index


def _jsonl_with_weight(raw: bytes, key: bytes, weight_field: str, weight: float, where: str) -> bytes:
    """The line with ``"field": w`` spliced in before its closing brace; any other line is left unchanged."""
    body, ending = _split_ending(raw)
    try:
        value = json.loads(body.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw  # a malformed line stays as it is: the reader rejects or skips it again
    if not isinstance(value, dict):
        return raw
    if weight_field in value:
        raise _clash(weight_field, where)
    body = body.rstrip()
    separator = b", " if value else b""
    return body[:-1] + separator + key + b": " + _format_weight(weight).encode() + b"}" + ending


def _csv_cell(text: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([text])
    return buffer.getvalue()


def _write_csv(src: Path, dst: Path, drop: set[int], weight_of: Callable[[int], float] | None,
               weight_field: str) -> int:
    """Each row's own lines copied verbatim (a quoted cell may span lines); indices as ``data`` counts rows."""
    pending: list[str] = []

    def lines() -> Iterator[str]:
        with open(src, newline="", encoding="utf-8") as fh:
            for number, line in enumerate(fh):
                pending.append(line)
                yield line.removeprefix("\ufeff") if number == 0 else line

    def take() -> str:
        text = "".join(pending)
        pending.clear()
        return text

    reader = csv.reader(lines())
    index = 0
    with open(dst, "w", newline="", encoding="utf-8") as out:
        header = next(reader, None)
        if header is None:
            return 0
        raw = take()
        if weight_of is not None:
            if weight_field in header:
                raise _clash(weight_field, f"the CSV header of {src}")
            body, ending = _split_ending(raw)
            raw = body + "," + _csv_cell(weight_field) + (ending or "\n")
        out.write(raw)
        for row in reader:
            raw = take()
            if not row:
                out.write(raw)
                continue
            index += 1
            if index - 1 in drop:
                continue
            if weight_of is not None and len(row) == len(header):  # a malformed row stays as it is
                body, ending = _split_ending(raw)
                raw = body + "," + _format_weight(weight_of(index - 1)) + ending
            out.write(raw)
    return index


def _write_json(src: Path, dst: Path, drop: set[int], weight_of: Callable[[int], float] | None,
                weight_field: str) -> int:
    """The list (or ``{"data": [...]}`` with its other keys) without the dropped records; values unchanged."""
    text = src.read_text(encoding="utf-8-sig")
    data = json.loads(text)
    records = data["data"] if isinstance(data, dict) else data
    kept = []
    for index, record in enumerate(records):
        if index in drop:
            continue
        if weight_of is not None and isinstance(record, dict):
            if weight_field in record:
                raise _clash(weight_field, f"{src} record index {index} (0-based)")
            record = {**record, weight_field: round(float(weight_of(index)), 6)}
        kept.append(record)
    out = {**data, "data": kept} if isinstance(data, dict) else kept
    indent = 2 if "\n" in text.strip() else None
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=indent) + ("\n" if text.endswith("\n") else ""),
                   encoding="utf-8")
    return len(records)


def _write_parquet(src: Path, dst: Path, drop: set[int], weight_of: Callable[[int], float] | None,
                   weight_field: str) -> int:
    """The kept rows of the table (same schema and schema metadata), plus a float64 weight column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    keep = [i for i in range(table.num_rows) if i not in drop]
    out = table.take(pa.array(keep, pa.int64()))
    if weight_of is not None:
        if weight_field in out.column_names:
            raise _clash(weight_field, f"the Parquet schema of {src}")
        out = out.append_column(weight_field, pa.array([round(float(weight_of(i)), 6) for i in keep], pa.float64()))
    pq.write_table(out, dst)
    return table.num_rows


def _write_hf(data_cfg: DataConfig, dst: Path, drop: set[int], weight_of: Callable[[int], float] | None,
              weight_field: str) -> int:
    """A Hugging Face dataset's records as JSON Lines (values not JSON-native, e.g. dates, as strings)."""
    from ..data.records import iter_raw_records

    index = 0
    with open(dst, "w", encoding="utf-8") as out:
        for index, (_, record) in enumerate(iter_raw_records(data_cfg, "hf", data_cfg.path), start=1):
            if index - 1 in drop:
                continue
            record = dict(record)
            if weight_of is not None:
                if weight_field in record:
                    raise _clash(weight_field, f"{data_cfg.path} record index {index - 1} (0-based)")
                record[weight_field] = round(float(weight_of(index - 1)), 6)
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return index


class _LeftOut:
    """The record indices not written: the removed samples' records and, unless ``read`` is None, every record
    not among ``read`` (the records read as samples, and their identical repeats)."""

    def __init__(self, removed: set[int], read: set[int] | None):
        self.removed, self.read = removed, read

    def __contains__(self, index: object) -> bool:
        return index in self.removed or (self.read is not None and index not in self.read)


WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "json": _write_json, "parquet": _write_parquet}


def curated_path(data_cfg: DataConfig, fmt: str, out_dir: Path) -> Path:
    """``<stem>.curated<suffix>``: the input's suffix when it names its format, else ``.<format>``."""
    if fmt == "hf":
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{data_cfg.path}.{data_cfg.hf_split}").strip("_.")
        return out_dir / f"{stem}.curated.jsonl"
    src = Path(data_cfg.path)
    suffix = src.suffix if SUFFIX_FORMATS.get(src.suffix.lower()) == fmt else f".{fmt}"
    return out_dir / f"{src.stem}.curated{suffix}"


def write_curated(data_cfg: DataConfig, fmt: str, dst: Path, drop: set[int],
                  weight_of: Callable[[int], float] | None, weight_field: str) -> int:
    """Write the corpus without the records at ``drop`` (0-based record indices as ``data`` numbers them), with
    ``weight_field`` added from ``weight_of(index)`` when given; returns how many records the input has.

    Written to a temporary name and renamed, so a failure leaves no half-written corpus.
    """
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        if fmt == "hf":
            n = _write_hf(data_cfg, tmp, drop, weight_of, weight_field)
        else:
            n = WRITERS[fmt](Path(data_cfg.path), tmp, drop, weight_of, weight_field)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(dst)
    return n


# ---------------------------------------------------------------------------------------------- reporting


def _finite(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python: JSON-safe."""
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _length_stats(rows: pd.DataFrame) -> dict[str, Any]:
    tokens = rows["response_tokens"] if rows["response_tokens"].notna().all() else rows["response_tokens"] * np.nan
    return {"n": int(len(rows)),  # token counts only where every row has one (they come from the score file)
            "mean_tokens": _finite(tokens.mean()),
            "median_tokens": _finite(tokens.median()),
            "mean_chars": _finite(rows["response_chars"].mean()),
            "median_chars": _finite(rows["response_chars"].median()),
            "mean_weight": _finite(rows["weight"].mean())}


def compare(table: pd.DataFrame, source_name: str) -> dict[str, Any]:
    """Flagged (removed / most down-weighted) vs the rest on length and source; score-length correlations and the
    overlap of the flagged set with the same number of longest and of shortest responses."""
    scored = table[table["state"] == "scored"]
    flagged, rest = scored[scored["flagged"]], scored[~scored["flagged"]]
    has_tokens = bool(scored["response_tokens"].notna().all()) and len(scored) > 0
    length = "response_tokens" if has_tokens else "response_chars"
    k, n = len(flagged), len(scored)
    overlap: dict[str, Any] = {"k": k, "n": n, "length": length, "chance": _finite(k / n if n else float("nan"))}
    for end, ascending in (("longest", False), ("shortest", True)):
        extreme = scored.sort_values([length, "sample_id"], ascending=[ascending, True], kind="mergesort").head(k)
        shared = len(set(extreme["sample_id"]) & set(flagged["sample_id"]))
        overlap[end] = {"shared": shared, "share": _finite(shared / k if k else float("nan"))}
    score = scored["score"].to_numpy(float)
    result = {
        "spearman": {"tokens": _finite(spearman(score, scored["response_tokens"].to_numpy(float))),
                     "chars": _finite(spearman(score, scored["response_chars"].to_numpy(float)))},
        "groups": {"flagged": _length_stats(flagged), "rest": _length_stats(rest),
                   "unscored": _length_stats(table[table["state"] != "scored"])},
        "overlap": overlap,
        "source_field": source_name,
        "by_source": [],
    }
    if len(scored):  # weighted mean length: what the weights do to the length the model is trained on
        result["weighted_mean"] = {
            "unweighted": _finite(scored[length].mean()),
            "weighted": _finite(float(np.average(scored[length], weights=scored["weight"]))
                                if scored["weight"].sum() > 0 else float("nan")),
            "length": length}
    for source, rows in table.groupby("source", sort=False):
        ranked = rows[rows["state"] == "scored"]
        result["by_source"].append({
            "source": str(source), "records": int(len(rows)), "scored": int(len(ranked)),
            "flagged": int(ranked["flagged"].sum()),
            "flagged_share": _finite(ranked["flagged"].mean() if len(ranked) else float("nan")),
            "mean_weight": _finite(rows["weight"].mean()),
        })
    result["by_source"].sort(key=lambda r: (-r["records"], r["source"]))
    return result


def _num(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def render_curate_md(cfg: CurateConfig, manifest: dict[str, Any]) -> str:
    """curate.md: what was removed or re-weighted, whether it is more than a length filter, and by source."""
    lines = [f"# Curation of {cfg.data.path} by {cfg.column} ({cfg.mode})", ""]
    lines += _what_was_done_md(cfg, manifest)
    lines += _length_filter_md(cfg, manifest["comparison"])
    lines += _by_source_md(cfg, manifest["comparison"])
    if cfg.output.figure and manifest.get("figure"):
        lines += [f"![{cfg.column} vs response length]({manifest['figure']})", ""]
    return "\n".join(lines)


def _what_was_done_md(cfg: CurateConfig, manifest: dict[str, Any]) -> list[str]:
    c = manifest["counts"]
    reweight = cfg.mode == "reweight"
    lines = []
    if cfg.mode == "drop_top_fraction":
        lines.append(f"- removed the ⌈{cfg.fraction:g}·n⌉ = {c['samples_removed']} highest-ranked of the "
                     f"{c['samples_scored']} scored samples")
    elif cfg.mode == "drop_above":
        side = ">" if cfg.higher_is_riskier else "<"
        lines.append(f"- removed the {c['samples_removed']} of {c['samples_scored']} scored samples with "
                     f"{cfg.column} {side} {cfg.threshold:g}")
    else:
        r, w = cfg.reweight, manifest["weights"]
        lines.append(f"- weight = 1 − (1 − {r.w_min:g})·u^{r.power:g}, u the risk position by {r.basis} "
                     f"(0 safest, 1 riskiest), written as `{r.weight_field}`; records without a score weigh "
                     f"{r.unscored_weight:g}")
        lines.append(f"- weights min / median / mean / max: {w['min']:.3f} / {w['median']:.3f} / {w['mean']:.3f} / "
                     f"{w['max']:.3f}; total weight {w['total']:.1f} of {c['records_written']} records")
    out_note = " (a Hugging Face dataset, written as JSON Lines)" if manifest["corpus"]["format"] == "hf" else ""
    lines += [
        f"- corpus: {c['records_in_corpus']} records ({manifest['corpus']['format']}) -> "
        f"{manifest['corpus']['output']}: {c['records_written']} records{out_note}",
    ]
    if not reweight:
        repeats = c["records_removed"] - c["samples_removed"]
        lines.append(f"- records removed: {c['records_removed']} ({c['samples_removed']} samples"
                     + (f" + {repeats} identical repeat{'s' if repeats > 1 else ''})" if repeats else ")"))
    if c["unread_records_left_out"]:
        lines.append(f"- records not read as samples, left out (unread_records: drop): {c['unread_records_left_out']}")
    unscored = c["kept_without_score"]
    lines.append(f"- kept without a usable score: {sum(unscored.values())} (no score row: {unscored['no_score_row']}, "
                 f"score not ok / not finite: {unscored['score_not_usable']}, not read as a sample: "
                 f"{unscored['not_read_as_sample']})")
    lines.append(f"- score rows without a corpus record: {c['scores_without_record']} of {c['score_rows']}")
    hash_ = manifest["scores"]["config_hash"]
    lines += [f"- scores: {cfg.scores}" + (f" (config hash {hash_})" if hash_ else ""),
              f"- curation config hash: {manifest['config_hash']}", ""]
    return lines


def _length_filter_md(cfg: CurateConfig, cmp: dict[str, Any]) -> list[str]:
    reweight = cfg.mode == "reweight"
    flagged_label = f"most down-weighted ({cmp['overlap']['k']} riskiest)" if reweight else "removed"
    rest_label = "rest (scored)" if reweight else "kept (scored)"
    o = cmp["overlap"]
    length_name = "tokens" if o["length"] == "response_tokens" else "characters"
    lines = ["## More than a length filter? (App. H)", "",
             "Risk scores correlate with response length: unnormalised gradient scores rank short responses first. "
             "If the removed set is mostly the longest (or shortest) responses, the curation is close to a length "
             "filter.", "",
             f"- Spearman({cfg.column}, response tokens) = {_num(cmp['spearman']['tokens'], 3)}, "
             f"Spearman({cfg.column}, response characters) = {_num(cmp['spearman']['chars'], 3)} over the "
             f"{o['n']} scored samples"]
    if o["k"]:
        lines.append(f"- of the {o['k']} {flagged_label.split(' (')[0]} samples, {o['longest']['shared']} "
                     f"({_pct(o['longest']['share'])}) are also among the {o['k']} longest responses (in {length_name})"
                     f" and {o['shortest']['shared']} ({_pct(o['shortest']['share'])}) among the {o['k']} shortest; "
                     f"a random pick of {o['k']} shares {_pct(o['chance'])} with either")
    if reweight and "weighted_mean" in cmp:
        wm = cmp["weighted_mean"]
        lines.append(f"- mean response {length_name}: {_num(wm['unweighted'])} unweighted, {_num(wm['weighted'])} "
                     "weighted")
    lines.append("")
    rows = [(flagged_label, cmp["groups"]["flagged"]), (rest_label, cmp["groups"]["rest"])]
    if cmp["groups"]["unscored"]["n"]:
        rows.append(("kept without a score", cmp["groups"]["unscored"]))
    frame = pd.DataFrame([{"group": label, "samples": g["n"], "mean tokens": _num(g["mean_tokens"]),
                           "median tokens": _num(g["median_tokens"]), "mean chars": _num(g["mean_chars"]),
                           "median chars": _num(g["median_chars"]),
                           **({"mean weight": _num(g["mean_weight"], 3)} if reweight else {})}
                          for label, g in rows])
    return lines + markdown_table(frame) + [""]


def _by_source_md(cfg: CurateConfig, cmp: dict[str, Any]) -> list[str]:
    o = cmp["overlap"]
    lines = [f"## By source (`{cmp['source_field']}`)", ""]
    by_source = cmp["by_source"]
    shown, hidden = by_source[:MAX_SOURCE_ROWS], by_source[MAX_SOURCE_ROWS:]
    if hidden:
        shown = [*shown, {"source": f"({len(hidden)} other sources)",
                          **{key: sum(r[key] for r in hidden) for key in ("records", "scored", "flagged")},
                          "flagged_share": None, "mean_weight": None}]
    if cfg.mode == "reweight":
        frame = pd.DataFrame([{"source": r["source"], "records": r["records"], "scored": r["scored"],
                               "mean weight": _num(r["mean_weight"], 3), "most down-weighted": r["flagged"]}
                              for r in shown])
    else:
        total = max(o["k"], 1)
        frame = pd.DataFrame([{"source": r["source"], "records": r["records"], "scored": r["scored"],
                               "removed": r["flagged"], "removed % of scored": _pct(r["flagged_share"]),
                               "share of all removed": _pct(r["flagged"] / total if o["k"] else None)}
                              for r in shown])
    return lines + markdown_table(frame) + [""]


def plot_curation(table: pd.DataFrame, column: str, reweight: bool, path: Path) -> Path | None:
    """Score vs response length, removed samples marked (reweight: coloured by weight)."""
    scored = table[table["state"] == "scored"]
    if not len(scored):
        return None
    from ..scoring.summary import pyplot

    plt = pyplot()

    has_tokens = bool(scored["response_tokens"].notna().all())
    x = scored["response_tokens" if has_tokens else "response_chars"].to_numpy(float)
    y = scored["score"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    if reweight:
        points = ax.scatter(x, y, c=scored["weight"], cmap="viridis", s=8, vmin=0.0, vmax=1.0)
        fig.colorbar(points, ax=ax, label="loss weight")
    else:
        flagged = scored["flagged"].to_numpy()
        ax.scatter(x[~flagged], y[~flagged], s=6, alpha=0.5, color="#888888", label="kept")
        ax.scatter(x[flagged], y[flagged], s=10, alpha=0.8, color="#c0392b", label="removed")
        ax.legend(fontsize=8)
    if (x > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("response tokens" if has_tokens else "response characters")
    ax.set_ylabel(column)
    ax.set_title(f"{column} vs length (Spearman {spearman(y, x):+.2f})", fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- the job


def _prepare_output(cfg: CurateConfig) -> Path:
    out = Path(cfg.output.dir)
    manifest = out / "manifest.json"
    if manifest.exists():
        if not cfg.output.overwrite:
            raise FileExistsError(f"{out} already holds a curation; set output.overwrite=true to replace it or "
                                  "choose another output.dir")
        try:
            old = json.loads(manifest.read_text()).get("corpus", {}).get("output")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old and Path(old).parent.resolve() == out.resolve():  # the earlier corpus, whatever its format
            Path(old).unlink(missing_ok=True)
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_curate(cfg: CurateConfig) -> Path:
    """Curate ``cfg.data`` by the scores in ``cfg.scores``; returns the output directory."""
    import yaml

    if not cfg.scores:
        raise ConfigError("scores is empty: set it to the scores.parquet of a `sqsd-ray score` run")
    scores, score_meta = read_scores(cfg.scores, cfg.column)
    samples, report = load_samples(cfg.data)
    table, scores_without_record = decide(cfg, scores, samples)
    source_name, groups = _source_groups(samples, cfg.source_field)
    table["source"] = groups

    data_cfg = cfg.data
    if data_cfg.preset:
        from ..data.presets import resolve

        data_cfg = resolve(data_cfg)
    fmt = report.format
    dst = curated_path(data_cfg, fmt, Path(cfg.output.dir))
    if fmt != "hf" and dst.resolve() == Path(data_cfg.path).resolve():
        raise ConfigError(f"output.dir {cfg.output.dir} would overwrite the corpus {data_cfg.path}; choose another "
                          "output.dir")
    out = _prepare_output(cfg)
    record_ids = dict(zip(table["record_index"], table["sample_id"]))
    record_ids.update(report.duplicates)
    removed_records, n_records = _write_records(cfg, data_cfg, fmt, dst, table, record_ids)

    removed = table[table["removed"]].sort_values("rank")
    states = table["state"].value_counts()
    not_read = n_records - len(record_ids)
    left_out = not_read if cfg.unread_records == "drop" else 0
    counts = {
        "records_in_corpus": n_records,
        "records_written": n_records - len(removed_records) - left_out,
        "records_removed": len(removed_records),
        "unread_records_left_out": left_out,
        "samples_loaded": len(samples),
        "samples_scored": int(states.get("scored", 0)),
        "samples_removed": len(removed),
        "kept_without_score": {"no_score_row": int(states.get("no_score_row", 0)),
                               "score_not_usable": int(states.get("score_not_usable", 0)),
                               "not_read_as_sample": not_read - left_out},
        "duplicate_records": len(report.duplicates),
        "score_rows": len(scores),
        "scores_without_record": scores_without_record,
    }
    manifest = _manifest(cfg, data_cfg, fmt, dst, counts, removed, score_meta, report)
    if cfg.mode == "reweight":
        scored_weights = table.loc[table["state"] == "scored", "weight"]
        manifest["weights"] = {"field": cfg.reweight.weight_field, "min": float(scored_weights.min()),
                               "median": float(scored_weights.median()), "mean": float(scored_weights.mean()),
                               "max": float(scored_weights.max()), "total": float(table["weight"].sum())}
    manifest["comparison"] = compare(table, source_name)
    if cfg.output.figure and plot_curation(table, cfg.column, cfg.mode == "reweight", out / "curate.png"):
        manifest["figure"] = "curate.png"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
    (out / "curate.md").write_text(render_curate_md(cfg, manifest))
    table.drop(columns=["removed"] if cfg.mode == "reweight" else ["flagged", "weight"]).to_csv(
        out / "curate.csv", index=False)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    _log_outcome(cfg, counts, n_records, dst, scores_without_record, len(removed), fmt, data_cfg.path)
    return out


def _write_records(cfg: CurateConfig, data_cfg: DataConfig, fmt: str, dst: Path, table: pd.DataFrame,
                   record_ids: dict[int, str]) -> tuple[set[int], int]:
    """Write the curated corpus; returns the indices of the removed records and the corpus's record count.

    ``record_ids`` maps a record index to its fate's sample: each loaded sample's own record, and identical
    repeats following their first occurrence.
    """
    removed_ids = set(table.loc[table["removed"], "sample_id"])
    removed_records = {index for index, sid in record_ids.items() if sid in removed_ids}
    drop = _LeftOut(removed_records, set(record_ids) if cfg.unread_records == "drop" else None)
    weight_by_id = dict(zip(table["sample_id"], table["weight"])) if cfg.mode == "reweight" else {}

    def weight_of(index: int) -> float:
        return weight_by_id.get(record_ids.get(index), cfg.reweight.unscored_weight)
    reweight = weight_of if cfg.mode == "reweight" else None
    return removed_records, write_curated(data_cfg, fmt, dst, drop, reweight, cfg.reweight.weight_field)


def _manifest(cfg: CurateConfig, data_cfg: DataConfig, fmt: str, dst: Path, counts: dict[str, Any],
              removed: pd.DataFrame, score_meta: dict[str, Any] | None, report) -> dict[str, Any]:
    fingerprints = (score_meta or {}).get("fingerprints", {})
    return {
        "sqsd_ray_version": __version__,
        "config_hash": stable_hash(cfg),
        "mode": cfg.mode,
        "column": cfg.column,
        "higher_is_riskier": cfg.higher_is_riskier,
        "scores": {"path": cfg.scores, "config_hash": fingerprints.get("config"), "metadata": score_meta},
        "corpus": {"path": data_cfg.path, "format": fmt, "output": str(dst),
                   "output_format": "jsonl" if fmt == "hf" else fmt},
        "counts": counts,
        "removed": [{"sample_id": row.sample_id, "score": float(row.score), "rank": int(row.rank),
                     "record_index": int(row.record_index)} for row in removed.itertuples()],
        "data_report": report.to_dict(),
    }


def _log_outcome(cfg: CurateConfig, counts: dict[str, Any], n_records: int, dst: Path, scores_without_record: int,
                 n_removed: int, fmt: str, corpus: str) -> None:
    unscored = sum(counts["kept_without_score"].values())
    log.info("curate: %d of %d records written to %s (%d removed)", counts["records_written"], n_records, dst,
             counts["records_removed"])
    if unscored:
        log.warning("%d records had no usable %s score and were kept unchanged (%s)", unscored, cfg.column,
                    ", ".join(f"{k}: {v}" for k, v in counts["kept_without_score"].items() if v))
    if scores_without_record:
        log.warning("%d score rows match no record of %s", scores_without_record, corpus)
    if cfg.mode != "reweight" and not n_removed:
        log.warning("nothing removed: no scored sample is beyond threshold %g", cfg.threshold)
    if fmt == "hf":
        log.info("the Hugging Face dataset %s was written as JSON Lines", corpus)


__all__ = ["CurateConfig", "CurateOutput", "ReweightSettings", "compare", "curated_path", "decide",
           "rank_weights", "read_scores", "render_curate_md", "run_curate", "write_curated"]
