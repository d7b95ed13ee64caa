"""``sqsd-ray restore``: safety restoration after a LoRA (or full) fine-tune, in process or on Ray Train.

Loads the base model θ0 and the fine-tune θ_ft, reads the harmful set D_h (prompt + harmful completion), the
retain set D_t and optionally a refusal set (prompt + refusal, evaluation only), runs ``restore.restore`` and
writes::

    adapter/             the restored LoRA adapter (peft format, safetensors)
    restore.json         losses before/after, update norm and ratio, stop reason, diagnostic, history, config hash
    restore.md           a summary table
    restore_losses.png   L_h and L_t per iteration, with τ and the task-loss limit
    config.yaml          the resolved config
    ray_train/           Ray Train's run record (scaling.use_ray only)

LoRA fine-tune (``fine_tuned.adapter``): θ is that adapter; θ_base is the same model with the adapter off.
Full fine-tune (``fine_tuned.full_model``): its weights are loaded over the base model after the base losses
are taken, and a fresh restoration LoRA (``restore_lora``) is trained on top; the restored adapter then
applies to the *fine-tuned* model. Only the LoRA parameters are optimised, in one sequential loop: in this
process, or (``scaling.use_ray``) as a one-worker Ray Train job, so that on a cluster it runs on a GPU worker.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .. import __version__
from ..config import ConfigError, from_dict, help_field, prepare_run_dir, stable_hash, to_dict
from ..data.records import DataConfig, DataReport, load_samples
from ..data.tokenize import collate, length_sorted_batches, tokenize_samples
from ..models.loading import BaseModelReference, ModelConfig, base_model_reference, load_model, load_tokenizer
from ..models.lora import (
    LoraSettings,
    apply_lora,
    load_adapter_state,
    lora_module_shapes,
    save_adapter,
    set_lora_factors,
)
from ..runtime import WorkerScaling
from ..scoring.summary import markdown_table, save_figure
from ..tracking import TrackingConfig, flatten_params, open_tracker, tracking_run
from ..training.config import RayTrainOutput
from .restore import BaseLosses, RestoreResult, RestoreSettings, per_example_losses, restore

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # also the adapter folder inside a training checkpoint (train.ADAPTER_DIR)
MODEL_DIR = "model"  # the weights folder inside a full fine-tuning checkpoint (train.MODEL_DIR)
PREMISE_CORRELATION = 0.5  # below this base/ft harmful-loss correlation the method's premise is weak (notes §1b)


@dataclass
class FineTuned:
    """The fine-tune to restore: exactly one of a LoRA adapter or a full model."""

    adapter: str | None = help_field(
        None, help="peft LoRA adapter dir of the fine-tune (or a training checkpoint dir holding adapter/)"
    )
    full_model: str | None = help_field(
        None, help="safetensors weights dir of a full fine-tune of model (or a checkpoint dir holding model/); "
        "a fresh restoration LoRA (restore_lora) is trained on top"
    )

    def __post_init__(self) -> None:
        if (self.adapter is None) == (self.full_model is None):
            raise ConfigError("fine_tuned: set exactly one of fine_tuned.adapter (a LoRA fine-tune) or "
                              "fine_tuned.full_model (a full fine-tune)")


@dataclass
class RestoreConfig:
    """Restore safety after a fine-tune: harmful-loss ascent in the task loss's flat directions (notes §1b)."""

    model: ModelConfig = help_field(help="the base model θ0 the fine-tune started from", default_factory=ModelConfig)
    fine_tuned: FineTuned = help_field(help="the fine-tune to restore", default_factory=FineTuned)
    harmful: DataConfig = help_field(
        default_factory=DataConfig, help="D_h: harmful prompts paired with harmful completions (prompt + response), "
        "e.g. preset advbench_harmful"
    )
    retain: DataConfig = help_field(
        default_factory=DataConfig, help="D_t: the retain / task set, e.g. a subset of the fine-tuning data "
        "(data.limit)"
    )
    refusal: DataConfig | None = help_field(
        None, help="optional evaluation set of prompts with refusals as responses (e.g. preset "
        "advbench_refusal_pairs, whose response is the refusal): refusal NLL before and after"
    )
    refusal_train: DataConfig | None = help_field(
        None, help="D_r for the refusal-descent variant (restore.refusal_weight > 0): harmful prompts answered with "
        "refusals, disjoint from the evaluation sets"
    )
    restore: RestoreSettings = help_field(help="the restoration loop (notes §1b)", default_factory=RestoreSettings)
    restore_lora: LoraSettings = help_field(
        default_factory=LoraSettings, help="the fresh restoration LoRA put on a full fine-tune (unused for a LoRA "
        "fine-tune)"
    )
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", help="auto = cuda when available")
    scaling: WorkerScaling = help_field(
        default_factory=lambda: WorkerScaling(use_ray=False),
        help="use_ray: true runs the restoration as a one-worker Ray Train job (with use_gpu on a GPU worker: a "
        "cluster's driver need not have one; the output dir must then be on storage the worker shares); false = "
        "in this process. The line search is sequential: num_workers stays 1"
    )
    output: RayTrainOutput = help_field(
        help="run directory; with scaling.use_ray the worker writes the results into it (shared storage) and Ray "
        "Train its run record into storage_path", default_factory=lambda: RayTrainOutput(dir="runs/restore"))
    tracking: TrackingConfig = help_field(
        default_factory=TrackingConfig, help="where the restoration's curves go (L_h, L_t, J and the refusal NLL per "
        "accepted iterate, and the summary): TensorBoard under the run directory, or MLflow; docs/tracking.md"
    )

    def __post_init__(self) -> None:
        if self.scaling.num_workers != 1:
            raise ConfigError(f"scaling.num_workers must be 1 for a restoration (its line search is one sequential "
                              f"loop over the LoRA vector), got {self.scaling.num_workers}")
        for name in ("harmful", "retain", "refusal", "refusal_train"):
            if getattr(self, name) is not None and not getattr(self, name).require_response:
                raise ConfigError(f"{name}.require_response must be true: restoration needs the {name} responses")
        if self.restore.refusal_weight > 0 and self.refusal_train is None:
            raise ConfigError("restore.refusal_weight > 0 needs refusal_train (harmful prompts answered with refusals)")


# ---------------------------------------------------------------------------------------------- loading


def load_batches(data: DataConfig, tokenizer: Any, what: str, micro_batch_size: int) -> tuple[list[dict], DataReport]:
    """A data set as fixed padded batches (length-sorted); errors name the set, the record and the field."""
    try:
        samples, report = load_samples(data)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{what} set: {err}") from err
    preference = next((s for s in samples if s.rejected is not None), None)
    if what == "harmful" and preference is not None:
        raise ValueError(f"harmful set: {preference.source} is a preference pair, whose response is the chosen "
                         "(safe) answer; give prompt + harmful completion records (e.g. preset advbench_harmful)")
    tokenized = tokenize_samples(samples, tokenizer, data, report)
    if not tokenized:
        raise ValueError(f"{what} set {data.path or data.preset}: no usable samples\n{report.summary()}")
    batches = [collate([tokenized[i] for i in idx], tokenizer.pad_token_id)
               for idx in length_sorted_batches(tokenized, micro_batch_size, max_tokens=1 << 30)]
    return batches, report


def _adapter_dir(path: str) -> Path:
    directory = Path(path).expanduser()
    return directory / ADAPTER_DIR if (directory / ADAPTER_DIR / "adapter_config.json").is_file() else directory


def load_lora_fine_tune(model_cfg: ModelConfig, adapter: str, device: torch.device):
    """Base model + the fine-tuned adapter as a peft model; a mismatch is an error naming module and shape."""
    directory = _adapter_dir(adapter)
    factors, info = load_adapter_state(directory)
    if not info.uniform_scaling:
        raise ValueError(f"adapter {directory}: per-module alpha_pattern / rank_pattern scalings are not supported")
    expected = {model_cfg.name_or_path, base_model_reference(model_cfg).name_or_path}  # as configured, or recorded
    if info.base_model_name_or_path and info.base_model_name_or_path not in expected:
        log.warning("adapter %s was saved for base model %s; loading it on %s", directory,
                    info.base_model_name_or_path, model_cfg.name_or_path)
    model = load_model(model_cfg)
    lora = LoraSettings(r=info.lora.r, alpha=info.lora.alpha, target_modules=info.lora.target_modules, dropout=0.0,
                        use_rslora=info.lora.use_rslora)
    try:
        lora_module_shapes(model, lora)
        peft_model = apply_lora(model, lora)
        set_lora_factors(peft_model, factors)
    except ValueError as err:
        raise ValueError(f"adapter {directory} does not fit the base model {model_cfg.name_or_path}: {err}") from err
    return peft_model.to(device).eval(), lora


def _full_model_files(path: str) -> list[Path]:
    directory = Path(path).expanduser()
    if (directory / MODEL_DIR).is_dir():
        directory = directory / MODEL_DIR
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"fine_tuned.full_model: {directory} holds no *.safetensors weights")
    return files


def load_full_fine_tune(cfg: RestoreConfig, harmful, task, refusal, device: torch.device):
    """Base losses on θ0, then the full fine-tune's weights over it and a fresh restoration LoRA on top.

    Returns (peft model, base losses, ‖W_ft − W_0‖ over the restoration LoRA's target modules).
    """
    from safetensors.torch import load_file

    model = load_model(cfg.model).to(device).eval()
    base = BaseLosses(harmful=per_example_losses(model, harmful), task=float(per_example_losses(model, task).mean()),
                      refusal=float(per_example_losses(model, refusal).mean()) if refusal else None)
    targets = lora_module_shapes(model, cfg.restore_lora)
    base_weights = {name: model.get_submodule(name).weight.detach().to("cpu", torch.float64, copy=True)
                    for name in targets}
    state: dict[str, torch.Tensor] = {}
    for file in _full_model_files(cfg.fine_tuned.full_model):
        state.update(load_file(str(file)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"full fine-tune {cfg.fine_tuned.full_model} does not fit the base model "
                         f"{cfg.model.name_or_path}: {first}") from err
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:  # a tied lm_head is not saved
        raise ValueError(f"full fine-tune {cfg.fine_tuned.full_model} does not fit the base model "
                         f"{cfg.model.name_or_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ft_norm_sq = sum(float((model.get_submodule(name).weight.detach().to("cpu", torch.float64) - weight).square().sum())
                     for name, weight in base_weights.items())
    peft_model = apply_lora(model, cfg.restore_lora).eval()
    return peft_model, base, math.sqrt(ft_norm_sq)


# ---------------------------------------------------------------------------------------------- the job


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


@dataclass
class _Sets:
    """The data sets as fixed padded batches, with their load reports."""

    harmful: list[dict]
    task: list[dict]
    refusal: list[dict] | None
    refusal_train: list[dict] | None
    reports: dict[str, DataReport]


def _load_sets(cfg: RestoreConfig) -> _Sets:
    tokenizer = load_tokenizer(cfg.model)
    size = cfg.restore.micro_batch_size
    harmful, harmful_report = load_batches(cfg.harmful, tokenizer, "harmful", size)
    task, task_report = load_batches(cfg.retain, tokenizer, "retain", size)
    refusal, refusal_report = load_batches(cfg.refusal, tokenizer, "refusal", size) if cfg.refusal else (None, None)
    refusal_train = (load_batches(cfg.refusal_train, tokenizer, "refusal_train", size)[0]
                     if cfg.refusal_train is not None and cfg.restore.refusal_weight > 0 else None)
    reports = {"harmful": harmful_report, "retain": task_report,
               **({"refusal": refusal_report} if refusal_report else {})}
    return _Sets(harmful, task, refusal, refusal_train, reports)


def run_restore(cfg: RestoreConfig) -> Path:
    """Restore ``cfg.fine_tuned``; write adapter/, restore.json, restore.md, restore_losses.png; return the dir."""
    sets = _load_sets(cfg)  # data errors surface before the output dir is touched
    loaded = None if cfg.scaling.use_ray else _load_fine_tune(cfg, sets)  # so do model errors, in process
    out = prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    params = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "tracking")}
    with tracking_run(cfg.tracking, out, params) as tracking:
        if loaded is None:
            _restore_with_ray_train(cfg, out)
        else:
            _restore_into(cfg, sets, loaded, out)
        if tracking is not None:
            _log_restoration(json.loads((out / "restore.json").read_text()), tracking)
    return out


def _log_restoration(summary: dict[str, Any], tracking) -> None:
    """Each accepted iterate of the history as one step of the curves, then the summary's numbers at the last."""
    with open_tracker(tracking) as tracker:
        for row in summary["history"]:
            tracker.log_metrics({f"restore/{k}": v for k, v in row.items() if k != "iter"}, step=int(row["iter"]))
        final = {f"summary/{k}": float(v) for k, v in flatten_params(
            {k: v for k, v in summary.items() if k not in ("history", "diagnostic")}).items() if _is_number(v)}
        tracker.log_metrics(final, step=int(summary["history"][-1]["iter"]) if summary["history"] else 0)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _restore_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: the same restoration, in the worker's process (its GPU, when it has one)."""
    cfg = from_dict(RestoreConfig, config["cfg"])
    if _device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    sets = _load_sets(cfg)
    _restore_into(cfg, sets, _load_fine_tune(cfg, sets), Path(config["out"]))


def _restore_with_ray_train(cfg: RestoreConfig, out: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..runtime import fit_on_ray_train, init_ray, train_failure_config

    cfg.output.ray_storage(out)  # a storage_path pyarrow cannot open is named before Ray Train starts
    init_ray(cfg.scaling)
    trainer = TorchTrainer(
        _restore_worker,
        train_loop_config={"cfg": to_dict(cfg), "out": str(out.resolve())},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=RunConfig(name="ray_train", storage_path=cfg.output.ray_storage_path(out),
                             failure_config=train_failure_config(cfg.scaling)),
    )
    result = fit_on_ray_train(trainer, cfg.scaling,
                              lambda: "restoration keeps no checkpoints; rerun the same command to start it again")
    if result.error is not None:
        raise RuntimeError(f"restoration failed on its Ray Train worker: {result.error}") from result.error
    if not (out / "restore.json").is_file():
        raise RuntimeError(f"the Ray Train worker wrote no restore.json under {out}: is output.dir on storage the "
                           "worker shares with the driver?")


def _load_fine_tune(cfg: RestoreConfig, sets: _Sets) -> tuple:
    """(peft model, its LoRA settings, base losses or None, ‖ΔW_ft‖ or None, the adapter's base model)."""
    device = _device(cfg.device)
    if cfg.fine_tuned.adapter is not None:
        model, lora = load_lora_fine_tune(cfg.model, cfg.fine_tuned.adapter, device)
        return model, lora, None, None, base_model_reference(cfg.model)
    model, base, ft_norm = load_full_fine_tune(cfg, sets.harmful, sets.task, sets.refusal, device)
    weights_dir = _full_model_files(cfg.fine_tuned.full_model)[0].parent.resolve()
    return model, cfg.restore_lora, base, ft_norm, BaseModelReference(str(weights_dir))


def _restore_into(cfg: RestoreConfig, sets: _Sets, loaded: tuple, out: Path) -> None:
    harmful, task, refusal, refusal_train = sets.harmful, sets.task, sets.refusal, sets.refusal_train
    model, lora, base, ft_norm, adapter_base = loaded
    result = restore(model, harmful, task, cfg.restore, refusal=refusal, base=base, ft_update_norm=ft_norm,
                     refusal_train=refusal_train)
    rho = result.diagnostic["spearman"]
    if math.isnan(rho):
        log.warning("the per-example harmful losses at θ_base and θ_ft give no correlation (fewer than 3 examples "
                    "or a constant loss on one side): the method's premise is unchecked")
    elif rho < PREMISE_CORRELATION:
        log.warning("per-example harmful loss at θ_base and θ_ft correlate weakly (Spearman %.3f < %.1f): the "
                    "method's premise (a preserved harmful-loss landscape) is doubtful here", rho, PREMISE_CORRELATION)
    save_adapter(result.factors, lora, out / ADAPTER_DIR, adapter_base.name_or_path, adapter_base.revision)
    summary = {
        **result.summary(),
        "config_hash": stable_hash(cfg),
        "sqsd_ray_version": __version__,
        "fine_tuned": to_dict(cfg.fine_tuned),
        "model": cfg.model.name_or_path,
        "data": {name: report.to_dict() for name, report in sets.reports.items()},
    }
    (out / "restore.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "restore.md").write_text(_markdown(result, cfg))
    plot_history(result, out / "restore_losses.png")


def _markdown(result: RestoreResult, cfg: RestoreConfig) -> str:
    import pandas as pd

    rows = [{"loss (mean NLL)": name, **{k: f"{v:.4f}" for k, v in values.items()}}
            for name, values in result.losses.items()]
    s = cfg.restore
    return "\n".join([
        f"Restoration ({result.preconditioner}): {result.stop_reason} after {result.iterations} iterations "
        f"({result.sequence_passes} sequence passes, {result.seconds:.1f} s); returned iterate "
        f"{result.returned_iter} ({s.return_iterate}), whose losses are the 'restored' column",
        "",
        *markdown_table(pd.DataFrame(rows)),
        "",
        f"- harmful cap τ = {result.tau:.4f}; task-loss limit L_t(θ_ft) + δ = {result.task_limit:.4f} "
        f"(δ = {s.task_budget})",
        f"- update ‖ΔW_rest − ΔW_ft‖ = {result.update_norm:.4g}, ‖ΔW_ft‖ = {result.ft_update_norm:.4g}, ratio "
        f"{result.ratio:.4f} (cap ρ = {s.max_update_ratio}); ‖θ_rest − θ_ft‖ = {result.theta_distance:.4g}",
        f"- damping λ = {result.damping:.3g}; γ = {s.gamma}, μ = {s.mu}",
        f"- base vs fine-tuned per-example harmful loss: Pearson {result.diagnostic['pearson']:.3f}, Spearman "
        f"{result.diagnostic['spearman']:.3f} (n = {result.diagnostic['n']})",
        "",
    ])


def plot_history(result: RestoreResult, path: Path) -> Path:
    """L_h and L_t per accepted iteration, with the cap τ and the task-loss limit."""
    from ..scoring.summary import pyplot

    plt = pyplot()

    iters = [h["iter"] for h in result.history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(iters, [h["harmful"] for h in result.history], marker="o", ms=3, color="tab:red", label="L_h")
    top.axhline(result.tau, ls="--", color="tab:red", alpha=0.5, label="τ")
    top.set_ylabel("harmful NLL")
    top.legend(loc="best")
    bottom.plot(iters, [h["task"] for h in result.history], marker="o", ms=3, color="tab:blue", label="L_t")
    bottom.axhline(result.task_limit, ls="--", color="tab:blue", alpha=0.5, label="L_t(θ_ft) + δ")
    bottom.set_ylabel("task NLL")
    bottom.set_xlabel("iteration")
    bottom.legend(loc="best")
    for axis in (top, bottom):
        axis.axvline(result.returned_iter, ls=":", color="grey", alpha=0.7)
    top.set_title(f"restoration ({result.preconditioner}): {result.stop_reason}; returned iterate "
                  f"{result.returned_iter} (dotted)")
    return save_figure(fig, path)


__all__ = ["FineTuned", "RestoreConfig", "load_batches", "load_full_fine_tune", "load_lora_fine_tune",
           "plot_history", "run_restore"]
