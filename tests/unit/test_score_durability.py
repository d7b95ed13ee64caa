"""No score is lost or wrong: failed and interrupted overwrites, content-aware resume, damaged parts, the run lock,
and config values that must not be accepted. In process (no Ray); tests/ray covers the same store under Ray."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sqsd_ray.cli import main
from sqsd_ray.models.directions import random_direction
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, lora_module_shapes
from sqsd_ray.scoring import blocks
from tests.conftest import REPO_ROOT, interrupt_scoring_after_parts, save_random_directions

N = 12
SCORE_COLUMNS = ["sqsd", "sqsd_raw", "danger_proj", "safety_proj", "danger_proj_raw", "safety_proj_raw",
                 "update_norm_danger_state", "update_norm_safety_state", "loss_danger_state", "loss_safety_state"]


def _records(n: int = N, changed: dict[int, str] | None = None) -> list[dict]:
    words = "alpha beta gamma delta river mountain quiet bright swift orange window garden".split()
    out = []
    for i in range(n):
        response = " ".join(words[(i + k) % len(words)] for k in range(3 + i % 7)).capitalize() + "."
        out.append({"id": f"r{i:03d}", "prompt": f"Question {i}: tell me about {words[i % len(words)]}?",
                    "response": (changed or {}).get(i, response)})
    return out


def _write_corpus(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A corpus, random directions for tiny-llama, a config, and a reference run of it."""
    root = tmp_path_factory.mktemp("durable")
    _write_corpus(root / "corpus.jsonl", _records())
    save_random_directions(root, "tiny-llama")
    config = {
        "model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
        "data": {"path": str(root / "corpus.jsonl"), "max_length": 256},
        "directions": {"danger": str(root / "danger.safetensors"), "safety": str(root / "safety.safetensors")},
        "output": {"dir": str(root / "reference"), "part_rows": 4},
        "ray": {"enabled": False},
    }
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(root / "score.yaml")]) == 0
    return root


def _score(job: Path, out: Path, *extra: str) -> int:
    return main(["score", "--config", str(job / "score.yaml"), "--set", f"output.dir={out}", *extra])


def _scores(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "scores.parquet").set_index("sample_id")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _max_delta(got: pd.DataFrame, ref: pd.DataFrame) -> float:
    assert got.index.is_unique and set(got.index) == set(ref.index)
    return float(np.abs(got.loc[ref.index, SCORE_COLUMNS].to_numpy(float) - ref[SCORE_COLUMNS].to_numpy(float)).max())


@pytest.fixture
def earlier_run(job, tmp_path):
    out = tmp_path / "run"
    assert _score(job, out) == 0
    return out


# ------------------------------------------------------------------ finding 1: a failed overwrite deletes nothing


def _unfit_direction(root: Path) -> Path:
    shapes = lora_module_shapes(load_model(ModelConfig(name_or_path="tiny-llama", tiny_hidden_size=32)), LoraSettings())
    return random_direction(shapes, rank=8, seed=5, kind="danger").save(root / "danger_h32.safetensors")


@pytest.mark.parametrize("case, override, message", [
    ("missing data file", "data.path=/nonexistent/corpus.jsonl", "corpus.jsonl"),
    ("empty corpus", "data.path={root}/empty.jsonl", "gave no samples"),
    ("unknown model dir", "model.name_or_path=/nonexistent/model", "/nonexistent/model"),
    ("direction that does not fit", "directions.danger={root}/danger_h32.safetensors", "directions.danger"),
])
def test_a_failed_overwrite_leaves_the_earlier_run_byte_for_byte(job, earlier_run, tmp_path, capsys, case, override,
                                                                 message):
    (tmp_path / "empty.jsonl").write_text("")
    _unfit_direction(tmp_path)
    before = _snapshot(earlier_run)
    assert _score(job, earlier_run, "--set", "output.overwrite=true", "--set", override.format(root=tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(earlier_run) == before, f"{case}: the earlier run changed"
    assert not list(tmp_path.glob(".run.*")), "a staging directory or lock was left behind"


def test_an_interrupted_overwrite_keeps_the_earlier_run_and_resumes(job, earlier_run, tmp_path, capsys, monkeypatch):
    before = _snapshot(earlier_run)
    undo = interrupt_scoring_after_parts(monkeypatch, 1)
    overwrite = ["--set", "output.overwrite=true", "--set", "data.max_length=200"]  # another job: a real overwrite
    assert _score(job, earlier_run, *overwrite) == 130
    err = capsys.readouterr().err
    staging = next(tmp_path.glob(".run.staging-*"))
    assert f"interrupted: 4 of {N} samples kept in {staging}; rerun the same command to resume" in err
    assert _snapshot(earlier_run) == before
    undo()
    assert _score(job, earlier_run, *overwrite) == 0
    run = json.loads((earlier_run / "run.json").read_text())
    assert run["resume"]["kept"] == 4 and run["samples_scored_this_run"] == N - 4
    assert yaml.safe_load((earlier_run / "config.yaml").read_text())["data"]["max_length"] == 200
    assert not list(tmp_path.glob(".run.*")), "staging, replaced run or lock left behind"
    assert _max_delta(_scores(earlier_run), _scores(job / "reference")) <= 1e-6


# --------------------------------------------------------------- finding 2: resume follows the corpus's content


def test_resume_rescores_changed_records_and_drops_removed_ones(job, tmp_path, caplog):
    corpus = _write_corpus(tmp_path / "corpus.jsonl", _records())
    assert _score(job, tmp_path / "run", "--set", f"data.path={corpus}") == 0
    edited = [r for r in _records(N + 1, changed={5: "A different answer now."}) if r["id"] not in
              {"r001", "r002", "r003"}]
    _write_corpus(corpus, edited)
    with caplog.at_level(logging.INFO, logger="sqsd_ray"):
        assert _score(job, tmp_path / "run", "--set", f"data.path={corpus}") == 0
    assert "8 kept from an earlier run, 1 changed since, 3 removed" in caplog.text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["resume"] == {"kept": 8, "changed_rescored": 1, "removed_dropped": 3, "parts_set_aside": [],
                             "staged_overwrite": False}
    assert run["samples_scored_this_run"] == 2  # the changed record and the new one
    got = _scores(tmp_path / "run")
    assert sorted(got.index) == sorted(r["id"] for r in edited)
    assert not re.search(r"\bnan\b", (tmp_path / "run" / "summary.md").read_text())  # stale rows showed `nan`
    assert _score(job, tmp_path / "fresh", "--set", f"data.path={corpus}") == 0
    assert _max_delta(got, _scores(tmp_path / "fresh")) <= 1e-6


# ----------------------------------------------------------------------- finding 4: damaged parts, verify


def _damage_data_page(part: Path) -> None:
    """Overwrite bytes in the middle of the file: the footer (schema, offsets) stays intact."""
    blob = bytearray(part.read_bytes())
    footer = struct.unpack("<i", blob[-8:-4])[0] + 8
    middle = (4 + len(blob) - footer) // 2
    blob[middle:middle + 16] = b"\xff" * 16
    part.write_bytes(bytes(blob))


def _flip_bit_in_a_value(part: Path) -> None:
    """Flip the lowest bit of one stored score (snappy keeps float bytes as literals): the file still reads."""
    column = pq.read_table(part, columns=["sqsd"]).column("sqsd")
    value = column[0].as_py()
    blob = bytearray(part.read_bytes())
    at = blob.find(struct.pack("<f" if str(column.type) == "float" else "<d", value))
    assert at > 0, "value not found verbatim in the part"
    blob[at] ^= 1
    part.write_bytes(bytes(blob))
    assert pq.read_table(part, columns=["sqsd"]).column("sqsd")[0].as_py() != value


@pytest.mark.parametrize("damage", [_damage_data_page, _flip_bit_in_a_value])
def test_a_damaged_part_is_set_aside_and_its_samples_scored_again(job, earlier_run, capsys, caplog, damage):
    part = sorted((earlier_run / "parts").glob("part-*.parquet"))[1]
    n_rows = pq.read_metadata(part).num_rows
    damage(part)
    assert main(["verify", str(earlier_run)]) == 1
    assert part.name in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="sqsd_ray"):
        assert _score(job, earlier_run) == 0
    assert f"set aside part {part.name}" in caplog.text
    assert (earlier_run / "set_aside" / part.name).exists() and not part.exists()
    run = json.loads((earlier_run / "run.json").read_text())
    assert run["samples_scored_this_run"] == n_rows and len(run["resume"]["parts_set_aside"]) == 1
    assert _max_delta(_scores(earlier_run), _scores(job / "reference")) == 0.0
    assert main(["verify", str(earlier_run)]) == 0


def test_verify_names_a_changed_score_file(earlier_run, capsys):
    assert main(["verify", str(earlier_run)]) == 0
    _flip_bit_in_a_value(earlier_run / "scores.parquet")
    assert main(["verify", str(earlier_run)]) == 1
    assert "scores.parquet: checksum" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- finding 5: one run at a time


def _slow_run(job: Path, out: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.score_slowly", str(delay), "--", "score", "--config", str(job / "score.yaml"),
         "--set", f"output.dir={out}", "--set", "output.part_rows=1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(job, tmp_path, capsys):
    out = tmp_path / "run"
    first = _slow_run(job, out, delay=0.5)
    try:
        _wait_for(lambda: len(list((out / "parts").glob("part-*.parquet"))) >= 1)
        assert _score(job, out) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in err
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over_and_its_parts_kept(job, tmp_path, caplog):
    out = tmp_path / "run"
    first = _slow_run(job, out, delay=0.5)
    _wait_for(lambda: len(list((out / "parts").glob("part-*.parquet"))) >= 3)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    kept = sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("part-*.parquet"))
    with caplog.at_level(logging.INFO, logger="sqsd_ray"):
        assert _score(job, out) == 0
    assert f"its holder, pid {first.pid} on host {socket.gethostname()}" in caplog.text and "is gone" in caplog.text
    run = json.loads((out / "run.json").read_text())
    assert run["resume"]["kept"] == kept >= 3 and run["samples_scored_this_run"] == N - kept
    assert _max_delta(_scores(out), _scores(job / "reference")) <= 1e-6


def test_a_lock_held_from_another_host_needs_break_lock(job, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    holder = {"pid": 4242, "pid_start": "1", "host": "node-7", "started": "2026-12-01T10:00:00", "command": "sqsd-ray score"}
    (tmp_path / ".run.lock").write_text(json.dumps(holder))
    assert _score(job, out) == 2
    err = capsys.readouterr().err
    assert "pid 4242 on host node-7" in err and "--break-lock" in err
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="sqsd_ray"):
        assert main(["score", "--break-lock", "--config", str(job / "score.yaml"), "--set", f"output.dir={out}"]) == 0
    assert "pid 4242 on host node-7" in caplog.text
    assert not (tmp_path / ".run.lock").exists()


# ------------------------------------------------------------------- findings 6 and 7: clear errors, no silent 0


@pytest.mark.parametrize("override, message", [
    ("batching.max_batch_size=0", "batching.max_batch_size must be >= 1"),
    ("batching.max_tokens=0", "batching.max_tokens must be >= 1"),
    ("batching.max_batch_size=-2", "batching.max_batch_size must be >= 1"),
    ("init_states.danger.alpha=.nan", "alpha"),
    ("output.part_rows=0", "output.part_rows must be >= 1"),
])
def test_config_values_out_of_range_fail_before_the_model_loads(job, tmp_path, capsys, monkeypatch, override, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(blocks, "load_model_and_tokenizer", no_model)
    assert _score(job, tmp_path / "run", "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_an_error_naming_it(job, tmp_path, capsys):
    target = tmp_path / "scores"
    target.write_text("not a directory")
    assert _score(job, target) == 2
    assert f"output.dir: {target} is a file" in capsys.readouterr().err
    assert target.read_text() == "not a directory"


def test_an_empty_corpus_is_an_error_naming_the_file(job, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _score(job, tmp_path / "run", "--set", f"data.path={empty}") == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "gave no samples" in err
    assert not (tmp_path / "run").exists()
