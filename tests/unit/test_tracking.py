"""Experiment tracking: the config's errors, a missing back-end, a tiny fine-tune and a scoring run read back with
TensorBoard's event reader and ``mlflow.search_runs``, and tracking kept out of the run identities."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import yaml

from sqsd_ray.config import ConfigError, from_dict, load_config
from sqsd_ray.tracking import (
    INSTALL_HINT,
    Tracker,
    TrackingConfig,
    TrackingUnavailable,
    child_tracking,
    open_tracker,
    resolve,
    tracking_run,
)
from sqsd_ray.training.config import TrainJobConfig, training_identity
from sqsd_ray.training.loop import run_training
from tests.conftest import REPO_ROOT, tiny_score_config

FLOAT32_RTOL = 1e-6  # TensorBoard stores scalars as float32

PAIRS = [(f"Question {i}: what is {i} plus {i}?", f"The answer is {2 * i}, since {i} and {i} make {2 * i}.")
         for i in range(8)]


def _scalars(logdir) -> dict[str, dict[int, float]]:
    """Every scalar in a TensorBoard log directory: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _train_job(tmp_path, tracking: dict, name: str = "run") -> TrainJobConfig:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return from_dict(TrainJobConfig, {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(data), "max_length": 128},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 4, "checkpoint_every": 0, "log_every": 1},
        "scaling": {"use_ray": False},
        "output": {"dir": str(tmp_path / name)},
        "tracking": tracking,
    })


def _history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ config


def test_an_unknown_backend_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"tracking\.backend: expected one of 'none' \| 'tensorboard' \| 'mlflow', "
                                          r"got 'wandb'"):
        from_dict(TrainJobConfig, {"tracking": {"backend": "wandb"}})
    with pytest.raises(ConfigError, match=r"tracking\.backend must be one of none, tensorboard, mlflow; got 'neptune'"):
        TrackingConfig(backend="neptune")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown config key tracking.dir"):
        from_dict(TrainJobConfig, {"tracking": {"backend": "tensorboard", "dir": "x"}})
    with pytest.raises(ConfigError, match="tracking.experiment must not be empty"):
        TrackingConfig(backend="mlflow", experiment=" ")
    with pytest.raises(ConfigError, match="tracking.uri must not be empty"):
        TrackingConfig(backend="mlflow", uri="")


@pytest.mark.parametrize("cls, job", [
    ("sqsd_ray.training.config:TrainJobConfig", None),
    ("sqsd_ray.dynamics.jobs:DirectionsBuildConfig", "directions_tiny_danger.yaml"),
    ("sqsd_ray.dynamics.jobs:TrajectoryConfig", "trajectory_tiny.yaml"),
    ("sqsd_ray.scoring.job_config:ScoreJobConfig", "score_tiny.yaml"),
])
def test_one_tracking_key_reaches_every_verb_that_trains_or_scores(cls, job):
    import importlib

    module, name = cls.split(":")
    config_cls = getattr(importlib.import_module(module), name)
    path = [REPO_ROOT / "jobs" / job] if job else []
    cfg = load_config(config_cls, path, ["tracking.backend=tensorboard", "tracking.run_name=smoke"])
    assert cfg.tracking == TrackingConfig(backend="tensorboard", run_name="smoke")


@pytest.mark.parametrize("backend, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_backend_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, backend, package):
    monkeypatch.setitem(sys.modules, package, None)  # import of it raises ImportError
    with pytest.raises(TrackingUnavailable) as err, tracking_run(TrackingConfig(backend=backend), tmp_path):
        pass
    assert str(err.value) == (f"tracking.backend={backend} needs the {package} package, which is not installed: "
                              f"{INSTALL_HINT}")
    assert "pip install sqsd-ray[tracking]" in str(err.value) and "\n" not in str(err.value)


def test_defaults_land_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve(TrackingConfig(), tmp_path) is None
    board = resolve(TrackingConfig(backend="tensorboard"), tmp_path / "run")
    assert board.uri == str((tmp_path / "run" / "tensorboard").resolve()) and board.run_name == "run"
    flow = resolve(TrackingConfig(backend="mlflow", uri=str(tmp_path / "store")), tmp_path / "run")
    assert flow.uri == (tmp_path / "store").resolve().as_uri() and flow.experiment == "sqsd-ray"
    assert resolve(TrackingConfig(backend="mlflow"), tmp_path / "run").uri == (tmp_path / "run" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve(TrackingConfig(backend="mlflow"), tmp_path / "run").uri == "http://mlflow.internal:5000"
    # a sub-run (an experiment's band fine-tune) goes under its parent unless it names its own back-end
    child = child_tracking(TrackingConfig(), board, "SQSD/S1")
    assert resolve(child, tmp_path / "band").uri == str(tmp_path.resolve() / "run" / "tensorboard" / "SQSD" / "S1")
    own = TrackingConfig(backend="mlflow")
    assert child_tracking(own, board, "SQSD/S1") is own


def test_tracking_is_not_part_of_the_training_identity(tmp_path):
    plain = _train_job(tmp_path, {})
    tracked = _train_job(tmp_path, {"backend": "mlflow", "uri": "http://x:5000", "run_name": "r"})
    assert training_identity(plain) == training_identity(tracked)


# ------------------------------------------------------------------------------------------ training


def test_a_tiny_fine_tune_writes_its_losses_to_tensorboard(tmp_path):
    cfg = _train_job(tmp_path, {"backend": "tensorboard"})
    run = run_training(cfg)
    history = _history(run.dir)
    scalars = _scalars(run.dir / "tensorboard")
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    for row in history:
        step = row["step"]
        assert scalars["train/loss"][step] == pytest.approx(row["loss"], rel=FLOAT32_RTOL)
        assert scalars["train/lr"][step] == pytest.approx(row["lr"], rel=FLOAT32_RTOL)
        assert scalars["train/grad_norm"][step] == pytest.approx(row["grad_norm"], rel=FLOAT32_RTOL)
        assert scalars["train/tokens_per_s"][step] > 0
    assert "train/step" not in scalars  # the step is the x axis, not a curve


def test_tokens_per_s_averages_the_steps_since_the_last_logged_one(tmp_path, monkeypatch):
    """log_every 2 with a clock on which every train step takes 0.5 s: each logged rate is the tokens of its two
    steps over 1 s. With 8 samples and batches of 4, those two steps are one epoch: every sample once."""
    from sqsd_ray.models.loading import load_tokenizer
    from sqsd_ray.training import loop
    from sqsd_ray.training.examples import load_training_examples

    ticks = iter(range(10_000))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    cfg = _train_job(tmp_path, {"backend": "tensorboard"})
    cfg.train.log_every = 2
    run_training(cfg)
    examples, _ = load_training_examples(cfg.data, load_tokenizer(cfg.model), "sft")
    epoch_tokens = sum(len(e.chosen.input_ids) for e in examples)
    rates = _scalars(tmp_path / "run" / "tensorboard")["train/tokens_per_s"]
    assert rates == {2: pytest.approx(epoch_tokens / 1.0, rel=FLOAT32_RTOL),
                     4: pytest.approx(epoch_tokens / 1.0, rel=FLOAT32_RTOL)}


def test_a_tiny_fine_tune_is_an_mlflow_run_with_its_metrics_and_params(tmp_path):
    import mlflow

    store = (tmp_path / "mlruns").as_uri()
    cfg = _train_job(tmp_path, {"backend": "mlflow", "uri": store, "experiment": "tracking-test",
                                "run_name": "tiny-lora"})
    run = run_training(cfg)
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["tracking-test"], output_format="list")
    assert len(runs) == 1
    found = runs[0]
    assert found.info.run_name == "tiny-lora" and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.001" and found.data.params["model.name_or_path"] == "tiny-llama"
    assert found.data.params["identity"] == training_identity(cfg)
    losses = {m.step: m.value for m in mlflow.MlflowClient(store).get_metric_history(found.info.run_id, "train/loss")}
    assert losses == {row["step"]: pytest.approx(row["loss"], rel=1e-12) for row in _history(run.dir)}
    recorded = json.loads((run.dir / "tracking.json").read_text())
    assert recorded["run_id"] == found.info.run_id and recorded["uri"] == store


def test_a_resumed_run_reopens_its_mlflow_run(tmp_path):
    import mlflow

    store = (tmp_path / "mlruns").as_uri()
    cfg = TrackingConfig(backend="mlflow", uri=store)
    record = tmp_path / "run" / "tracking.json"
    record.parent.mkdir()
    with tracking_run(cfg, tmp_path / "run", {"a": 1}, reopen_from=record) as first:
        open_tracker(first).log_metrics({"loss": 2.0}, step=1)
    with pytest.raises(RuntimeError), tracking_run(cfg, tmp_path / "run", {"a": 2}, reopen_from=record) as second:
        open_tracker(second).log_metrics({"loss": 1.0}, step=2)
        raise RuntimeError("worker lost")
    assert second.run_id == first.run_id
    client = mlflow.MlflowClient(store)
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.params == {"a": "1"}  # params of the first start kept
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    with pytest.raises(KeyboardInterrupt), tracking_run(cfg, tmp_path / "run", reopen_from=record):
        raise KeyboardInterrupt  # Ctrl-C: the run was stopped, not failed
    assert client.get_run(first.run_id).info.status == "KILLED"


# ------------------------------------------------------------------------------------------ scoring


def test_a_scoring_run_writes_its_throughput_to_tensorboard_and_run_json(tmp_path):
    from sqsd_ray.cli import main

    records = [{"prompt": p, "response": r} for p, r in PAIRS[:5]]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_score_config(tmp_path, tmp_path / "corpus.jsonl", max_length=128,
                               batching={"layout": "fixed"}, output={"dir": str(tmp_path / "run"), "part_rows": 2},
                               tracking={"backend": "tensorboard"})
    (tmp_path / "score.yaml").write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(tmp_path / "score.yaml")]) == 0
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    logdir = tmp_path / "run" / "tensorboard"
    assert run_info["tracking"] == {"backend": "tensorboard", "uri": str(logdir.resolve()), "run_name": "run"}
    scalars = _scalars(logdir)
    assert scalars["score/samples_scored"] == {2: 2, 4: 4, 5: 5}  # one point per part of 2 rows
    assert all(v > 0 for v in scalars["score/tokens_per_s"].values())
    assert scalars["score/rows"] == {5: 5} and scalars["score/status/ok"] == {5: 5}
    assert scalars["score/samples_per_s"][5] == pytest.approx(run_info["samples_per_s"], rel=1e-3)
    assert scalars["score/tokens_per_s"][5] == pytest.approx(run_info["tokens_per_s"], rel=1e-3)
    import pandas as pd

    tokens = int(pd.read_parquet(tmp_path / "run" / "scores.parquet")["n_tokens"].sum())
    assert run_info["tokens_scored_this_run"] == tokens


def test_tracking_is_not_part_of_the_scoring_identity(tmp_path):
    from sqsd_ray.scoring.blocks import scoring_identity
    from sqsd_ray.scoring.job_config import ScoreJobConfig

    base = {"model": {"name_or_path": "tiny-llama"}, "method": "self_inf_n", "data": {"path": "x.jsonl"}}
    plain = from_dict(ScoreJobConfig, base)
    tracked = from_dict(ScoreJobConfig, {**base, "tracking": {"backend": "tensorboard", "uri": "/tmp/tb"}})
    assert scoring_identity(plain, {}) == scoring_identity(tracked, {})


def test_worker_ranks_other_than_zero_write_nothing(tmp_path):
    target = resolve(TrackingConfig(backend="tensorboard"), tmp_path)
    with open_tracker(target, rank=1) as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------------------------------ experiments


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, int], float] = {}

    def log_metrics(self, metrics, step):
        self.metrics.update({(key, step): value for key, value in metrics.items()})


def _scored_corpus(tmp_path, n: int = 8):
    import numpy as np
    import pandas as pd

    from sqsd_ray.data.records import DataConfig, load_samples

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                              for i in range(n)))
    samples = load_samples(DataConfig(path=str(corpus)))[0]
    pd.DataFrame({"sample_id": [s.sample_id for s in samples], "sqsd": np.arange(float(len(samples))),
                  "status": "ok"}).to_parquet(tmp_path / "scores.parquet", index=False)
    return corpus, tmp_path / "scores.parquet"


def test_an_experiment_sends_every_band_fine_tune_under_its_own_tracking(tmp_path):
    from sqsd_ray.experiments.effectiveness import ExperimentConfig, _finetune_jobs

    corpus, scores = _scored_corpus(tmp_path)
    out = tmp_path / "exp"
    overrides = [f"scores={scores}", f"data.path={corpus}", "partition.n_bands=2", "partition.subset_size=null",
                 "arms=[{name: SQSD (Beaver)}, {name: lr 1e-5, train_overrides: ['train.lr=1e-5']}]"]
    cfg = load_config(ExperimentConfig, None, overrides)
    parent = resolve(TrackingConfig(backend="tensorboard"), out)
    jobs = _finetune_jobs(cfg, out, parent)
    assert sorted(jobs) == [("SQSD (Beaver)", "S1"), ("SQSD (Beaver)", "S2"), ("lr 1e-5", "S1"), ("lr 1e-5", "S2")]
    logdirs = {key: resolve(job.tracking, job.output.dir).uri for key, job in jobs.items()}
    board = out.resolve() / "tensorboard"
    assert logdirs[("SQSD (Beaver)", "S2")] == str(board / "SQSD__Beaver" / "S2")
    assert logdirs[("lr 1e-5", "S1")] == str(board / "lr_1e-5" / "S1")
    # a fine-tune section naming its own back-end keeps it; without a parent nothing is tracked
    own = load_config(ExperimentConfig, None, [*overrides, "finetune.tracking.backend=mlflow"])
    assert {job.tracking.backend for job in _finetune_jobs(own, out, parent).values()} == {"mlflow"}
    assert {job.tracking.backend for job in _finetune_jobs(cfg, out, None).values()} == {"none"}


def test_each_bands_safety_metrics_are_one_curve_per_arm():
    import pandas as pd

    from sqsd_ray.experiments.effectiveness import ExperimentConfig, log_band_metrics

    cfg = load_config(ExperimentConfig, None, ["partition.n_bands=2", "arms=[{name: SQSD}, {name: Random (chance)}]"])
    metrics = pd.DataFrame({
        "state": ["base", "SQSD/S1", "SQSD/S2", "Random (chance)/S1", "Random (chance)/S2"],
        "benchmark": "catqa", "n": 10, "keyword_asr": [5.0, 40.0, 10.0, 20.0, float("nan")]})
    tracker = RecordingTracker()
    log_band_metrics(tracker, cfg, metrics)
    assert tracker.metrics == {
        ("catqa/keyword_asr/SQSD", 0): 5.0, ("catqa/keyword_asr/SQSD", 1): 40.0, ("catqa/keyword_asr/SQSD", 2): 10.0,
        ("catqa/keyword_asr/Random__chance", 0): 5.0, ("catqa/keyword_asr/Random__chance", 1): 20.0}


def test_mitigate_sends_its_fine_tunes_under_its_own_tracking(tmp_path, monkeypatch):
    from sqsd_ray.data.records import DataConfig
    from sqsd_ray.experiments import mitigate

    corpus, scores = _scored_corpus(tmp_path)
    cfg = load_config(mitigate.MitigateConfig, None, [f"scores={scores}", f"data.path={corpus}",
                                                      f"output_dir={tmp_path / 'mit'}"])
    seen = []

    def capture(job):
        seen.append(job)
        raise StopIteration  # the job as it would have trained is all this test needs

    monkeypatch.setattr(mitigate, "run_training", capture)
    parent = resolve(TrackingConfig(backend="mlflow", uri=str(tmp_path / "store"), run_name="mit"), tmp_path / "mit")
    with pytest.raises(StopIteration):
        mitigate._finetune(cfg, "S1", DataConfig(path=str(corpus)), False, tmp_path / "mit" / "S1" / "curated.run1",
                           1, parent)
    assert seen[0].tracking == TrackingConfig(backend="mlflow", uri=(tmp_path / "store").resolve().as_uri(),
                                              run_name="mit/S1/curated.run1")


# ------------------------------------------------------------------------------------------ worker logs


def test_the_worker_log_hook_prints_sqsd_ray_lines_once(monkeypatch, capsys):
    """What ``setup_worker_logging`` does in a Ray worker, here in this process: INFO lines of ``sqsd_ray`` to stderr
    in the CLI's format; quiet where a console handler of the root logger prints them (Ray Train's workers)."""
    import logging

    from sqsd_ray.runtime import setup_worker_logging

    package, root = logging.getLogger("sqsd_ray"), logging.getLogger()
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    monkeypatch.setattr(root, "handlers", [])  # a fresh Ray worker's (pytest's own capture handlers set aside)
    setup_worker_logging()
    setup_worker_logging()  # a reused worker process: still one handler
    assert len(package.handlers) == 1
    logging.getLogger("sqsd_ray.training.loop").info("resumed at step %d", 7)
    logging.getLogger("sqsd_ray.training.loop").debug("not at INFO")
    assert capsys.readouterr().err == "INFO sqsd_ray.training.loop: resumed at step 7\n"
    console = logging.StreamHandler(sys.stdout)  # as Ray Train's root console handler
    monkeypatch.setattr(root, "handlers", [console])
    logging.getLogger("sqsd_ray.training.loop").info("resumed at step %d", 8)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "resumed at step 8\n"


def test_an_experiments_band_fine_tunes_keep_ray_train_files_below_its_storage_path(tmp_path):
    from sqsd_ray.experiments.effectiveness import ExperimentConfig, _finetune_jobs

    corpus, scores = _scored_corpus(tmp_path)
    base = [f"scores={scores}", f"data.path={corpus}", "partition.n_bands=2", "partition.subset_size=null",
            "arms=[{name: SQSD (Beaver)}]"]
    cfg = load_config(ExperimentConfig, None, [*base, "finetune.output.storage_path=s3://bucket/exp/"])
    jobs = _finetune_jobs(cfg, tmp_path / "exp", None)
    assert {key: job.output.storage_path for key, job in jobs.items()} == {
        ("SQSD (Beaver)", "S1"): "s3://bucket/exp/SQSD__Beaver/S1",
        ("SQSD (Beaver)", "S2"): "s3://bucket/exp/SQSD__Beaver/S2"}
    unset = _finetune_jobs(load_config(ExperimentConfig, None, base), tmp_path / "exp", None)
    assert {job.output.storage_path for job in unset.values()} == {None}
