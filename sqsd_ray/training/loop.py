"""Fine-tuning (SFT or DPO; LoRA or every weight) as one train loop, in this process or on Ray Train workers.

Directions (Eq. 3–4), pilot/benign trajectories (§3.2) and the S1–S5 fine-tunes all train through here::

    run_training(cfg)                    driver: output dir, resume point, Ray Train ``TorchTrainer`` (or none)
      └─ train_worker(config)            per worker: model + LoRA, data shard, ``Trainer``, checkpoints
           └─ Trainer.train_step()       one global batch: micro-batches, loss (``objectives``), AdamW step

Batching is deterministic and independent of the worker count: epoch ``e`` visits the samples in a seeded
permutation, a step takes the next ``batch_size`` of them (the epoch's last batch is filled up from the
epoch's start, so every step has a full batch), and worker ``k`` of ``W`` takes every W-th sample of it.
Since the SFT token count of the global batch is known to every worker, each micro-batch contributes
``Σ token NLL / global tokens`` and the summed gradient equals one big batch's, for any W and micro-batch size.

A checkpoint is a directory ``step-000150/`` with ``adapter/`` (peft, safetensors) or ``model/`` (full
fine-tuning), ``optimizer.safetensors`` (AdamW's step and moments per trainable tensor, whole even under ZeRO; no
pickle) and ``trainer_state.json`` (step, epoch, the metric history so far), written and restored by ``checkpoint`` (ZeRO's part: ``zero``).
Every ``checkpoint_every`` steps and at the end; a rerun of the same job resumes from the newest one, and a
Ray Train worker restarted after a failure resumes from the last one reported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, from_dict, to_dict
from ..models.loading import base_model_reference, load_model_and_tokenizer, with_absolute_paths
from ..models.lora import apply_lora
from ..tracking import RUN_RECORD, Tracker, open_tracker, tracking_run
from .checkpoint import CHECKPOINT_DIR, STATE_FILE, checkpoint_name, list_checkpoints, load_weights
from .config import TrainJobConfig, training_identity
from .examples import load_refusal_examples, load_training_examples
from .trainer import Trainer

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- worker


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _LocalSession:
    """Rank 0 of 1 in this process: checkpoints are moved into the run directory as they are saved."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, resume_from: str | None) -> None:
        self.run_dir, self.resume_from = run_dir, resume_from
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def init_deepspeed(self) -> None:
        """DeepSpeed needs a process group even for one process."""
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            self._saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                                                               "WORLD_SIZE")}
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Undo init_deepspeed: the process group and the environment (runs in this process come and go)."""
        saved = getattr(self, "_saved_env", None)
        if saved is None:
            return
        import deepspeed.comm
        import torch.distributed as dist

        if dist.is_initialized():  # through DeepSpeed, which also drops the groups it cached (a later run's
            deepspeed.comm.destroy_process_group()  # engine would otherwise reach for the destroyed ones)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = None

    def restore_point(self) -> Path | None:
        return Path(self.resume_from) if self.resume_from else None

    def release_restore(self) -> None:
        pass

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, name: str | None) -> None:
        if checkpoint_dir is not None:
            target = self.run_dir / CHECKPOINT_DIR / str(name)
            partial = target.with_name(target.name + ".partial")  # a crash mid-copy leaves no half checkpoint
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)


class _RaySession:
    """A Ray Train worker: DDP wrapping, the restored checkpoint, ``ray.train.report``."""

    def __init__(self, resume_from: str | None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume_from = resume_from

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def init_deepspeed(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")  # Ray's group

    def restore_point(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # set after a worker-group restart (fault tolerance)
        if checkpoint is not None:
            # a local copy of this worker's own, removed once loaded (release_restore): without a path, every worker
            # of a node gets the same temporary directory, and the first to finish loading would delete it under the
            # others
            own = tempfile.mkdtemp(prefix=f"sqsd-restore-rank{self.rank}-")
            self._copy = Path(checkpoint.to_directory(own))
            return self._copy
        return Path(self.resume_from) if self.resume_from else None

    def close(self) -> None:
        pass  # Ray Train owns the process group

    def release_restore(self) -> None:
        copy = getattr(self, "_copy", None)
        if copy is not None and self.resume_from != str(copy):
            shutil.rmtree(copy, ignore_errors=True)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train's ``train_loop_per_worker``; also called directly without Ray)."""
    cfg = from_dict(TrainJobConfig, config["job"])
    session = _RaySession(config.get("resume_from")) if config.get("ray", False) else _LocalSession(
        Path(cfg.output.dir), config.get("resume_from"))
    previous_threads = torch.get_num_threads()
    if session.device.type == "cpu" and (config.get("ray", False) or cfg.scaling.torch_threads):
        # a Ray worker uses its CPU reservation; a run in this process keeps torch's default unless told
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    tracker = open_tracker(config.get("tracking"), session.rank)  # rank 0 only
    try:
        _train(cfg, config["identity"], session, tracker)
    finally:
        tracker.close()
        session.close()
        torch.set_num_threads(previous_threads)  # in-process runs leave the caller's setting as it was


def _train(cfg: TrainJobConfig, identity: str, session: _LocalSession | _RaySession, tracker: Tracker) -> None:
    torch.manual_seed(cfg.train.seed)  # same LoRA A init on every worker
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    lora = cfg.lora if cfg.train.method == "lora" else None
    if lora is not None:
        model = apply_lora(model, lora)
    model.to(session.device)
    model.train()
    examples, report = load_training_examples(cfg.data, tokenizer, cfg.train.objective)
    if not examples:
        raise ValueError(f"no training examples left in {cfg.data.path}:\n{report.summary()}")
    if session.rank == 0:
        log.info("training on %d %s (%d read, %d skipped: %s)", len(examples),
                 "pairs" if cfg.train.objective == "dpo" else "samples", report.records_read, report.n_skipped,
                 report.skipped or "none")
    restore = session.restore_point()
    if restore is not None:  # weights first: ZeRO partitions them when the trainer is built
        load_weights(model, restore, cfg.train.method)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    refusals = load_refusal_examples(cfg.train.spf, cfg.data, tokenizer) if cfg.train.spf.enabled else None
    if cfg.train.zero_stage:
        session.init_deepspeed()
    trainer = Trainer(model, examples, cfg.train, pad, session.rank, session.world_size, session.device, lora,
                      refusals, base_model=base_model_reference(cfg.model), tokenizer=tokenizer)
    if restore is not None:
        trainer.load_state(restore, identity)
        session.release_restore()
        log.info("resumed at step %d from %s", trainer.step, restore)
    forward = trainer.engine or session.prepare(model)
    try:
        _loop(cfg, identity, session, trainer, forward, tracker)
    finally:
        if trainer.engine is not None:
            trainer.engine.destroy()  # ZeRO-3 hooks and buffers hold memory until released


def _loop(cfg: TrainJobConfig, identity: str, session: _LocalSession | _RaySession, trainer: Trainer,
          forward: torch.nn.Module, tracker: Tracker) -> None:
    every = cfg.train.checkpoint_every
    progress = _progress(trainer, session.rank)
    tokens = seconds = 0.0  # since the last logged step: its tokens/s is their ratio
    while trainer.step < trainer.total_steps:
        tokens += _batch_tokens(trainer, trainer.step)
        started = time.perf_counter()
        metrics = trainer.train_step(forward)
        seconds += time.perf_counter() - started
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        step = trainer.step
        _maybe_fail(cfg, session, step)
        checkpoint = (every and step % every == 0) or step == trainer.total_steps
        if checkpoint or step % cfg.train.log_every == 0:
            tracker.log_metrics({**{f"train/{k}": v for k, v in metrics.items() if k != "step"},
                                 "train/tokens_per_s": tokens / max(seconds, 1e-9)}, step)
            tokens = seconds = 0.0
        if checkpoint:
            with tempfile.TemporaryDirectory() as tmp:
                directory = trainer.save(Path(tmp), identity)  # every rank: ZeRO-3 gathers collectively
                session.report(metrics, directory, checkpoint_name(step))
        elif step % cfg.train.log_every == 0:
            session.report(metrics, None, None)
    progress.close()


def _batch_tokens(trainer: Trainer, step: int) -> int:
    """Tokens (prompt and response; chosen and rejected for DPO) of optimizer step ``step``'s global batch."""
    items = [trainer.examples[i] for i in trainer.global_batch(step)]
    return sum(len(e.chosen) + (len(e.rejected) if e.rejected is not None else 0) for e in items)


def _maybe_fail(cfg: TrainJobConfig, session: _LocalSession | _RaySession, step: int) -> None:
    """Fault drill (``scaling.fail_at_step``): rank 0 kills its own process once, at that step."""
    if cfg.scaling.fail_at_step != step or session.rank != 0:
        return
    marker = Path(cfg.output.dir) / ".fault_drill_done"
    if marker.exists():
        return
    marker.write_text(f"killed at step {step}\n")
    log.warning("fault drill: killing training worker rank 0 at step %d", step)
    os.kill(os.getpid(), signal.SIGKILL)


def _progress(trainer: Trainer, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=trainer.total_steps, initial=trainer.step, desc=f"LoRA {trainer.settings.objective}",
                unit="step", disable=rank != 0, mininterval=2.0)


# -------------------------------------------------------------------------------------------- driver


@dataclass
class TrainRun:
    """What a finished training run left in its directory."""

    dir: Path
    checkpoints: list[Path]
    history: list[dict[str, float]]
    seconds: float

    @property
    def final(self) -> Path:
        return self.checkpoints[-1]

    def checkpoint(self, step: int | None) -> Path:
        """The checkpoint of ``step`` (None = the final one); an error listing the steps that exist."""
        if step is None:
            return self.final
        for path in self.checkpoints:
            if int(path.name.split("-")[1]) == step:
                return path
        steps = [int(p.name.split("-")[1]) for p in self.checkpoints]
        raise ValueError(f"{self.dir}: no checkpoint at step {step}; saved steps: {steps}")


def load_run(run_dir: str | Path) -> TrainRun:
    """A finished run's checkpoints and metric history (from the newest checkpoint's trainer state)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no checkpoints under {Path(run_dir) / CHECKPOINT_DIR}")
    state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
    return TrainRun(Path(run_dir), checkpoints, state["history"], 0.0)


def _prepare_output(cfg: TrainJobConfig, identity: str) -> Path | None:
    """Create the run directory; return the checkpoint to resume from, if any."""
    out = Path(cfg.output.dir)
    if out.exists() and cfg.output.overwrite:
        shutil.rmtree(out)
    checkpoints = list_checkpoints(out)
    if checkpoints:
        state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
        if not cfg.output.resume or state["identity"] != identity:
            why = "output.resume is false" if not cfg.output.resume else "they belong to a different job"
            raise FileExistsError(
                f"{out} already holds checkpoints and {why}; set output.overwrite: true or choose another output.dir"
            )
        return checkpoints[-1]
    out.mkdir(parents=True, exist_ok=True)
    return None


def run_training(cfg: TrainJobConfig) -> TrainRun:
    """Train ``cfg`` to completion (resuming if possible) and return the run's checkpoints and history."""
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be a multiple of scaling.num_workers "
                          f"{cfg.scaling.num_workers}")
    identity = training_identity(cfg)
    resume = _prepare_output(cfg, identity)
    out = Path(cfg.output.dir).resolve()
    # only the training job's own keys (cfg may be a subclass, e.g. a direction build), as an absolute path
    # since workers may run in another working directory
    cfg_dict = {f.name: to_dict(getattr(cfg, f.name)) for f in fields(TrainJobConfig)}
    cfg_dict["output"]["dir"] = str(out)
    cfg_dict["model"] = to_dict(with_absolute_paths(cfg.model))
    if cfg.data.format != "hf" and Path(cfg.data.path).exists():
        cfg_dict["data"]["path"] = str(Path(cfg.data.path).resolve())
    if cfg.train.deepspeed_config is not None:  # read (and checked) by training_identity above
        cfg_dict["train"]["deepspeed_config"] = str(Path(cfg.train.deepspeed_config).expanduser().resolve())
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    if resume is not None and (resume / STATE_FILE).is_file():
        done = json.loads((resume / STATE_FILE).read_text())
        log.info("resuming %s from %s (step %d of %d)", out, resume.name, done["step"], done["total_steps"])
        if done["step"] >= done["total_steps"]:
            return load_run(out)
    config = {"job": cfg_dict, "identity": identity, "resume_from": str(resume) if resume else None}
    start = time.perf_counter()
    params = {**{k: v for k, v in cfg_dict.items() if k not in ("output", "tracking")}, "identity": identity}
    # a resumed run goes on in the MLflow run it started (recorded in the run directory)
    with tracking_run(cfg.tracking, out, params, reopen_from=out / RUN_RECORD) as tracking:
        config["tracking"] = tracking.to_dict() if tracking else None
        if cfg.scaling.use_ray:
            _fit_with_ray_train(cfg, config, out)
        else:
            if cfg.output.storage_path is not None:
                log.warning("output.storage_path applies to Ray Train runs (scaling.use_ray); this run writes to %s",
                            out)
            train_worker({**config, "ray": False})
    run = load_run(out)
    run.seconds = time.perf_counter() - start
    _write_run_files(run, cfg)
    return run


def _fit_with_ray_train(cfg: TrainJobConfig, config: dict[str, Any], out: Path) -> None:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..runtime import fit_on_ray_train, init_ray, train_failure_config

    init_ray(cfg.scaling)
    storage = _separate_storage(cfg, out, config["identity"])
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**config, "ray": True},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=CHECKPOINT_DIR,
            storage_path=cfg.output.ray_storage_path(out),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every checkpoint is a trajectory point
            failure_config=train_failure_config(cfg.scaling),
        ),
    )

    def kept() -> str:
        if storage is not None:
            _copy_checkpoints_home(storage, out)
        return _what_was_kept(out)

    result = fit_on_ray_train(trainer, cfg.scaling, kept)
    if storage is not None:
        _copy_checkpoints_home(storage, out)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error


def _separate_storage(cfg: TrainJobConfig, out: Path, identity: str) -> tuple[Any, str] | None:
    """(file system, checkpoint folder) of ``output.storage_path`` when Ray Train writes somewhere other than ``out``;
    makes it ready for this run as ``_prepare_output`` does the run directory."""
    import pyarrow.fs

    filesystem, root = cfg.output.ray_storage(out)
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem) and Path(root).resolve() == out.resolve():
        return None
    storage = (filesystem, f"{root.rstrip('/')}/{CHECKPOINT_DIR}")
    if cfg.output.overwrite:  # Ray Train would otherwise restore the replaced run from its snapshot there
        if filesystem.get_file_info(storage[1]).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(storage[1])
        return storage
    stored = _stored_checkpoints(storage)
    if stored:
        with filesystem.open_input_stream(f"{storage[1]}/{stored[-1]}/{STATE_FILE}") as f:
            theirs = json.loads(f.read())["identity"]
        if not cfg.output.resume or theirs != identity:
            why = "output.resume is false" if not cfg.output.resume else "they belong to a different job"
            raise FileExistsError(f"output.storage_path {cfg.output.storage_path} already holds checkpoints "
                                  f"({CHECKPOINT_DIR}/{stored[-1]}) and {why}; set output.overwrite: true or choose "
                                  "another output.storage_path")
    return storage


def _stored_checkpoints(storage: tuple[Any, str]) -> list[str]:
    """Names of the complete checkpoints (``step-*`` with a trainer state) under Ray Train's storage, oldest first."""
    import pyarrow.fs

    filesystem, folder = storage
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    names = [info.base_name for info in found
             if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("step-")]
    names = [n for n in names if filesystem.get_file_info(f"{folder}/{n}/{STATE_FILE}").type == pyarrow.fs.FileType.File]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def _copy_checkpoints_home(storage: tuple[Any, str], out: Path) -> None:
    """Copy the checkpoints the run directory lacks from Ray Train's storage into ``out/train``, each whole or not
    at all, so everything that reads a run directory works as when Ray Train writes into it."""
    import pyarrow.fs

    filesystem, folder = storage
    here = {p.name for p in list_checkpoints(out)}
    for name in _stored_checkpoints(storage):
        if name in here:
            continue
        target = out / CHECKPOINT_DIR / name
        partial = target.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        pyarrow.fs.copy_files(f"{folder}/{name}", str(partial), source_filesystem=filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)


def _what_was_kept(out: Path) -> str:
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return f"no checkpoint was written yet under {out / CHECKPOINT_DIR}; rerun the same command to start again"
    return (f"checkpoints up to {checkpoints[-1].name} are kept in {out / CHECKPOINT_DIR}; rerun the same command "
            "(with workers available) to resume from there")


def _write_run_files(run: TrainRun, cfg: TrainJobConfig) -> None:
    index = [{"step": int(p.name.split("-")[1]), "path": str(p),
              **{k: v for k, v in json.loads((p / STATE_FILE).read_text()).items() if k in ("epoch",)}}
             for p in run.checkpoints]
    (run.dir / "checkpoints.json").write_text(json.dumps(index, indent=1))
    with (run.dir / "train_log.jsonl").open("w") as f:
        for row in run.history:
            f.write(json.dumps(row) + "\n")
    plot_training_curve(run.history, run.dir / "train_loss.png", cfg.train.objective)
    last = run.history[-1] if run.history else {}
    log.info("trained %d steps in %.1f s; final loss %.4f; %d checkpoints in %s", len(run.history), run.seconds,
             last.get("loss", float("nan")), len(run.checkpoints), run.dir / CHECKPOINT_DIR)


def plot_training_curve(history: list[dict[str, float]], path: Path, objective: str) -> Path | None:
    if not history:
        return None
    from ..scoring.summary import pyplot

    plt = pyplot()

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], lw=1.2, label=f"{objective} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if objective == "dpo":
        twin = ax.twinx()
        twin.plot(steps, [h["reward_accuracy"] for h in history], color="tab:green", lw=1, alpha=0.7,
                  label="reward accuracy")
        twin.set_ylabel("reward accuracy")
        twin.set_ylim(-0.05, 1.05)
    ax.set_title(f"LoRA {objective.upper()} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
