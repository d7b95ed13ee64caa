"""Parameter-dynamics math (paper §3, App. E) in plain torch / Python: drift projections and directional sensitivity.

* Drift of a LoRA checkpoint from a fresh adapter (B = 0 at θ0): Δθ_t = {s·B_t A_t per module}, so the
  projection of Eq. 7–8, p(t) = ⟨θ_t − θ0, V̂⟩ = Σ_m s·s_v·tr((B_tᵀ B_v)(A_v A_tᵀ)) / ‖V‖, is r×r algebra on the
  factors: no dense ΔW is formed.
* Linear-path sensitivity, Eq. 26: DS_linear(α) = [S(θ0 + (α+δ)V) − S(θ0 + (α−δ)V)] / 2δ, read off a steering
  grid that holds α ± δ.
* Drift-enhanced sensitivity, Eq. 27: DS_drift(t) = [S(θ_{t+a}) − S(θ_t)] / [p(t+a) − p(t)] for consecutive
  checkpoints t, t+a; undefined (NaN, flagged) when the projection does not move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..models.directions import Direction, LoraFactors

GRID_TOLERANCE = 1e-6  # α values closer than this are the same grid point
FLAT_PROJECTION = 1e-12  # |p(t+a) − p(t)| below this leaves DS_drift undefined


def drift_projection(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scalings: Mapping[str, float], direction: Direction
) -> float:
    """⟨θ_t − θ0, V̂⟩ for a LoRA state trained from B = 0 (Eq. 7–8); the modules must match the direction's."""
    missing, extra = sorted(set(direction.modules) - set(factors)), sorted(set(factors) - set(direction.modules))
    if missing or extra:
        name = (missing or extra)[0]
        where = "the checkpoint lacks" if missing else "the direction lacks"
        raise ValueError(f"drift projection: {where} LoRA module {name!r} ({len(missing)} missing, {len(extra)} "
                         "extra); train and build directions with the same lora.target_modules")
    norm = direction.norm()
    if norm == 0:
        raise ValueError("drift projection: the direction has zero norm")
    total = 0.0
    for name, v in direction.modules.items():
        a, b = factors[name]
        total += LoraFactors(a, b, float(scalings[name])).inner(v)
    return total / norm


def drift_norm(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scalings: Mapping[str, float]) -> float:
    """‖θ_t − θ0‖ over all LoRA modules (fresh adapter at θ0)."""
    return math.sqrt(sum(LoraFactors(a, b, float(scalings[n])).norm_sq() for n, (a, b) in factors.items()))


@dataclass(frozen=True)
class LinearSensitivity:
    alpha: float
    safety_minus: float
    safety_plus: float
    ds: float


def ds_linear(safety_by_alpha: Mapping[float, float], delta: float = 0.1) -> list[LinearSensitivity]:
    """Eq. 26 at every grid α whose neighbours α ± δ are on the grid, in increasing α."""
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    grid = sorted(safety_by_alpha)

    def at(alpha: float) -> float | None:
        for g in grid:
            if abs(g - alpha) <= GRID_TOLERANCE:
                return safety_by_alpha[g]
        return None

    out = []
    for alpha in grid:
        minus, plus = at(alpha - delta), at(alpha + delta)
        if minus is not None and plus is not None:
            out.append(LinearSensitivity(alpha, minus, plus, (plus - minus) / (2 * delta)))
    return out


@dataclass(frozen=True)
class DriftSensitivity:
    step: int
    next_step: int
    safety: float
    next_safety: float
    projection: float
    next_projection: float
    ds: float  # NaN when the projection did not move


def ds_drift(steps: Sequence[int], safety: Sequence[float], projection: Sequence[float]) -> list[DriftSensitivity]:
    """Eq. 27 between consecutive checkpoints (sorted by step)."""
    if not len(steps) == len(safety) == len(projection):
        raise ValueError("steps, safety and projection must have the same length")
    rows = sorted(zip(steps, safety, projection))
    out = []
    for (t, s0, p0), (t1, s1, p1) in zip(rows, rows[1:]):
        dp = p1 - p0
        ds = (s1 - s0) / dp if abs(dp) > FLAT_PROJECTION else float("nan")
        out.append(DriftSensitivity(int(t), int(t1), s0, s1, p0, p1, ds))
    return out


def rank_linear(rows: Sequence[LinearSensitivity], top_k: int = 5, positive_alpha: bool = True) -> list[LinearSensitivity]:
    """Table 4's order: highest DS_linear first; α ≤ 0 left out by default (θ0 + αV needs α > 0 to steer
    towards safety, and α = 0 is a fresh adapter with B0 = 0)."""
    kept = [r for r in rows if math.isfinite(r.ds) and (r.alpha > GRID_TOLERANCE or not positive_alpha)]
    return sorted(kept, key=lambda r: (-r.ds, r.alpha))[:top_k]


def rank_drift(rows: Sequence[DriftSensitivity], top_k: int = 5, exclude_start: bool = True) -> list[DriftSensitivity]:
    """Table 5's order: most negative DS_drift first (a danger direction's sensitive states); only negative
    values qualify, and θ0 itself (step 0) is left out by default since it has no accumulated drift."""
    kept = [r for r in rows if math.isfinite(r.ds) and r.ds < 0 and not (exclude_start and r.step == 0)]
    return sorted(kept, key=lambda r: (r.ds, r.step))[:top_k]


__all__ = [
    "DriftSensitivity",
    "LinearSensitivity",
    "drift_norm",
    "drift_projection",
    "ds_drift",
    "ds_linear",
    "rank_drift",
    "rank_linear",
]
