"""Per-sample LoRA update projections in rank-r algebra (paper Eq. 9-12).

Symbols, per LoRA module m with scaling s (peft: h = W x + s·B(A x)) at an initialisation state (A0, B0):

    g_A = Σ_t (B0ᵀ gu_t) x_tᵀ            (r × d_in)     gu_t = ∂L/∂(B A x)_t = s·δ_t
    g_B = Σ_t gu_t (A0 x_t)ᵀ            (d_out × r)
    ΔW  = -η·s·(B0 g_A + g_B A0)         (Eq. 10; η = 1 here, it cancels after normalisation)

Write D = B0 g_A + g_B A0, so ΔW = -s·D. A direction V_m = s_v·B_v A_v stays factored, and every quantity
the score needs is an r × r contraction; no d_out × d_in matrix is ever formed per sample:

    ⟨D, V⟩ = ⟨g_A, s_v (B0ᵀ B_v) A_v⟩ + ⟨g_B, s_v B_v (A_v A0ᵀ)⟩      (the two right factors are precomputed)
    ‖D‖²   = ⟨B0ᵀB0, g_A g_Aᵀ⟩ + ⟨g_Bᵀ g_B, A0 A0ᵀ⟩ + 2·tr((B0ᵀ g_B)(A0 g_Aᵀ))

From these, per sample and module:

    raw projection        ⟨ΔW, V̂⟩           = -s·⟨D, V⟩ / ‖V‖
    normalised projection ⟨ΔW/‖ΔW‖, V̂⟩     = -⟨D, V⟩ / (‖D‖·‖V‖)        (Eq. 11's terms)
    update norm           ‖ΔW‖               = s·‖D‖

Inputs arrive in the model dtype; everything is accumulated in float32 (float64 for a float64 model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 whatever the model dtype, except that a float64 model keeps float64 (used by exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_lora_grads(
    x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor, B0: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample LoRA gradients from one module's captured tensors.

    x: (n, T, d_in) lora_A input; a: (n, T, r) lora_A output; gu: (n, T, d_out) grad of lora_B output;
    B0: (d_out, r); token_mask: (n, T) bool, False on padding. Returns g_A (n, r, d_in), g_B (n, d_out, r).
    """
    dtype = accumulation_dtype(x.dtype)
    x, a, gu, B0 = x.to(dtype), a.to(dtype), gu.to(dtype), B0.to(dtype)
    if token_mask is not None:
        # Padded positions get no gradient from the loss, but zero them explicitly (torch.where, not a product,
        # so a NaN/inf in a padded slot cannot leak): g_A and g_B are sums of gu-weighted terms, and a is
        # masked too because g_B pairs gu with a.
        keep = token_mask[..., None]
        gu = torch.where(keep, gu, 0.0)
        x = torch.where(keep, x, 0.0)
    # Products ordered so the thin rank-r side leads (CPU matmuls are ~2-3x slower the other way round).
    g_A = (B0.T @ gu.transpose(1, 2)) @ x  # (r, d_out) @ (n, d_out, T) @ (n, T, d_in) -> (n, r, d_in)
    g_B = (a.transpose(1, 2) @ gu).transpose(1, 2)  # ((n, r, T) @ (n, T, d_out))ᵀ -> (n, d_out, r)
    return g_A, g_B


@dataclass
class ProjectionTarget:
    """One direction's factors precomputed against one initialisation state, for one module.

    right_A = s_v (B0ᵀ B_v) A_v  (r0 × d_in), right_B = s_v B_v (A_v A0ᵀ)  (d_out × r0): ⟨D, V⟩ is then
    ⟨g_A, right_A⟩ + ⟨g_B, right_B⟩. ``v_norm`` = ‖V_m‖ (module-wise).
    """

    right_A: torch.Tensor
    right_B: torch.Tensor
    v_norm: float

    @classmethod
    def build(
        cls, A0: torch.Tensor, B0: torch.Tensor, A_v: torch.Tensor, B_v: torch.Tensor, s_v: float,
        dtype: torch.dtype = torch.float32,
    ) -> ProjectionTarget:
        A0, B0, A_v, B_v = (t.to(dtype) for t in (A0, B0, A_v, B_v))
        right_A = s_v * (B0.T @ B_v) @ A_v
        right_B = s_v * B_v @ (A_v @ A0.T)
        # ‖s_v B_v A_v‖² = s_v² ⟨B_vᵀB_v, A_v A_vᵀ⟩ (r × r algebra, see directions.LoraFactors.norm_sq)
        v_norm_sq = (s_v**2) * torch.sum((B_v.T @ B_v) * (A_v @ A_v.T))
        return cls(right_A=right_A, right_B=right_B, v_norm=float(v_norm_sq.clamp_min(0).sqrt()))


def update_inner(g_A: torch.Tensor, g_B: torch.Tensor, target: ProjectionTarget) -> torch.Tensor:
    """⟨D, V⟩ per sample: (n,)."""
    return torch.einsum("nri,ri->n", g_A, target.right_A.to(g_A.dtype)) + torch.einsum(
        "nor,or->n", g_B, target.right_B.to(g_B.dtype)
    )


def update_norm_sq(g_A: torch.Tensor, g_B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> torch.Tensor:
    """‖D‖² = ‖B0 g_A + g_B A0‖² per sample, in r × r algebra: (n,)."""
    A0, B0 = A0.to(g_A.dtype), B0.to(g_A.dtype)
    gram_B0 = B0.T @ B0  # (r, r)
    gram_A0 = A0 @ A0.T  # (r, r)
    gA_gram = g_A @ g_A.transpose(1, 2)  # (n, r, r)
    gB_gram = g_B.transpose(1, 2) @ g_B  # (n, r, r)
    cross = (B0.T @ g_B) @ (A0 @ g_A.transpose(1, 2))  # (n, r, r): (B0ᵀ g_B)(A0 g_Aᵀ)
    norm_sq = (
        torch.einsum("rs,nrs->n", gram_B0, gA_gram)
        + torch.einsum("rs,nrs->n", gram_A0, gB_gram)
        + 2.0 * cross.diagonal(dim1=1, dim2=2).sum(-1)
    )
    return norm_sq.clamp_min(0.0)  # rounding can push an exact zero slightly negative


@dataclass
class ModuleProjections:
    """Per-sample results for one module at one init state: ⟨D, V_k⟩ for each target k, and ‖D‖²."""

    inner: dict[str, torch.Tensor]  # target name -> (n,)
    d_norm_sq: torch.Tensor  # (n,)


def project_module(
    x: torch.Tensor,
    a: torch.Tensor,
    gu: torch.Tensor,
    A0: torch.Tensor,
    B0: torch.Tensor,
    targets: dict[str, ProjectionTarget],
    token_mask: torch.Tensor | None = None,
) -> ModuleProjections:
    """Reduce one module's captured tensors to per-sample scalars (called from the backward hook)."""
    g_A, g_B = per_sample_lora_grads(x, a, gu, B0, token_mask)
    inner = {name: update_inner(g_A, g_B, target) for name, target in targets.items()}
    return ModuleProjections(inner=inner, d_norm_sq=update_norm_sq(g_A, g_B, A0, B0))


def project_module_stacked(
    x: torch.Tensor,
    a: torch.Tensor,
    gu: torch.Tensor,
    A0: torch.Tensor,
    B0: torch.Tensor,
    right_A: torch.Tensor,
    right_B: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``project_module`` on plain tensors, the K targets stacked (right_A (K, r, d_in), right_B (K, d_out, r)):
    ⟨D, V_k⟩ as (n, K) and ‖D‖² as (n,). The same functions, so the same algebra; tensors only and no Python
    containers out, which is what ``torch.compile`` traces into one graph (``scoring.compiled``)."""
    g_A, g_B = per_sample_lora_grads(x, a, gu, B0, token_mask)
    inner = torch.einsum("nri,kri->nk", g_A, right_A.to(g_A.dtype)) + torch.einsum(
        "nor,kor->nk", g_B, right_B.to(g_B.dtype)
    )
    return inner, update_norm_sq(g_A, g_B, A0, B0)


def normalised_projection(inner: torch.Tensor, d_norm_sq: torch.Tensor, v_norm: float) -> torch.Tensor:
    """⟨ΔW/‖ΔW‖, V̂⟩ = -⟨D,V⟩/(‖D‖‖V‖); 0 where ‖D‖ = 0 (counted by the caller as a zero-norm update)."""
    d_norm = d_norm_sq.sqrt()
    safe = torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm))
    return torch.where(d_norm > 0, -inner / (safe * v_norm), torch.zeros_like(inner))


def raw_projection(inner: torch.Tensor, scaling: float, v_norm: float) -> torch.Tensor:
    """⟨ΔW, V̂⟩ = -s·⟨D,V⟩/‖V‖ with η = 1 (the "w/o norm" ablation, paper App. H)."""
    return -scaling * inner / v_norm
