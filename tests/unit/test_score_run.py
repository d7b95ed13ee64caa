"""`sqsd-ray score` end to end on a tiny model: files on disk, schema, hashes, errors, fidelity check."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sqsd_ray.cli import main
from sqsd_ray.config import ConfigError, load_config
from sqsd_ray.models.directions import random_direction
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, lora_module_shapes
from sqsd_ray.scoring.job_config import ScoreJobConfig
from tests.conftest import REPO_ROOT, save_random_directions

RECORDS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Summarise the text.", "input": "The cat sat on the mat all day long.", "output": "A cat sat all day."},
    {"instruction": "Give me a number between one and ten.", "input": "", "output": "Seven."},
    {"instruction": "Translate to French: good morning", "input": "", "output": "Bonjour."},
    {"instruction": "List two fruits.", "input": "", "output": "Apples and pears are two common fruits people enjoy."},
]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A corpus file, two random directions for tiny-llama, and a config file."""
    root = tmp_path_factory.mktemp("job")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    save_random_directions(root, "tiny-llama")
    config = {
        "model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
        "data": {"path": str(corpus), "max_length": 256},
        "directions": {"danger": str(root / "danger.safetensors"), "safety": str(root / "safety.safetensors")},
        "output": {"dir": str(root / "run"), "per_module": True},
        "fidelity": {"enabled": True, "n_samples": 5, "eps": [1e-3, 1e-2, 1.0]},
        "ray": {"enabled": False},  # the unit tier stays Ray-free; tests/ray covers the distributed path
    }
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    return root


def test_score_writes_parquet_summary_and_hashes(job):
    assert main(["score", "--config", str(job / "score.yaml")]) == 0
    run = job / "run"
    table = pq.read_table(run / "scores.parquet")
    df = table.to_pandas()
    assert len(df) == len(RECORDS) and df["sample_id"].is_unique
    for col in ("sqsd", "danger_proj", "safety_proj", "sqsd_raw", "danger_proj_raw", "safety_proj_raw",
                "update_norm_danger_state", "update_norm_safety_state", "loss_danger_state", "loss_safety_state",
                "n_response_tokens", "status", "danger_proj_by_module"):
        assert col in df, col
    assert (df["status"] == "ok").all()
    np.testing.assert_allclose(df["sqsd"], df["danger_proj"] - df["safety_proj"], atol=1e-12)
    assert len(df["danger_proj_by_module"][0]) == 14  # 2 layers × 7 modules
    np.testing.assert_allclose([sum(v) for v in df["danger_proj_by_module"]], df["danger_proj"], atol=1e-5)
    meta = json.loads(table.schema.metadata[b"sqsd_ray"])
    assert set(meta["fingerprints"]) >= {"config", "model", "direction_danger", "direction_safety"}
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["fingerprints"] == meta["fingerprints"]
    assert (run / "histogram.png").stat().st_size > 1000
    summary = (run / "summary.md").read_text()
    assert "Top" in summary and "Spearman" in summary and df.loc[df["sqsd"].idxmax(), "sample_id"] in summary
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["max_length"] == 256


def test_fidelity_check_is_first_order_accurate(job):
    fid = json.loads((job / "run" / "fidelity.json").read_text())
    by_eps = {s["eps"]: s for s in fid["summary"]}
    assert fid["displacement"].startswith("further along V")  # default states lie on θ0 + α·V
    # fp32 losses: at ε = 1e-3 the relative error is ~0.4 %; at 1e-2 the second-order term shows (~3 %)
    assert by_eps[1e-3]["pearson_r"] > 0.9995 and by_eps[1e-3]["median_rel_error"] < 2e-2
    assert by_eps[1e-2]["pearson_r"] > 0.99 and by_eps[1e-2]["median_rel_error"] < 1e-1
    # a whole step along V is no longer first order: the check can tell
    assert by_eps[1.0]["median_rel_error"] > 0.5 and by_eps[1.0]["pearson_r"] < 0.9


def test_rerun_resumes_and_refuses_without_resume(job, capsys):
    before = pd.read_parquet(job / "run" / "scores.parquet")
    assert main(["score", "--config", str(job / "score.yaml"), "--set", "fidelity.enabled=false"]) == 0
    run_info = json.loads((job / "run" / "run.json").read_text())
    assert run_info["samples_scored_this_run"] == 0  # everything was already there
    pd.testing.assert_frame_equal(pd.read_parquet(job / "run" / "scores.parquet"), before)
    assert main(["score", "--config", str(job / "score.yaml"), "--set", "output.resume=false"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_resume_refuses_a_different_job_naming_the_difference(job, capsys):
    code = main(["score", "--config", str(job / "score.yaml"), "--set", "init_states.safety.alpha=2.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "init_states.safety.alpha: 1.0 -> 2.0" in err


def test_interrupted_run_resumes_without_loss_or_duplicates(job, tmp_path):
    """Delete one part (as if the job died before writing it): the rerun scores exactly the missing rows."""
    args = ["score", "--config", str(job / "score.yaml"), "--set", f"output.dir={tmp_path}",
            "--set", "output.part_rows=2", "--set", "fidelity.enabled=false"]
    assert main(args) == 0
    full = pd.read_parquet(tmp_path / "scores.parquet")
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    assert len(parts) == 3
    lost = set(pd.read_parquet(parts[0])["sample_id"])
    parts[0].unlink()
    (tmp_path / "parts" / "part-truncated.parquet").write_bytes(b"PAR1 cut short")  # a crash mid-write
    assert main(args) == 0
    assert json.loads((tmp_path / "run.json").read_text())["samples_scored_this_run"] == len(lost)
    again = pd.read_parquet(tmp_path / "scores.parquet")
    assert again["sample_id"].is_unique and set(again["sample_id"]) == set(full["sample_id"])
    pd.testing.assert_frame_equal(again[["sample_id", "sqsd"]], full[["sample_id", "sqsd"]], atol=1e-6)


def test_overrides_and_same_scores_from_a_second_run(job):
    first = pd.read_parquet(job / "run" / "scores.parquet")
    assert main(["score", "--config", str(job / "score.yaml"), "--set", f"output.dir={job / 'run2'}",
                 "--set", "fidelity.enabled=false", "--set", "batching.max_batch_size=3"]) == 0
    second = pd.read_parquet(job / "run2" / "scores.parquet")
    np.testing.assert_allclose(second["sqsd"], first["sqsd"], atol=1e-5)
    assert not (job / "run2" / "fidelity.json").exists()
    meta1 = json.loads((job / "run" / "run.json").read_text())["fingerprints"]
    meta2 = json.loads((job / "run2" / "run.json").read_text())["fingerprints"]
    assert meta1["config"] != meta2["config"] and meta1["model"] == meta2["model"]


def test_direction_for_another_model_is_refused_naming_the_module(job, tmp_path, capsys):
    shapes = lora_module_shapes(load_model(ModelConfig(name_or_path="tiny-qwen3")), LoraSettings())
    shapes = {m: (d_out, d_in + 1) if m.endswith("layers.1.mlp.down_proj") else (d_out, d_in) for m, (d_out, d_in) in shapes.items()}
    random_direction(shapes, rank=8, seed=3).save(tmp_path / "bad.safetensors")
    code = main(["score", "--config", str(job / "score.yaml"), "--set", f"directions.danger={tmp_path / 'bad.safetensors'}",
                 "--set", f"output.dir={tmp_path / 'out'}"])
    assert code == 2
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_lenght=3", "unknown config key data.max_lenght"),
        ("batching.max_batch_size=many", "batching.max_batch_size"),
        ("init_states.danger.kind=checkpoint", "init_states.danger.kind"),
        ("lora.r=two", "lora.r"),
    ],
)
def test_unknown_or_ill_typed_keys_name_the_key(job, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(ScoreJobConfig, job / "score.yaml", [override])


def test_unknown_key_in_yaml_file_names_it(tmp_path):
    (tmp_path / "bad.yaml").write_text("directions: {danger: a, safety: b}\nmodle: {name_or_path: x}\n")
    with pytest.raises(ConfigError, match="unknown config key modle"):
        load_config(ScoreJobConfig, tmp_path / "bad.yaml")


def test_cli_subprocess_exit_codes(job, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "sqsd_ray.cli", "score", "--help-config"], capture_output=True,
                        text=True, cwd=REPO_ROOT)
    assert ok.returncode == 0 and "init_states.safety.alpha" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sqsd_ray.cli", "score", "--config", str(job / "score.yaml"),
                          "--set", "data.path=/nonexistent/corpus.jsonl", "--set", f"output.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "/nonexistent/corpus.jsonl" in bad.stderr


def test_tokenisation_skips_are_counted_and_keep_column_types(job, tmp_path):
    """A prompt longer than max_length is skipped at tokenisation: counted in run.json, absent from the
    scores, and the skipped row must not turn typed columns into Python objects in the parts."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in RECORDS + [{"instruction": "z" * 300, "input": "", "output": "ok"}]))
    assert main(["score", "--config", str(job / "score.yaml"), "--set", f"data.path={corpus}",
                 "--set", f"output.dir={tmp_path / 'out'}", "--set", "fidelity.enabled=false"]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["data_report"]["tokenisation_skipped"] == {"prompt_too_long": 1}
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert table.num_rows == len(RECORDS)
    assert str(table.schema.field("truncated").type) == "bool"
    assert str(table.schema.field("n_tokens").type) == "int32"
    for part in (tmp_path / "out" / "parts").glob("*.parquet"):
        assert str(pq.read_schema(part).field("truncated").type) == "bool"
