"""SQSD per sample (paper Eq. 9-12, §4.3): one forward + one backward per padded batch and init state.

SQSD(z) = Σ_m ⟨ΔW_m(z)/‖ΔW_m(z)‖, V̂_danger,m⟩ − Σ_m ⟨ΔW_m(z)/‖ΔW_m(z)‖, V̂_safety,m⟩

where the danger term is taken at the danger initialisation state θ_danger (a checkpoint of a pilot benign
fine-tune, θ_t*) and the safety term at θ_safety = θ0 + α*·V_safety (§4.3, App. E). Each state is one LoRA
adapter of a single peft model; a pass activates one adapter, runs the batch with ``hooks.LoraGradCapture``
and reduces every module to per-sample scalars with ``kernel.project_module`` inside the backward pass.

Every per-sample column the paper's ablations need is produced by the same pass (Table 3 with no rerun):
normalised projections (SQSD), raw projections (w/o module-wise normalisation), each direction alone,
update norms, losses and lengths; optionally per-module contributions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..models.directions import Direction
from ..models.lora import lora_layers
from .compiled import CompileDecision, CompiledReduction
from .hooks import LoraGradCapture
from .kernel import (
    ModuleProjections,
    ProjectionTarget,
    accumulation_dtype,
    normalised_projection,
    project_module,
    raw_projection,
)

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ZERO_UPDATE = "zero_update"  # every module's ΔW is exactly zero (e.g. no response token survived)
STATUS_NONFINITE = "nonfinite"  # loss or a projection is NaN/inf


@dataclass
class InitState:
    """A LoRA initialisation state (A0, B0 per module) with its adapter scaling s, as an adapter to activate."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A0 (r×d_in), B0 (d_out×r))
    scaling: float
    description: str = ""
    fingerprint: str = ""

    @property
    def rank(self) -> int:
        (A0, _), *_ = self.factors.values()
        return int(A0.shape[0])


@dataclass
class ScoringPass:
    """One forward/backward per batch: an init state and the directions projected at it."""

    state: InitState
    directions: dict[str, Direction]


def per_sample_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean response-token NLL per sample (the SFT loss of one sample), and the response token count.

    logits: (n, T, V); labels: (n, T) aligned with input_ids, -100 outside the response. The batch loss used
    for the backward is the SUM of these, so no sample's gradient is scaled by the batch size.
    """
    n, T, V = logits.shape
    # Shift the labels, not the logits, and take the log-softmax over the last dimension of a flat view:
    # no copy of the logits, and on CPU a class dimension in the middle (transpose(1, 2)) is both ~3x slower
    # and ~15x less accurate in fp32 for a 49k vocabulary (bench/kernel.py).
    next_labels = torch.full_like(labels, -100)
    next_labels[:, :-1] = labels[:, 1:]
    flat_logits = logits.reshape(n * T, V).to(accumulation_dtype(logits.dtype))
    nll = F.cross_entropy(flat_logits, next_labels.reshape(-1), ignore_index=-100, reduction="none").view(n, T)
    counts = (next_labels != -100).sum(dim=1)
    return nll.sum(dim=1) / counts.clamp_min(1), counts


class SqsdScorer:
    """Holds a peft model with one adapter per init state and scores padded batches.

    ``model`` is a peft model carrying every ``pass.state.name`` as an adapter whose factors equal the state's;
    build one with ``build_scorer``. Scoring mutates nothing: adapters are only activated in turn.
    """

    def __init__(self, model: nn.Module, passes: list[ScoringPass], per_module: bool = False,
                 reduction: CompiledReduction | None = None, compile_decision: CompileDecision | None = None):
        self.model = model
        self.passes = passes
        self.per_module = per_module
        self.reduction = reduction  # None: kernel.project_module, eagerly
        self._eager_decision = compile_decision or CompileDecision("off", False, "scoring.compile: off")
        self.device = next(model.parameters()).device
        self.model_dtype = next(model.parameters()).dtype
        self.acc_dtype = accumulation_dtype(self.model_dtype)
        self.modules = list(lora_layers(model, passes[0].state.name))
        self._targets: dict[str, dict[str, dict[str, ProjectionTarget]]] = {}
        self._factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._scalings: dict[str, dict[str, float]] = {}
        self._layers: dict[str, dict[str, nn.Module]] = {}
        for p in passes:
            layers = self._layers[p.state.name] = lora_layers(model, p.state.name)
            if list(layers) != self.modules:
                raise ValueError(f"init state {p.state.name!r} covers different modules than {passes[0].state.name!r}")
            self._scalings[p.state.name] = {m: float(layers[m].scaling[p.state.name]) for m in self.modules}
            self._factors[p.state.name] = {
                m: (A0.to(self.device, self.acc_dtype), B0.to(self.device, self.acc_dtype))
                for m, (A0, B0) in p.state.factors.items()
            }
            self._targets[p.state.name] = {
                m: {
                    d_name: ProjectionTarget.build(
                        *self._factors[p.state.name][m],
                        direction.modules[m].A.to(self.device),
                        direction.modules[m].B.to(self.device),
                        direction.modules[m].scaling,
                        dtype=self.acc_dtype,
                    )
                    for d_name, direction in p.directions.items()
                }
                for m in self.modules
            }
        # the compiled reduction takes each module's targets stacked: (names, right_A (K,r,d_in), right_B (K,d_out,r))
        self._stacked = {
            state: {m: (list(by_name), torch.stack([t.right_A for t in by_name.values()]),
                        torch.stack([t.right_B for t in by_name.values()])) for m, by_name in targets.items()}
            for state, targets in self._targets.items()
        } if reduction is not None else {}

    @property
    def compile_decision(self) -> CompileDecision:
        """Why the reduction is compiled or not (scoring.compile), as run.json reports it; after a failed compile,
        the failure."""
        return self.reduction.decision if self.reduction is not None else self._eager_decision

    @property
    def direction_names(self) -> list[str]:
        return [d for p in self.passes for d in p.directions]

    def run_pass(
        self,
        state: str,
        targets: dict[str, dict[str, ProjectionTarget]],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, ModuleProjections]]:
        """One forward + backward at init state ``state``: per-sample losses, and per module ‖D‖² and ⟨D, t⟩ for
        each target t in ``targets[module]`` (``score_batch``: the directions; ``fidelity``: a displacement).

        The modules appear in the order their gradients arrived (the backward's order)."""
        factors = self._factors[state]
        # None when nothing is padded: the kernel then skips masking, and no hook asks the device about it.
        token_mask = attention_mask.bool() if bool((attention_mask == 0).any()) else None
        results: dict[str, ModuleProjections] = {}

        compiled = self.reduction is not None and targets is self._targets.get(state)  # the directions, not fidelity's
        if compiled:
            stacked = self._stacked[state]
            # always a mask: one graph whether or not the batch is padded (an all-True mask costs a fused select)
            mask = token_mask if token_mask is not None else torch.ones_like(attention_mask, dtype=torch.bool)

        def on_grad(module: str, x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> None:
            A0, B0 = factors[module]
            if compiled:
                names, right_A, right_B = stacked[module]
                inner, d_norm_sq = self.reduction(x, a, gu, A0, B0, right_A, right_B, mask)
                results[module] = ModuleProjections(inner=dict(zip(names, inner.unbind(1))), d_norm_sq=d_norm_sq)
            else:
                results[module] = project_module(x, a, gu, A0, B0, targets[module], token_mask)

        if self.model.active_adapter != state:
            self.model.set_adapter(state)
        with LoraGradCapture(self.model, state, on_grad, layers=self._layers[state]):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            losses, _ = per_sample_mean_nll(logits, labels)
            del logits
            losses.sum().backward()
        missing = set(self.modules) - set(results)
        if missing:
            raise RuntimeError(f"no gradient reached LoRA module {sorted(missing)[0]} (is it on the loss path?)")
        return losses.detach(), results

    def score_batch(self, batch: dict) -> dict[str, np.ndarray]:
        """Padded batch (input_ids, attention_mask, labels, sample_ids) -> per-sample columns."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        n = input_ids.shape[0]
        out: dict[str, np.ndarray] = {"sample_id": np.asarray(batch["sample_ids"], dtype=object)}
        out["n_response_tokens"] = (labels[:, 1:] != -100).sum(1).cpu().numpy().astype(np.int32)
        out["n_tokens"] = attention_mask.sum(1).cpu().numpy().astype(np.int32)

        zero_modules = torch.zeros(n, dtype=torch.int32)
        nonfinite = torch.zeros(n, dtype=torch.bool)
        for scoring_pass in self.passes:
            state = scoring_pass.state.name
            losses, results = self.run_pass(state, self._targets[state], input_ids, attention_mask, labels)
            losses = losses.cpu()
            nonfinite |= ~torch.isfinite(losses)
            d_norm_sq = torch.stack([results[m].d_norm_sq for m in self.modules], 1).cpu()  # (n, M)
            scalings = torch.tensor([self._scalings[state][m] for m in self.modules], dtype=d_norm_sq.dtype)
            zero_modules += (d_norm_sq == 0).sum(1).to(torch.int32)
            update_norm = (d_norm_sq * scalings**2).sum(1).sqrt().numpy()  # ‖ΔW‖ over all modules, η = 1
            for d_name in scoring_pass.directions:
                # Columns are named by the direction projected at this state, so the schema is the same
                # whether the two states coincide (one pass) or not (two passes).
                out[f"loss_{d_name}_state"] = losses.numpy().astype(np.float64)
                out[f"update_norm_{d_name}_state"] = update_norm
            for d_name in scoring_pass.directions:
                inner = torch.stack([results[m].inner[d_name] for m in self.modules], 1).cpu()  # (n, M)
                v_norm = torch.tensor(
                    [self._targets[state][m][d_name].v_norm for m in self.modules], dtype=inner.dtype
                )
                normed = normalised_projection(inner, d_norm_sq, v_norm)  # (n, M), Eq. 11 terms
                raw = raw_projection(inner, scalings, v_norm)
                out[f"{d_name}_proj"] = normed.sum(1).numpy()
                out[f"{d_name}_proj_raw"] = raw.sum(1).numpy()
                nonfinite |= ~torch.isfinite(normed.sum(1)) | ~torch.isfinite(raw.sum(1))
                if self.per_module:
                    out[f"{d_name}_proj_by_module"] = list(normed.numpy().astype(np.float32))
                    out[f"{d_name}_proj_raw_by_module"] = list(raw.numpy().astype(np.float32))

        if "danger" in self.direction_names and "safety" in self.direction_names:
            out["sqsd"] = out["danger_proj"] - out["safety_proj"]  # Eq. 11-12
            out["sqsd_raw"] = out["danger_proj_raw"] - out["safety_proj_raw"]  # w/o normalisation
        n_modules_total = len(self.modules) * len(self.passes)
        status = np.full(n, STATUS_OK, dtype=object)
        status[(zero_modules == n_modules_total).numpy()] = STATUS_ZERO_UPDATE
        status[nonfinite.numpy()] = STATUS_NONFINITE
        out["zero_norm_modules"] = zero_modules.numpy()
        out["status"] = status
        bad = status != STATUS_OK
        for key in ("sqsd", "sqsd_raw", *(f"{d}_proj" for d in self.direction_names)):
            if key in out and bad.any():
                out[key] = np.where(bad, np.nan, out[key])
        return out

    def score_batches(self, batches: Iterable[dict]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            yield self.score_batch(batch)


def states_equal(a: InitState, b: InitState) -> bool:
    if a.scaling != b.scaling or a.factors.keys() != b.factors.keys():
        return False
    return all(
        torch.equal(a.factors[m][0], b.factors[m][0]) and torch.equal(a.factors[m][1], b.factors[m][1])
        for m in a.factors
    )


def plan_passes(
    danger_state: InitState, safety_state: InitState, v_danger: Direction, v_safety: Direction
) -> list[ScoringPass]:
    """Danger projection at θ_danger, safety projection at θ_safety; one pass when the two states coincide."""
    if states_equal(danger_state, safety_state):
        return [ScoringPass(danger_state, {"danger": v_danger, "safety": v_safety})]
    return [ScoringPass(danger_state, {"danger": v_danger}), ScoringPass(safety_state, {"safety": v_safety})]


@dataclass
class ScoreColumns:
    """Collects ``score_batch`` outputs into whole columns."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, part: dict[str, np.ndarray]) -> None:
        self.parts.append(part)

    def columns(self) -> dict[str, list]:
        if not self.parts:
            return {}
        keys = list(self.parts[0])
        return {k: [v for p in self.parts for v in list(p[k])] for k in keys}
