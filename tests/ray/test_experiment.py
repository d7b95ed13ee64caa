"""The experiment DAG on CPU with a tiny model: score -> partition S1…S5 -> fine-tune every band -> evaluate ->
report, for two arms (SQSD and its w/o-norm ablation), asserting the report's contents."""

from __future__ import annotations

import pandas as pd
import pytest

from sqsd_ray.config import load_config
from sqsd_ray.experiments.effectiveness import ExperimentConfig, band_table, run_experiment
from tests.conftest import save_random_directions

pytestmark = [pytest.mark.slow]


def test_effectiveness_dag_writes_table_1(tmp_path, shared_data):
    directions = save_random_directions(tmp_path, "tiny-llama")
    overrides = [
        "score.model.name_or_path=tiny-llama", f"score.data.path={shared_data / 'benign' / 'alpaca_1904.json'}",
        "score.data.limit=30", "score.data.max_length=512",
        f"score.directions.danger={directions['danger']}", f"score.directions.safety={directions['safety']}",
        f"score.output.dir={tmp_path / 'scores'}", "score.ray.enabled=false", "score.fidelity.enabled=false",
        "partition.subset_size=3", "finetune.model.name_or_path=tiny-llama", "finetune.data.max_length=512",
        "finetune.train.lr=1e-3", "finetune.train.batch_size=3", "finetune.train.max_steps=2",
        "finetune.train.checkpoint_every=0", "finetune.scaling.use_ray=false",
        f"evaluation.benchmarks=[{{benchmark: catqa, path: {shared_data / 'eval' / 'catqa_english.json'}, limit: 4, "
        "max_new_tokens: 6}]",
        "evaluation.workers.use_ray=false",
        "arms=[{name: SQSD, column: sqsd}, {name: w/o norm, column: sqsd_raw}, "
        "{name: safety only, column: neg_safety_proj}]",
        f"output_dir={tmp_path / 'exp'}",
    ]
    cfg = load_config(ExperimentConfig, None, overrides)
    out = run_experiment(cfg)
    table = pd.read_csv(out / "table.csv")
    assert list(table["arm"]) == ["SQSD", "w/o norm", "safety only"]
    assert list(table.columns) == ["arm", "S1", "S2", "S3", "S4", "S5", "delta", "mono"]
    assert ((table[["S1", "S5"]] >= 0) & (table[["S1", "S5"]] <= 100)).all().all()
    for _, row in table.iterrows():
        assert row["delta"] == pytest.approx(row["S1"] - row["S5"])
        values = [row[f"S{i}"] for i in range(1, 6)]
        assert row["mono"] == ("✓" if all(b <= a for a, b in zip(values, values[1:])) else "✗")
    report = (out / "report.md").read_text()
    assert "Table 1" in report and "| SQSD |" in report and "Before fine-tuning" in report
    assert (out / "bands.png").stat().st_size > 0
    responses = pd.read_parquet(out / "evaluation" / "responses.parquet")
    assert len(responses) == (1 + 3 * 5) * 4  # θ0 and 15 fine-tunes, 4 prompts each
    s1 = pd.read_csv(out / "SQSD" / "partition" / "partition.csv")
    assert s1[s1["band"] == "S1"]["score"].min() >= s1[s1["band"] == "S2"]["score"].max()
    # re-running finds every fine-tune finished and only re-evaluates
    again = run_experiment(cfg)
    assert pd.read_csv(again / "table.csv").equals(table)


def test_band_table_mono_and_delta():
    from sqsd_ray.experiments.effectiveness import Arm

    cfg = ExperimentConfig(arms=[Arm(name="a"), Arm(name="b")])
    metrics = pd.DataFrame(
        [{"state": f"a/S{i}", "benchmark": "catqa", "keyword_asr": v} for i, v in enumerate([50, 40, 40, 30, 10], 1)]
        + [{"state": f"b/S{i}", "benchmark": "catqa", "keyword_asr": v} for i, v in enumerate([20, 30, 10, 10, 0], 1)]
        + [{"state": "base", "benchmark": "catqa", "keyword_asr": 5.0}])
    table = band_table(cfg, metrics)
    assert list(table["mono"]) == ["✓", "✗"] and list(table["delta"]) == [40, 20]
    assert table.attrs["base"] == 5.0
    partial = band_table(cfg, metrics[metrics["state"] != "b/S3"])
    assert list(partial["mono"]) == ["✓", "n/a"]  # a missing band leaves Mono undecided


@pytest.mark.ray
def test_band_fine_tunes_run_side_by_side_on_ray_train(tmp_path, shared_data, local_ray):
    directions = save_random_directions(tmp_path, "tiny-llama")
    scores_cfg = [
        "score.model.name_or_path=tiny-llama", f"score.data.path={shared_data / 'benign' / 'alpaca_1904.json'}",
        "score.data.limit=8", "score.data.max_length=512",
        f"score.directions.danger={directions['danger']}", f"score.directions.safety={directions['safety']}",
        f"score.output.dir={tmp_path / 'scores'}", "score.ray.enabled=false", "score.fidelity.enabled=false"]
    cfg = load_config(ExperimentConfig, None, [
        *scores_cfg, "partition.n_bands=2", "partition.subset_size=3", "finetune.model.name_or_path=tiny-llama",
        "finetune.data.max_length=512", "finetune.train.batch_size=3", "finetune.train.max_steps=2",
        "finetune.train.checkpoint_every=0", "finetune.scaling.num_workers=1", "finetune.scaling.torch_threads=1",
        "max_concurrent_finetunes=2", "evaluation.include_base=false", "evaluation.workers.use_ray=false",
        f"evaluation.benchmarks=[{{benchmark: catqa, path: {shared_data / 'eval' / 'catqa_english.json'}, limit: 2, "
        "max_new_tokens: 4}]", f"output_dir={tmp_path / 'exp'}"])
    out = run_experiment(cfg)
    table = pd.read_csv(out / "table.csv")
    assert list(table.columns)[:3] == ["arm", "S1", "S2"] and len(table) == 1
    spans = {}
    for band in ("S1", "S2"):  # each band trained by Ray Train, its checkpoint reported into its run directory
        run = out / "SQSD" / band
        state = run / "train" / "step-000002" / "trainer_state.json"
        assert state.is_file()
        spans[band] = ((run / "train_config.yaml").stat().st_mtime, state.stat().st_mtime)
    # side by side: each run started before the other one finished
    assert spans["S1"][0] < spans["S2"][1] and spans["S2"][0] < spans["S1"][1]
