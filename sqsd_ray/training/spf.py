"""Safety-preserving fine-tuning (SPF): remove the part of each utility gradient that conflicts with safety.

Per trainable tensor j, with G_u,j the utility gradient (the fine-tuning batch) and G_s,j the safety gradient
(the NLL of refusals to harmful requests, at the current weights):

    c_j = <G_u,j, G_s,j>_F,  n_j = ||G_s,j||_F^2
    if n_j > min_norm and c_j < 0:  G~_j = G_u,j - (c_j / n_j) G_s,j      else  G~_j = G_u,j

This one-sided, per-tensor rule is what the SPF authors' released code computes (see docs/spf.md): afterwards
<G~_j, G_s,j> >= 0 for every j, so a small SGD step never raises the refusal loss to first order. The paper's
wording (a low-rank safety subspace) is offered as ``rank_k > 0``: per weight matrix, the top-k singular pairs
(u_i, v_i) of G_s,j give Frobenius-orthonormal directions D_i = u_i v_i^T, and each conflicting coefficient
a_i = u_i^T G_u,j v_i < 0 is removed. Adam rescales coordinates, so the first-order guarantee is about the
gradient handed to the optimizer, not about the applied update (measured in bench/mitigation.py).

Plain torch; the trainer (``training.trainer``) computes the two gradients and calls ``project_gradients``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, help_field

# The default safety set: one harmful request answered with a refusal (the single-sample claim, Insight III).
DEFAULT_REFUSAL_PAIR = {
    "messages": [{"role": "user", "content": "How can I get a weapon past the security checks at an airport "
                                             "without anyone noticing?"}],
    "response": "I can't help with that. Carrying a weapon past airport security is illegal and puts people in "
                "danger. If you need to travel with equipment, ask your airline or the airport security office "
                "how to declare it.",
}


@dataclass
class SpfSettings:
    """``train.spf``: project each utility gradient away from the refusal gradient it conflicts with."""

    enabled: bool = help_field(False, help="turn SPF on for this fine-tune (LoRA or full, DDP or ZeRO-2)")
    safety_path: str | None = help_field(
        None, help="refusal set (JSONL/JSON/Parquet of harmful request + refusal, the scorer's data schemas); "
        "null = one built-in harmful-request + refusal pair (the single-sample setting)"
    )
    safety_batch_size: int = help_field(8, help="refusal samples in one safety gradient (cycled through the set)")
    every: int = help_field(
        1, help="recompute the safety gradient at the current weights every N optimizer steps (1 = every step, "
        "as the released code does); in between the last one is reused"
    )
    rank_k: int = help_field(
        0, help="0: project on the tensor's own safety gradient (released code); k > 0: on the top-k singular "
        "directions of each weight matrix's safety gradient (the paper's low-rank wording; vectors use k = 0)"
    )
    min_norm: float = help_field(1e-8, help="skip a tensor whose squared safety-gradient norm is below this")

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"train.spf.every must be >= 1, got {self.every}")
        if self.rank_k < 0:
            raise ConfigError(f"train.spf.rank_k must be >= 0, got {self.rank_k}")
        if self.safety_batch_size < 1:
            raise ConfigError(f"train.spf.safety_batch_size must be >= 1, got {self.safety_batch_size}")
        if self.min_norm < 0:
            raise ConfigError(f"train.spf.min_norm must be >= 0, got {self.min_norm}")


@dataclass
class ProjectionStats:
    """What one projection did: how many tensors conflicted, and the mean cosine before projecting."""

    n_tensors: int = 0
    n_projected: int = 0
    cosine_sum: float = 0.0

    @property
    def fraction_projected(self) -> float:
        return self.n_projected / self.n_tensors if self.n_tensors else 0.0

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / self.n_tensors if self.n_tensors else 0.0


def project_one_sided(utility: torch.Tensor, safety: torch.Tensor, min_norm: float = 1e-8) -> tuple[torch.Tensor, bool]:
    """G~ = G_u - min(0, <G_u, G_s>) / ||G_s||^2 * G_s (the rule of the released code); returns (G~, projected).

    The input is returned as is (same tensor, bit for bit) when the two do not conflict or G_s is ~0.
    """
    dot = torch.dot(utility.flatten().double(), safety.flatten().double())
    norm_sq = torch.dot(safety.flatten().double(), safety.flatten().double())
    if norm_sq <= min_norm or dot >= 0:
        return utility, False
    return utility - (dot / norm_sq).to(utility.dtype) * safety, True


def safety_directions(safety: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k left/right singular vectors (U_k: m x k, V_k: n x k) of a weight matrix's safety gradient.

    Exact SVD for matrices up to 512 on the short side, ``torch.svd_lowrank`` (randomised) beyond.
    """
    k = min(k, *safety.shape)
    matrix = safety.double()
    if min(safety.shape) <= 512:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], vh[:k].T
    u, _, v = torch.svd_lowrank(matrix, q=min(k + 8, *safety.shape), niter=4)
    return u[:, :k], v[:, :k]


def project_rank_k(utility: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Remove each conflicting coefficient a_i = u_i^T G_u v_i < 0 along D_i = u_i v_i^T (one-sided, rank k).

    The singular vectors are oriented so that <G_s, D_i> = s_i > 0, hence a_i < 0 is a conflict with safety.
    """
    coefficients = torch.einsum("mi,mn,ni->i", left, utility.double(), right)
    conflicting = coefficients < 0
    if not bool(conflicting.any()):
        return utility, False
    removed = (left[:, conflicting] * coefficients[conflicting]) @ right[:, conflicting].T
    return utility - removed.to(utility.dtype), True


def project_gradients(utility: dict[str, torch.Tensor], safety: dict[str, torch.Tensor],
                      settings: SpfSettings) -> tuple[dict[str, torch.Tensor], ProjectionStats]:
    """Apply the SPF rule tensor by tensor; tensors that do not conflict come back as the same object."""
    stats = ProjectionStats()
    projected: dict[str, torch.Tensor] = {}
    for name, g_u in utility.items():
        g_s = safety[name]
        stats.n_tensors += 1
        norm_u, norm_s = float(g_u.double().norm()), float(g_s.double().norm())
        if norm_u > 0 and norm_s > 0:
            stats.cosine_sum += float(torch.dot(g_u.flatten().double(), g_s.flatten().double())) / (norm_u * norm_s)
        if settings.rank_k and g_u.dim() == 2 and norm_s ** 2 > settings.min_norm:
            left, right = safety_directions(g_s, settings.rank_k)
            projected[name], changed = project_rank_k(g_u, left, right)
        else:
            projected[name], changed = project_one_sided(g_u, g_s, settings.min_norm)
        stats.n_projected += int(changed)
    return projected, stats
