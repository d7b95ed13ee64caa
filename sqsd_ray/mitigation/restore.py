"""Post-fine-tune safety restoration: raise the harmful-completion loss where the task loss is flat.

The reading implemented here is the restoration notes' §1b (*inferred*: the paper's full text was not
available, see ``docs/restoration.md``). Symbols:

    θ        the trainable LoRA vector: every module m contributes A_m (r × d_in) and B_m (d_out × r),
             flattened in sorted module order, A before B (``LoraVector``); base weights stay frozen
    L_h(θ)   mean response NLL over D_h, harmful prompts paired with harmful completions
    L_t(θ)   mean response NLL over D_t, the retain (task) set            (both: mean over examples of the
                                                                            per-example token-mean NLL)
    J(θ)   = −min(L_h(θ), τ) + γ·L_t(θ) + (μ/2)‖θ − θ_ft‖²                 (notes §1b, step 2)
    θ_{k+1} = θ_k − η_k·(C + λI)⁻¹ ∇J(θ_k)                                 (step 1's influence step, iterated)

C is the curvature of the task loss, approximated by the ``preconditioner`` setting:

    lbfgs        L-BFGS two-loop recursion over pairs (s, y = ∇L_t(θ + s) − ∇L_t(θ)) of the task gradient:
                 a few finite-difference probes at θ_ft, then the accepted steps       (notes §1b)
    fisher_diag  diag(F), F = (1/n) Σ_i g_i g_iᵀ the empirical Fisher of L_t at θ_ft     (notes §5 (1))
    woodbury     F itself, inverted exactly through Woodbury with n per-sample gradients  (notes §5 (2))
    none         C + λI = I: first-order ascent (GradDiff with γ > 0), the same cap, proximal term, budget,
                 line search and iteration count: the first-order ablation of notes §2

The empirical Fisher stands in for the Hessian H_t (a Gauss-Newton-type approximation, positive semi-definite
where H_t need not be); the per-sample gradients g_i come from the repo's LoRA gradient kernel
(``hooks.LoraGradCapture`` + ``kernel.per_sample_lora_grads``): one padded batch, one backward.

Stopping and constraints (notes §1b): stop when L_h ≥ τ (τ = L_h(θ_base) + margin, or given; not with the
refusal-descent term β·L_r, whose part of J still descends there), after K iterations, or when no step along the
direction both decreases J (Armijo backtracking on the step length) and keeps the task-loss budget L_t ≤
L_t(θ_ft) + δ and the update cap ‖ΔW(θ) − ΔW(θ_ft)‖ ≤ ρ·‖ΔW_ft‖, where ΔW = Σ_m s_m B_m A_m are the merged dense
LoRA deltas, computed from the factors in 2r × 2r algebra. Trial points that break the budget or the cap are
never accepted, so every iterate is within budget; the run returns the safest of them (lowest −min(L_h, τ) +
β·L_r; ``return_iterate: last`` returns where it stopped). With ``at_update_cap: project`` a trial beyond the
cap is instead pulled back onto it along the ray from θ_ft (Armijo is then checked on the step actually taken),
so the cap constrains the search rather than ending it: later steps can still turn the update within the cap
toward a lower J.

The cap is a trust region, and the curvature step does not respect it by itself: (C + λI)⁻¹ lengthens the step
most along the task loss's flattest directions, so near the cap an undamped step spends the update budget where
it buys the least. Before a trial beyond the cap is shortened or pulled back, λ is raised (× cap_damping_growth,
Levenberg–Marquardt) and the same length retried, the trust-region step (C + νI)⁻¹∇J of a binding norm ball;
at λ → ∞ it is the first-order direction. Each iteration starts from λ / growth, back down to λ₀.

Full-weight fine-tunes: a fresh restoration LoRA is put on top (B = 0, A peft's Kaiming init). At B = 0,
∂L/∂A = Bᵀ(...) = 0, so the first step moves B only, and A starts to move from the second step on. The loop
needs no special case for it: every preconditioner maps a zero gradient block to a zero step block (the
damping keeps (C + λI) invertible there), and θ_ft's merged delta is exactly zero, so L_t(θ_ft) is the full
fine-tune's own task loss. The caller passes ‖ΔW_ft‖ (the dense W_ft − W_0 over the target modules).

The module is plain torch (no Ray): batches are collated dicts (``data.collate``), the model a peft model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError, help_field
from ..models.lora import FactorDict, lora_layers
from ..scoring.hooks import LoraGradCapture
from ..scoring.kernel import accumulation_dtype, per_sample_lora_grads
from ..scoring.scorer import per_sample_mean_nll
from ..scoring.summary import pearson, spearman

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # a collated batch: input_ids, attention_mask, labels (n, T)
Preconditioner = Literal["lbfgs", "fisher_diag", "woodbury", "none"]

ARMIJO_C1 = 1e-4  # sufficient-decrease constant of the backtracking line search
PAIR_EPS = 1e-10  # an L-BFGS pair needs sᵀy > PAIR_EPS·‖s‖‖y‖ (after damping) to be used


# --------------------------------------------------------------------------------------------- settings


@dataclass
class RestoreSettings:
    """The restoration loop (notes §1b; every value is a starting point: the paper's are unknown, notes §2)."""

    preconditioner: Preconditioner = help_field(
        "lbfgs", help="task curvature C in the step (C + λI)⁻¹∇J: lbfgs (two-loop over task-gradient pairs), "
        "fisher_diag (diagonal empirical Fisher), woodbury (exact damped empirical Fisher), none (first-order "
        "ablation: same objective, cap, budget and line search)"
    )
    max_iters: int = help_field(50, help="K, the maximum number of accepted steps (notes: 20-200)")
    harmful_cap: float | None = help_field(
        None, help="τ in nats; null = L_h at the base model (adapter disabled / before the full fine-tune) + cap_margin"
    )
    cap_margin: float = help_field(0.1, help="nats added to L_h(θ_base) to make τ when harmful_cap is null")
    gamma: float = help_field(1.0, help="γ, weight of the task loss in J (notes: 0.5-2; 0 = pure capped ascent)")
    refusal_weight: float = help_field(
        0.0, help="β, weight of a refusal-descent term β·L_r on D_r (harmful prompts answered with refusals; "
        "RestoreConfig.refusal_train). 0 = the notes' reading (ascent only); the variant is not established by the "
        "sources, but harmful-loss ascent alone need not bring refusals back"
    )
    mu: float = help_field(0.01, help="μ, proximal weight (μ/2)‖θ − θ_ft‖² against full reversion")
    task_budget: float = help_field(
        0.05, help="δ in nats: no iterate with L_t > L_t(θ_ft) + δ is accepted (notes: 0.02-0.05)"
    )
    max_update_ratio: float = help_field(
        0.2, help="ρ: no iterate with ‖ΔW(θ) − ΔW(θ_ft)‖ > ρ·‖ΔW_ft‖ is accepted (merged LoRA deltas s·B·A)"
    )
    at_update_cap: Literal["backtrack", "project"] = help_field(
        "project", help="a trial point beyond the update cap (after the damping raises): project = pull it back "
        "onto the cap along the ray from θ_ft, so the search goes on along the cap's surface (with β·L_r it keeps "
        "recovering refusals there); backtrack = shorten the step like any rejected trial (the cap then ends the run)"
    )
    cap_damping_growth: float = help_field(
        10.0, help="Levenberg–Marquardt at the update cap: a trial step beyond the cap multiplies λ by this and "
        "retries the same length along (C + λI)⁻¹∇J, until the step fits or the direction is ∇J's (λ ≥ 1e12·λ₀); "
        "at_update_cap then applies. Each step starts from λ / growth (≥ λ₀). The cap is a trust region: flat task "
        "directions are long, so an undamped curvature step spends the update budget where recovery is slow. "
        "1 = off (curvature preconditioners only)"
    )
    damping: float = help_field(
        0.1, help="λ; with damping_mode relative, a multiple of the mean curvature, i.e. of the mean diagonal of "
        "the task empirical Fisher at θ_ft (notes: 1e-3 ... 1e-1)"
    )
    damping_mode: Literal["relative", "absolute"] = help_field(
        "relative", help="relative: λ = damping × mean diag(F); absolute: λ = damping"
    )
    lbfgs_memory: int = help_field(10, help="M, the number of curvature pairs kept (notes: 10-20)")
    lbfgs_probes: int = help_field(
        4, help="finite-difference probe pairs at θ_ft before the first step (Krylov directions from ∇J); "
        "each costs one task-gradient pass"
    )
    probe_scale: float = help_field(1e-2, help="probe step ‖s‖ as a fraction of ‖θ_ft‖")
    woodbury_max_samples: int = help_field(
        256, help="n, the task samples whose per-sample gradients form G (n × P floats are kept)"
    )
    curvature_refresh: int = help_field(
        0, help="recompute the Fisher (fisher_diag, woodbury) every k accepted steps; 0 = once, at θ_ft"
    )
    initial_step: float = help_field(
        0.01, help="first trial step length as a fraction of ‖θ_ft‖; later steps start from twice the last "
        "accepted length"
    )
    max_backtracks: int = help_field(10, help="halvings of the step length before the line search gives up")
    return_iterate: Literal["safest", "last"] = help_field(
        "safest", help="which accepted iterate the run returns (every one is within the budget and the cap): "
        "safest = the lowest −min(L_h, τ) + β·L_r, the restoration's aim on its own sets (J also rewards lowering "
        "the task loss, which a run on the cap can trade safety for); last = where the run stopped"
    )
    micro_batch_size: int = help_field(8, help="samples per forward pass")
    track_refusal: bool = help_field(
        True, help="with a refusal (evaluation) set: its mean NLL at every accepted iterate, in the history "
        "(one forward pass over the set per step); it traces recovery against task-loss increase"
    )

    def __post_init__(self) -> None:
        positive = {"max_iters": self.max_iters, "lbfgs_memory": self.lbfgs_memory,
                    "woodbury_max_samples": self.woodbury_max_samples, "micro_batch_size": self.micro_batch_size,
                    "initial_step": self.initial_step, "probe_scale": self.probe_scale,
                    "max_update_ratio": self.max_update_ratio, "task_budget": self.task_budget}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"restore.{name} must be > 0, got {value}")
        if not self.cap_damping_growth >= 1:
            raise ConfigError(f"restore.cap_damping_growth must be >= 1 (1 = off), got {self.cap_damping_growth}")
        for name in ("gamma", "refusal_weight", "mu", "damping", "cap_margin", "lbfgs_probes", "curvature_refresh",
                     "max_backtracks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"restore.{name} must be >= 0, got {getattr(self, name)}")
        if self.preconditioner in ("fisher_diag", "woodbury") and self.damping == 0:
            raise ConfigError(f"restore.damping must be > 0 for preconditioner {self.preconditioner} (the empirical "
                              "Fisher is singular when P > n)")


# ------------------------------------------------------------------------------------ curvature algebra


def lbfgs_two_loop(
    grad: torch.Tensor,
    s_list: Sequence[torch.Tensor],
    y_list: Sequence[torch.Tensor],
    damping: float = 0.0,
    gamma: float | None = None,
) -> torch.Tensor:
    """≈ (H + λI)⁻¹ grad from curvature pairs y_i ≈ H s_i (Nocedal & Wright, Algorithm 7.4). Flat vectors.

    The damped pairs (s_i, y_i + λ s_i) describe H + λI. A pair with sᵀy ≤ PAIR_EPS·‖s‖‖y‖ after damping is
    *skipped* (not Powell-damped): it carries no positive curvature and would break positive definiteness.
    ``gamma`` scales the initial matrix H₀ = γI; default sᵀy / yᵀy of the newest kept pair (1/λ without
    pairs). Pairs are oldest first. With exact, (H + λI)-conjugate pairs spanning the space the result is
    exactly (H + λI)⁻¹ grad.
    """
    pairs = []
    for s, y in zip(s_list, y_list, strict=True):
        y = y + damping * s
        sy = torch.dot(s, y)
        if sy <= PAIR_EPS * s.norm() * y.norm():
            continue
        pairs.append((s, y, 1.0 / sy))
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(pairs):  # newest first
        alpha = rho * torch.dot(s, q)
        q -= alpha * y
        alphas.append(alpha)
    if gamma is None:
        if pairs:
            s, y, _ = pairs[-1]
            gamma = float(torch.dot(s, y) / torch.dot(y, y))
        else:
            gamma = 1.0 / damping if damping > 0 else 1.0
    r = gamma * q
    for (s, y, rho), alpha in zip(pairs, reversed(alphas)):  # oldest first
        beta = rho * torch.dot(y, r)
        r += (alpha - beta) * s
    return r


def woodbury_apply(G: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + λI)⁻¹ v for F = GᵀG/n, G (n × P) per-sample gradients, via (v − Gᵀ(nλI + GGᵀ)⁻¹Gv)/λ.

    Only an n × n system is solved (Cholesky, float64), so P may be millions. Needs λ > 0.
    """
    if damping <= 0:
        raise ValueError(f"woodbury_apply needs damping > 0, got {damping}")
    n = G.shape[0]
    gram = (G @ G.T).double() + n * damping * torch.eye(n, dtype=torch.float64, device=G.device)  # (n, n)
    Gv = (G @ v).double().unsqueeze(1)  # (n, 1)
    w = torch.cholesky_solve(Gv, torch.linalg.cholesky(gram)).squeeze(1).to(G.dtype)  # (nλI + GGᵀ)⁻¹Gv
    return (v - G.T @ w) / damping


# ------------------------------------------------------------------------------------------ θ as a vector


class LoraVector:
    """One adapter's LoRA factors as a flat vector θ: modules in sorted canonical order, A then B each."""

    def __init__(self, model: nn.Module, adapter_name: str = "default"):
        self.layers = lora_layers(model, adapter_name)
        self.names = sorted(self.layers)
        self.adapter_name = adapter_name
        self.params: list[nn.Parameter] = []
        for name in self.names:
            layer = self.layers[name]
            self.params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
        self.scalings = {name: float(self.layers[name].scaling[adapter_name]) for name in self.names}
        self.sizes = [p.numel() for p in self.params]
        self.dtype = accumulation_dtype(self.params[0].dtype)
        self.device = self.params[0].device

    @property
    def size(self) -> int:
        """P = Σ_m r(d_in + d_out)."""
        return sum(self.sizes)

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

    def set(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for param, chunk in zip(self.params, theta.split(self.sizes), strict=True):
                param.copy_(chunk.view_as(param))

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors (A_m, B_m, ... in order) -> one flat vector in θ's layout."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def factors(self, theta: torch.Tensor) -> FactorDict:
        chunks = [c.view_as(p) for c, p in zip(theta.split(self.sizes), self.params, strict=True)]
        return {name: (chunks[2 * i], chunks[2 * i + 1]) for i, name in enumerate(self.names)}

    def merged_delta_norm(self, theta: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """‖ΔW(θ) − ΔW(reference)‖ over all modules (one Frobenius norm: the root of the summed squares).

        Per module, s(B A − B' A') = s·[B, −B'] [A; A'] has rank ≤ 2r, and ‖P Q‖² = ⟨PᵀP, QQᵀ⟩ is a
        2r × 2r contraction: no d_out × d_in matrix is formed. ``reference`` None = zero delta.
        """
        mine = self.factors(theta.to(torch.float64))
        other = self.factors(reference.to(torch.float64)) if reference is not None else None
        total = 0.0
        for name, (A, B) in mine.items():
            if other is not None:
                A_ref, B_ref = other[name]
                B, A = torch.cat([B, -B_ref], dim=1), torch.cat([A, A_ref], dim=0)  # (d_out, 2r), (2r, d_in)
            total += self.scalings[name] ** 2 * float(torch.sum((B.T @ B) * (A @ A.T)))
        return math.sqrt(max(total, 0.0))


@contextlib.contextmanager
def _trainable_only(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only (base weights frozen for the duration), flags restored on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


# ------------------------------------------------------------------------------------------------ losses


def _to(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)


def _batch_losses(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Per-sample token-mean response NLL (n,) of one padded batch."""
    input_ids, attention_mask, labels = _to(batch, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return per_sample_mean_nll(logits, labels)[0]


def _n_samples(batches: Sequence[Batch]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


@torch.no_grad()
def per_example_losses(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Per-example token-mean response NLL over every batch, in order (N,), on the CPU in float64."""
    device = next(model.parameters()).device
    return torch.cat([_batch_losses(model, b, device).double().cpu() for b in batches])


def _per_example_mean_nll(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean over examples of each example's token-mean response NLL: this module's set loss (L_h, L_t, L_r and the
    refusal measure), not the token mean of ``training.objectives.token_mean_nll``."""
    return float(per_example_losses(model, batches).mean())


def per_example_mean_loss_and_grad(model: nn.Module, batches: Sequence[Batch],
                                   vec: LoraVector) -> tuple[float, torch.Tensor]:
    """L = mean over examples of the per-example NLL, and ∇_θ L (flat, θ's layout); one backward per batch."""
    n_total = _n_samples(batches)
    loss_sum, grad = 0.0, torch.zeros(vec.size, dtype=vec.dtype, device=vec.device)
    with _trainable_only(model, vec.params):
        for batch in batches:
            losses = _batch_losses(model, batch, vec.device)
            grads = torch.autograd.grad(losses.sum() / n_total, vec.params)
            grad += vec.flatten(grads)
            loss_sum += float(losses.detach().double().sum())
    return loss_sum / n_total, grad


def _capture_per_sample_grads(
    model: nn.Module, batch: Batch, vec: LoraVector, reduce: Callable[[str, torch.Tensor, torch.Tensor], None]
) -> None:
    """Per-sample ∂ℓ_i/∂A_m, ∂ℓ_i/∂B_m of one padded batch from one backward of Σ_i ℓ_i (the SQSD kernel).

    ``reduce(name, g_A (n, r, d_in), g_B (n, d_out, r))`` is called per module inside the backward pass, so
    per-sample gradients never outlive their module's backward (STYLE 3).
    """
    input_ids, attention_mask, labels = _to(batch, vec.device)
    token_mask = attention_mask.bool()

    def on_grad(name: str, x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> None:
        B = vec.layers[name].lora_B[vec.adapter_name].weight.detach()
        g_A, g_B = per_sample_lora_grads(x, a, gu, B, token_mask)
        reduce(name, g_A, g_B)

    with LoraGradCapture(model, vec.adapter_name, on_grad, layers=vec.layers):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_sample_mean_nll(logits, labels)[0].sum().backward()


def diagonal_fisher(model: nn.Module, batches: Sequence[Batch], adapter_name: str = "default") -> torch.Tensor:
    """diag(F) = (1/N) Σ_i g_i ⊙ g_i over the adapter's LoRA parameters, θ's flat layout (P,).

    g_i = ∇_θ ℓ_i, ℓ_i the token-mean response NLL of example i; per batch one forward and one backward
    through the per-sample LoRA gradient kernel, each module reduced to its squared sum at once.
    """
    vec = LoraVector(model, adapter_name)
    sums: dict[str, list[torch.Tensor]] = {}

    def reduce(name: str, g_A: torch.Tensor, g_B: torch.Tensor) -> None:
        squares = [g_A.square().sum(0), g_B.square().sum(0)]  # (r, d_in), (d_out, r)
        sums[name] = squares if name not in sums else [s + q for s, q in zip(sums[name], squares)]

    for batch in batches:
        _capture_per_sample_grads(model, batch, vec, reduce)
    n_total = _n_samples(batches)
    return vec.flatten([t for name in vec.names for t in sums[name]]) / n_total


def per_sample_grad_matrix(model: nn.Module, batches: Sequence[Batch], adapter_name: str = "default") -> torch.Tensor:
    """G (N × P): row i is ∇_θ ℓ_i in θ's flat layout, from the per-sample LoRA gradient kernel."""
    vec = LoraVector(model, adapter_name)
    rows = []
    for batch in batches:
        blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def reduce(name: str, g_A: torch.Tensor, g_B: torch.Tensor) -> None:
            blocks[name] = (g_A.flatten(1), g_B.flatten(1))  # (n, r·d_in), (n, d_out·r)

        _capture_per_sample_grads(model, batch, vec, reduce)
        rows.append(torch.cat([t.to(vec.dtype) for name in vec.names for t in blocks[name]], dim=1))
    return torch.cat(rows)


# -------------------------------------------------------------------------------------- preconditioners


class _Identity:
    """No curvature (the first-order ablation). ``damping_scale`` multiplies λ in the curvature preconditioners:
    the update cap's Levenberg–Marquardt rule raises it (``RestoreSettings.cap_damping_growth``)."""

    damping_scale = 1.0

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        pass


class _DiagonalFisher(_Identity):
    def __init__(self, diag: torch.Tensor, damping: float):
        self.diag, self.damping = diag, damping

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return v / (self.diag + self.damping * self.damping_scale)


class _WoodburyFisher(_Identity):
    def __init__(self, G: torch.Tensor, damping: float):
        self.G, self.damping = G, damping

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return woodbury_apply(self.G, v, self.damping * self.damping_scale)


class _Lbfgs(_Identity):
    def __init__(self, memory: int, damping: float):
        self.s: deque[torch.Tensor] = deque(maxlen=memory)
        self.y: deque[torch.Tensor] = deque(maxlen=memory)
        self.damping = damping
        self.skipped = 0

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return lbfgs_two_loop(v, list(self.s), list(self.y), self.damping * self.damping_scale)

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        y_damped = y + self.damping * s
        if torch.dot(s, y_damped) <= PAIR_EPS * s.norm() * y_damped.norm():
            self.skipped += 1  # no positive curvature along s: the pair is skipped (see lbfgs_two_loop)
            return
        self.s.append(s)
        self.y.append(y)


# ------------------------------------------------------------------------------------------ diagnostic


def harmful_loss_correlation(base_losses: torch.Tensor, ft_losses: torch.Tensor) -> dict[str, float]:
    """Notes §1b diagnostic: per-example L_h at θ_base vs θ_ft, Pearson and Spearman correlation.

    High correlation (fine-tuning kept the *shape* of the harmful loss landscape) is the method's premise. Both are
    scipy's, over the examples whose two losses are finite; NaN when fewer than three remain or one side is constant
    (``scoring.summary.spearman``). ``n`` counts every example.
    """
    if base_losses.shape != ft_losses.shape:
        raise ValueError(f"per-example losses differ in shape: {tuple(base_losses.shape)} vs {tuple(ft_losses.shape)}")
    base, ft = base_losses.detach().double().cpu().numpy(), ft_losses.detach().double().cpu().numpy()
    return {"pearson": pearson(base, ft), "spearman": spearman(base, ft), "n": int(base_losses.numel())}


def pull_back_to_cap(vec: LoraVector, theta_ft: torch.Tensor, candidate: torch.Tensor, cap: float,
                     iters: int = 40) -> tuple[torch.Tensor, float]:
    """The point θ_ft + s·(candidate − θ_ft), s ∈ [0, 1], farthest out with ‖ΔW − ΔW_ft‖ ≤ cap (bisection on s).

    The merged delta is quadratic in s (B and A both move), so s is bisected, keeping the inside end; each
    evaluation is 2r × 2r algebra per module. Returns the point and its merged-delta distance.
    """
    inside, outside = 0.0, 1.0
    for _ in range(iters):
        middle = 0.5 * (inside + outside)
        if vec.merged_delta_norm(theta_ft + middle * (candidate - theta_ft), theta_ft) <= cap:
            inside = middle
        else:
            outside = middle
    point = theta_ft + inside * (candidate - theta_ft)
    return point, vec.merged_delta_norm(point, theta_ft)


def recovery_path(history: Sequence[dict[str, float]], base_refusal: float) -> list[tuple[float, float]]:
    """(task-loss increase, share of the refusal-NLL rise undone) at every iterate of a tracked history.

    history[0] is θ_ft: increase 0, recovery 0. Recovery = (L_r(θ_ft) − L_r(θ_k)) / (L_r(θ_ft) − L_r(θ_base)).
    """
    if not history or "refusal" not in history[0]:
        raise ValueError("the history has no refusal losses: restore with a refusal set and track_refusal on")
    task_ft, refusal_ft = history[0]["task"], history[0]["refusal"]
    rise = refusal_ft - base_refusal
    if not rise > 0:
        raise ValueError(f"the fine-tune did not raise the refusal loss (θ_ft {refusal_ft:.4f}, θ_base "
                         f"{base_refusal:.4f}): nothing to recover")
    return [(h["task"] - task_ft, (refusal_ft - h["refusal"]) / rise) for h in history]


def recovery_within(path: Sequence[tuple[float, float]], task_increase: float) -> float:
    """The best recovery among iterates whose task-loss increase is ≤ ``task_increase``: where one would stop
    the run given that budget (θ_ft itself, recovery 0, always qualifies when task_increase ≥ 0)."""
    eligible = [recovery for increase, recovery in path if increase <= task_increase + 1e-12]
    return max(eligible) if eligible else float("nan")


def compare_at_equal_task_increase(paths: dict[str, Sequence[tuple[float, float]]]) -> dict[str, float]:
    """Recovery of each run at the same task-loss increase: the largest increase every run reached (≥ 0).

    Restorations stop where their own line search does, so their end points spend different task loss; the
    ablation's question (curvature-aware vs first-order) is which recovers more for the same spend.
    """
    matched = max(0.0, min(max(increase for increase, _ in path) for path in paths.values()))
    return {"task_increase": matched, **{name: recovery_within(path, matched) for name, path in paths.items()}}


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class BaseLosses:
    """Losses at θ_base (before the fine-tune): per-example harmful NLL, mean task and refusal NLL."""

    harmful: torch.Tensor  # (N_h,)
    task: float
    refusal: float | None = None


@dataclass
class RestoreResult:
    """What ``restore`` did. Losses are keyed harmful / task / refusal, then base / fine_tuned / restored."""

    factors: FactorDict  # the restored adapter, canonical module name -> (A, B), on the CPU
    losses: dict[str, dict[str, float]]
    tau: float  # the harmful-loss cap
    task_limit: float  # L_t(θ_ft) + δ
    update_norm: float  # ‖ΔW(θ_rest) − ΔW(θ_ft)‖, merged LoRA deltas
    ft_update_norm: float  # ‖ΔW_ft‖ = ‖θ_ft − θ_0‖ in merged-delta space
    ratio: float  # update_norm / ft_update_norm
    theta_distance: float  # ‖θ_rest − θ_ft‖ in the flat LoRA parameters
    iterations: int
    stop_reason: str  # harmful_cap | task_budget | update_cap | no_progress | max_iters
    preconditioner: str
    damping: float  # the absolute λ used (before the update cap's Levenberg–Marquardt raises)
    diagnostic: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    sequence_passes: int = 0  # forward-backward passes of one sequence (notes §4's unit of cost)
    seconds: float = 0.0
    damping_raises: int = 0  # λ × cap_damping_growth raises at the update cap
    returned_iter: int = 0  # the iterate returned (history[returned_iter]; RestoreSettings.return_iterate)

    def summary(self) -> dict[str, Any]:
        """Everything but the factors, as plain data."""
        return {k: v for k, v in self.__dict__.items() if k != "factors"}


def base_losses_with_adapter_disabled(
    model: nn.Module, harmful: Sequence[Batch], task: Sequence[Batch], refusal: Sequence[Batch] | None = None
) -> BaseLosses:
    """θ_base losses of a LoRA fine-tune: the same peft model with its adapters switched off."""
    with model.disable_adapter():
        return BaseLosses(harmful=per_example_losses(model, harmful), task=_per_example_mean_nll(model, task),
                          refusal=_per_example_mean_nll(model, refusal) if refusal else None)


@dataclass
class _Iterate:
    """One point of the loop (notes §1b): θ with L_h, L_t, L_r and their gradients, J(θ), and the merged-delta
    distance ‖ΔW(θ) − ΔW(θ_ft)‖ that the update cap bounds. Each accepted step hands one to the next."""

    theta: torch.Tensor
    L_h: float
    g_h: torch.Tensor
    L_t: float
    g_t: torch.Tensor
    L_r: float  # 0 without the refusal-descent term
    g_r: torch.Tensor | None  # None without the refusal-descent term
    J: float
    update_norm: float = 0.0


@dataclass
class _Constraints:
    """The set every accepted iterate stays in (notes §1b): the task budget L_t ≤ L_t(θ_ft) + δ and the update cap
    ‖ΔW(θ) − ΔW(θ_ft)‖ ≤ ρ·‖ΔW_ft‖ on the merged LoRA deltas (``LoraVector.merged_delta_norm``)."""

    vec: LoraVector
    theta_ft: torch.Tensor
    task_limit: float  # L_t(θ_ft) + δ
    ft_update_norm: float  # ‖ΔW_ft‖
    cap: float  # ρ·‖ΔW_ft‖

    def update_norm(self, theta: torch.Tensor) -> float:
        """‖ΔW(θ) − ΔW(θ_ft)‖."""
        return self.vec.merged_delta_norm(theta, self.theta_ft)


class _Objective:
    """L_h, L_t, their gradients and J at the current θ of ``vec``, counting sequence passes."""

    def __init__(self, model, vec: LoraVector, harmful, task, settings: RestoreSettings, tau: float,
                 theta_ft: torch.Tensor, refusal_train=None):
        self.model, self.vec, self.harmful, self.task = model, vec, harmful, task
        self.settings, self.tau, self.theta_ft = settings, tau, theta_ft
        self.refusal_train = refusal_train if settings.refusal_weight > 0 else None
        self.passes = 0

    def task_point(self) -> tuple[float, torch.Tensor]:
        self.passes += _n_samples(self.task)
        return per_example_mean_loss_and_grad(self.model, self.task, self.vec)

    def harmful_point(self) -> tuple[float, torch.Tensor]:
        self.passes += _n_samples(self.harmful)
        return per_example_mean_loss_and_grad(self.model, self.harmful, self.vec)

    def refusal_point(self) -> tuple[float, torch.Tensor | None]:
        """L_r and its gradient on D_r (0, None without the refusal-descent term)."""
        if self.refusal_train is None:
            return 0.0, None
        self.passes += _n_samples(self.refusal_train)
        return per_example_mean_loss_and_grad(self.model, self.refusal_train, self.vec)

    def iterate_at(self, theta: torch.Tensor, L_t: float, g_t: torch.Tensor, update_norm: float = 0.0) -> _Iterate:
        """The iterate at θ (``vec`` already set to it) whose task loss is known: adds L_h, L_r and J.

        The task term comes first so that a trial over the task budget costs no harmful pass.
        """
        L_h, g_h = self.harmful_point()
        L_r, g_r = self.refusal_point()
        return _Iterate(theta, L_h, g_h, L_t, g_t, L_r, g_r, self.value(theta, L_h, L_t, L_r), update_norm)

    def value(self, theta: torch.Tensor, L_h: float, L_t: float, L_r: float = 0.0) -> float:
        """J = −min(L_h, τ) + β L_r + γ L_t + (μ/2)‖θ − θ_ft‖² (β = 0: no refusal term)."""
        proximal = 0.5 * self.settings.mu * float((theta - self.theta_ft).square().sum())
        return self.safety(L_h, L_r) + self.settings.gamma * L_t + proximal

    def safety(self, L_h: float, L_r: float = 0.0) -> float:
        """−min(L_h, τ) + β L_r: J without its task and proximal terms, what the restoration is for."""
        return -min(L_h, self.tau) + self.settings.refusal_weight * L_r

    def gradient(self, theta: torch.Tensor, L_h: float, g_h: torch.Tensor, g_t: torch.Tensor,
                 g_r: torch.Tensor | None = None) -> torch.Tensor:
        """∇J; the harmful term is flat (zero) once L_h ≥ τ."""
        grad = self.settings.gamma * g_t + self.settings.mu * (theta - self.theta_ft)
        if g_r is not None:
            grad = grad + self.settings.refusal_weight * g_r
        return grad - g_h if L_h < self.tau else grad

    def gradient_at(self, point: _Iterate) -> torch.Tensor:
        """∇J at an iterate."""
        return self.gradient(point.theta, point.L_h, point.g_h, point.g_t, point.g_r)


def restore(
    model: nn.Module,
    harmful: Sequence[Batch],
    task: Sequence[Batch],
    settings: RestoreSettings,
    *,
    adapter_name: str = "default",
    refusal: Sequence[Batch] | None = None,
    base: BaseLosses | None = None,
    ft_update_norm: float | None = None,
    refusal_train: Sequence[Batch] | None = None,
) -> RestoreResult:
    """Restore safety in place: the adapter ``adapter_name`` of peft ``model`` goes from θ_ft to θ_rest.

    ``harmful`` / ``task`` / ``refusal`` are fixed lists of collated batches (the whole D_h and a fixed task
    subset, notes §5). ``base``: losses at θ_base; default: the same model with its adapters disabled (a LoRA
    fine-tune). ``ft_update_norm``: ‖ΔW_ft‖; default: the adapter's own merged delta at θ_ft (a LoRA
    fine-tune); a fresh restoration LoRA on a full fine-tune must pass it (its own delta is zero).
    ``refusal_train``: D_r for the refusal-descent variant (``settings.refusal_weight`` > 0).
    """
    if settings.refusal_weight > 0 and not refusal_train:
        raise ValueError("restore.refusal_weight > 0 needs refusal_train batches (D_r: harmful prompts answered with "
                         "refusals)")
    start = time.perf_counter()
    model.eval()  # LoRA dropout off: every loss is deterministic
    vec = LoraVector(model, adapter_name)
    theta_ft = vec.get()
    base, ft_update_norm, diagnostic = _reference_losses(model, vec, theta_ft, harmful, task, refusal, base,
                                                         ft_update_norm)
    tau = settings.harmful_cap if settings.harmful_cap is not None else float(base.harmful.mean()) + settings.cap_margin
    objective = _Objective(model, vec, harmful, task, settings, tau, theta_ft, refusal_train)

    L_t_ft, g_t_ft = objective.task_point()
    ft = objective.iterate_at(theta_ft.clone(), L_t_ft, g_t_ft)
    bounds = _Constraints(vec, theta_ft, task_limit=ft.L_t + settings.task_budget, ft_update_norm=ft_update_norm,
                          cap=settings.max_update_ratio * ft_update_norm)
    damping, preconditioner = _build_preconditioner(model, task, vec, settings, objective)
    log.info("restore: P = %d LoRA parameters, preconditioner %s, λ = %.3g; L_h %.4f (base %.4f, τ %.4f), "
             "L_t %.4f (limit %.4f); base/ft harmful-loss correlation: Pearson %.3f, Spearman %.3f",
             vec.size, settings.preconditioner, damping, ft.L_h, float(base.harmful.mean()), tau, ft.L_t,
             bounds.task_limit, diagnostic["pearson"], diagnostic["spearman"])
    ft_refusal = _per_example_mean_nll(model, refusal) if refusal else None
    tracked = refusal if refusal and settings.track_refusal else None
    history = [{"iter": 0, "harmful": ft.L_h, "task": ft.L_t, "objective": ft.J, "step": 0.0, "trials": 0,
                "update_norm": 0.0, "ratio": 0.0, **({"refusal": ft_refusal} if tracked else {})}]

    run = _descend(objective, bounds, damping, preconditioner, ft, history, tracked)

    returned_iter, theta, L_h, L_t = run.returned(settings.return_iterate, history)
    vec.set(theta)
    update_norm = bounds.update_norm(theta)
    losses = _loss_table(model, base, ft, L_h, L_t, refusal, ft_refusal)
    log.info("restore: stopped after %d iterations (%s), returning iterate %d; L_h %.4f -> %.4f, L_t %.4f -> %.4f, "
             "ratio %.4f", run.iterations, run.stop_reason, returned_iter, ft.L_h, L_h, ft.L_t, L_t,
             update_norm / ft_update_norm)
    param_dtype = vec.params[0].dtype
    return RestoreResult(
        factors={name: (A.to(param_dtype).cpu().clone(), B.to(param_dtype).cpu().clone())
                 for name, (A, B) in vec.factors(theta).items()},
        losses=losses, tau=tau, task_limit=bounds.task_limit, update_norm=update_norm, ft_update_norm=ft_update_norm,
        ratio=update_norm / ft_update_norm, theta_distance=float((theta - theta_ft).norm()), iterations=run.iterations,
        stop_reason=run.stop_reason, preconditioner=settings.preconditioner, damping=run.damping,
        diagnostic=diagnostic, history=history, sequence_passes=objective.passes,
        seconds=time.perf_counter() - start, damping_raises=run.damping_raises, returned_iter=returned_iter,
    )


def _reference_losses(model: nn.Module, vec: LoraVector, theta_ft: torch.Tensor, harmful: Sequence[Batch],
                      task: Sequence[Batch], refusal: Sequence[Batch] | None, base: BaseLosses | None,
                      ft_update_norm: float | None) -> tuple[BaseLosses, float, dict[str, float]]:
    """What the run is measured against: the θ_base losses, ‖ΔW_ft‖ (the update cap's unit) and the notes §1b
    diagnostic, the base/ft per-example harmful-loss correlation (defaults as in ``restore``)."""
    if base is None:
        base = base_losses_with_adapter_disabled(model, harmful, task, refusal)
    if ft_update_norm is None:
        ft_update_norm = vec.merged_delta_norm(theta_ft)
    if not ft_update_norm > 0:
        raise ValueError("‖ΔW_ft‖ is zero: the adapter is untrained; for a full fine-tune pass ft_update_norm "
                         "(the dense W_ft − W_0 over the target modules)")
    return base, ft_update_norm, harmful_loss_correlation(base.harmful, per_example_losses(model, harmful))


def _loss_table(model: nn.Module, base: BaseLosses, ft: _Iterate, L_h: float, L_t: float,
                refusal: Sequence[Batch] | None, ft_refusal: float | None) -> dict[str, dict[str, float]]:
    """RestoreResult.losses: harmful / task (/ refusal) at θ_base, θ_ft and the returned iterate, which ``model``
    holds (its refusal loss is measured here)."""
    losses = {"harmful": {"base": float(base.harmful.mean()), "fine_tuned": ft.L_h, "restored": L_h},
              "task": {"base": base.task, "fine_tuned": ft.L_t, "restored": L_t}}
    if refusal:
        restored_refusal = _per_example_mean_nll(model, refusal)
        losses["refusal"] = {"base": base.refusal if base.refusal is not None else float("nan"),
                             "fine_tuned": ft_refusal, "restored": restored_refusal}
    return losses


@dataclass
class _DescentResult:
    """Where the loop ended: why, after how many accepted steps, its last and its safest iterate (lowest
    −min(L_h, τ) + β·L_r, ``RestoreSettings.return_iterate``), the last λ built and the raises at the cap."""

    stop_reason: str
    iterations: int
    last: _Iterate
    safest_iter: int
    safest_theta: torch.Tensor
    damping: float
    damping_raises: int

    def returned(self, return_iterate: str, history: list[dict[str, float]]) -> tuple[int, torch.Tensor, float, float]:
        """(iteration, θ, L_h, L_t) of the iterate the run returns."""
        if return_iterate == "safest":
            row = history[self.safest_iter]
            return self.safest_iter, self.safest_theta, row["harmful"], row["task"]
        return self.iterations, self.last.theta, self.last.L_h, self.last.L_t


def _descend(objective: _Objective, bounds: _Constraints, damping: float, preconditioner: _Identity,
             current: _Iterate, history: list[dict[str, float]], tracked: Sequence[Batch] | None) -> _DescentResult:
    """θ_{k+1} = θ_k + t_k·u_k, u_k = −(C + λI)⁻¹∇J(θ_k) / ‖·‖, from θ_ft until a stop of notes §1b: L_h ≥ τ
    (ascent-only J), no descent direction, no accepted trial length (``_LineSearch``), or K steps.

    Appends each accepted iterate to ``history`` (with the ``tracked`` set's refusal NLL); leaves the model at the
    last accepted iterate.
    """
    settings, tau = objective.settings, objective.tau
    if settings.preconditioner == "lbfgs" and settings.lbfgs_probes and current.L_h < tau:
        _probe_pairs(objective, preconditioner, current.theta, current.g_t, objective.gradient_at(current), settings)
    step_length = settings.initial_step * float(bounds.theta_ft.norm())
    stop_reason, damping_raises = "max_iters", 0
    safest = (objective.safety(current.L_h, current.L_r), 0, current.theta)  # (safety, iteration, θ)
    # The notes stop at L_h ≥ τ: there the ascent-only J has nothing left to do. With the refusal term J keeps a
    # descent direction past the cap (−min(L_h, τ) is flat, β·L_r is not), so the run goes on to the other stops
    stop_at_harmful_cap = objective.refusal_train is None
    for iteration in range(1, settings.max_iters + 1):
        if current.L_h >= tau and stop_at_harmful_cap:
            stop_reason = "harmful_cap"
            break
        if _curvature_refresh_due(settings, iteration):
            damping, preconditioner = _build_preconditioner(objective.model, objective.task, bounds.vec, settings,
                                                            objective)
        grad_J = objective.gradient_at(current)
        # each iteration starts from λ / growth (not below λ₀): away from the cap the step is the curvature step again
        preconditioner.damping_scale = max(1.0, preconditioner.damping_scale / settings.cap_damping_growth)
        unit = _descent_unit(preconditioner, grad_J)
        if unit is None:
            stop_reason = "no_progress"
            break
        search = _LineSearch(objective, bounds, preconditioner, current, grad_J, unit)
        step = search.run(step_length)
        damping_raises += search.damping_raises
        if step is None:
            bounds.vec.set(current.theta)  # the last iterate within budget and cap
            stop_reason = search.stop_reason()
            break
        preconditioner.update(step.iterate.theta - current.theta, step.iterate.g_t - current.g_t)
        current = step.iterate
        safety = objective.safety(current.L_h, current.L_r)
        if safety < safest[0]:
            safest = (safety, iteration, current.theta)
        step_length = step.length * 2.0 if step.trials == 1 else step.length  # grow after a first-trial accept
        ratio = current.update_norm / bounds.ft_update_norm
        history.append({"iter": iteration, "harmful": current.L_h, "task": current.L_t, "objective": current.J,
                        "step": step.length, "trials": step.trials, "update_norm": current.update_norm,
                        "ratio": ratio, "damping_scale": preconditioner.damping_scale,
                        **({"refusal": _per_example_mean_nll(objective.model, tracked)} if tracked else {})})
        log.info("restore iter %d/%d: L_h %.4f (τ %.4f)  L_t %.4f (limit %.4f)  J %.4f  step %.3g (%d trials)  "
                 "‖ΔW − ΔW_ft‖/‖ΔW_ft‖ %.4f (ρ %.3g)", iteration, settings.max_iters, current.L_h, tau, current.L_t,
                 bounds.task_limit, current.J, step.length, step.trials, ratio, settings.max_update_ratio)
    else:
        if current.L_h >= tau and stop_at_harmful_cap:
            stop_reason = "harmful_cap"
    return _DescentResult(stop_reason, iterations=len(history) - 1, last=current, safest_iter=safest[1],
                          safest_theta=safest[2], damping=damping, damping_raises=damping_raises)


def _curvature_refresh_due(settings: RestoreSettings, iteration: int) -> bool:
    """Whether this iteration rebuilds the task Fisher (fisher_diag, woodbury): after every ``curvature_refresh``
    accepted steps (``RestoreSettings.curvature_refresh``; L-BFGS gains a pair with every accepted step instead)."""
    return bool(settings.curvature_refresh and iteration > 1 and (iteration - 1) % settings.curvature_refresh == 0
                and settings.preconditioner in ("fisher_diag", "woodbury"))


@dataclass
class _Step:
    """An accepted line-search trial: the new iterate, its step length t and the number of trials it took."""

    iterate: _Iterate
    length: float
    trials: int


class _LineSearch:
    """One iteration's backtracking on the step length t along ``unit`` (notes §1b; docs/restoration.md, "Step
    length" and "At the update cap: a trust region").

    A trial θ + t·unit is accepted when it is within the update cap ρ·‖ΔW_ft‖ (after Levenberg–Marquardt raises of
    λ and, with ``at_update_cap: project``, a pull-back onto the cap), within the task budget L_t(θ_ft) + δ, and
    lowers J by Armijo's rule. ``unit`` follows the raises, ``damping_raises`` counts them, ``blocked`` keeps why
    trials were rejected.
    """

    def __init__(self, objective: _Objective, bounds: _Constraints, preconditioner: _Identity, current: _Iterate,
                 grad_J: torch.Tensor, unit: torch.Tensor):
        self.objective, self.bounds, self.preconditioner = objective, bounds, preconditioner
        self.settings = objective.settings
        self.current, self.grad_J, self.unit = current, grad_J, unit
        self.blocked: list[str] = []
        self.damping_raises = 0

    def run(self, step_length: float) -> _Step | None:
        """Halve t from ``step_length`` (up to ``max_backtracks`` times) until a trial is accepted; None if none is."""
        for trial in range(self.settings.max_backtracks + 1):
            t = step_length * 0.5**trial
            fitted = self._within_cap(t)
            if fitted is None:
                continue
            accepted = self._accept(*fitted)
            if accepted is not None:
                return _Step(accepted, t, trial + 1)
        return None

    def stop_reason(self) -> str:
        """Why no trial was accepted: task_budget before update_cap before no_progress (Armijo)."""
        return next((r for r in ("task_budget", "update_cap") if r in self.blocked), "no_progress")

    def _within_cap(self, t: float) -> tuple[torch.Tensor, float] | None:
        """The trial point θ + t·unit within the update cap and its ‖ΔW − ΔW_ft‖; None when the trial is dropped
        (``at_update_cap: backtrack``, or θ on the cap with the step pointing straight out of it)."""
        theta, bounds = self.current.theta, self.bounds
        candidate = theta + t * self.unit
        update_norm = bounds.update_norm(candidate)
        if update_norm > bounds.cap:
            self.blocked.append("update_cap")
        # Levenberg–Marquardt with the cap as the trust region: the quadratic model's minimiser within a norm ball
        # is (C + νI)⁻¹∇J with ν growing as the ball binds; raise λ and retry this length
        while update_norm > bounds.cap and (raised := _raise_damping(self.preconditioner, self.grad_J, self.unit,
                                                                     self.settings.cap_damping_growth)) is not None:
            self.unit, self.damping_raises = raised, self.damping_raises + 1
            candidate = theta + t * self.unit
            update_norm = bounds.update_norm(candidate)
        if not update_norm > bounds.cap:
            return candidate, update_norm
        if self.settings.at_update_cap == "backtrack":
            return None
        candidate, update_norm = pull_back_to_cap(bounds.vec, bounds.theta_ft, candidate, bounds.cap)
        if not float((candidate - theta).norm()) > 1e-12 * float(bounds.theta_ft.norm()):
            return None  # θ is on the cap and the step points straight out of it
        return candidate, update_norm

    def _accept(self, candidate: torch.Tensor, update_norm: float) -> _Iterate | None:
        """The iterate at ``candidate`` if it keeps the task budget and passes Armijo; else None, the reason in
        ``blocked``. Leaves the model at ``candidate``."""
        objective, current = self.objective, self.current
        objective.vec.set(candidate)
        L_t, g_t = objective.task_point()
        if L_t > self.bounds.task_limit:
            self.blocked.append("task_budget")
            return None
        trial = objective.iterate_at(candidate, L_t, g_t, update_norm)
        # Armijo on the step actually taken (t·slope when it was not pulled back); a pulled-back step that is
        # no descent direction must still lower J
        predicted = min(float(torch.dot(self.grad_J, candidate - current.theta)), 0.0)
        if not trial.J < current.J + ARMIJO_C1 * predicted or (predicted == 0.0 and not trial.J < current.J):
            self.blocked.append("no_progress")
            return None
        return trial


MAX_DAMPING_SCALE = 1e12  # λ·scale this far above λ: the step is the (scaled) gradient to float precision


def _descent_unit(preconditioner: _Identity, grad_J: torch.Tensor) -> torch.Tensor | None:
    """The unit step direction −P∇J, or None when it is zero or no descent direction for J."""
    direction = -preconditioner.apply(grad_J)
    direction_norm = float(direction.norm())
    if direction_norm == 0 or not float(torch.dot(grad_J, direction)) < 0:
        return None
    return direction / direction_norm


def _raise_damping(preconditioner: _Identity, grad_J: torch.Tensor, unit: torch.Tensor,
                   growth: float) -> torch.Tensor | None:
    """λ × growth and the new unit direction; None once raising changes nothing (first-order, growth 1, or
    the scale at MAX_DAMPING_SCALE, where (C + λI)⁻¹∇J ∝ ∇J)."""
    if growth <= 1 or type(preconditioner) is _Identity:
        return None
    while preconditioner.damping_scale < MAX_DAMPING_SCALE:
        preconditioner.damping_scale = min(preconditioner.damping_scale * growth, MAX_DAMPING_SCALE)
        raised = _descent_unit(preconditioner, grad_J)
        if raised is not None and float(torch.dot(raised, unit)) < 1 - 1e-9:
            return raised
    return None


def _build_preconditioner(model, task, vec: LoraVector, settings: RestoreSettings, objective: _Objective):
    """(absolute λ, preconditioner) at the current θ. λ relative = damping × mean diag(F) of the task Fisher."""
    kind = settings.preconditioner
    if kind == "none":
        return 0.0, _Identity()
    G = diag = None
    if kind == "woodbury":
        batches, n = [], 0
        for batch in task:  # the first woodbury_max_samples task samples
            if n >= settings.woodbury_max_samples:
                break
            take = min(int(batch["input_ids"].shape[0]), settings.woodbury_max_samples - n)
            batches.append({k: v[:take] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
            n += take
        G = per_sample_grad_matrix(model, batches, vec.adapter_name)  # (n, P)
        objective.passes += n
        mean_curvature = float(G.square().sum()) / (G.shape[0] * G.shape[1])
    elif kind == "fisher_diag" or settings.damping_mode == "relative":
        diag = diagonal_fisher(model, task, vec.adapter_name)
        objective.passes += _n_samples(task)
        mean_curvature = float(diag.mean())
    damping = settings.damping * mean_curvature if settings.damping_mode == "relative" else settings.damping
    if kind == "woodbury":
        return damping, _WoodburyFisher(G, damping)
    if kind == "fisher_diag":
        return damping, _DiagonalFisher(diag, damping)
    return damping, _Lbfgs(settings.lbfgs_memory, damping)


def _probe_pairs(objective: _Objective, lbfgs: _Lbfgs, theta: torch.Tensor, g_t: torch.Tensor,
                 first_direction: torch.Tensor, settings: RestoreSettings) -> None:
    """Curvature pairs at θ_ft before the first step: s_i = ε u_i, y_i = ∇L_t(θ + s_i) − ∇L_t(θ).

    u_1 is the unit ∇J; u_{i+1} is y_i orthonormalised against u_1..u_i (a Krylov sequence of H_t started at
    ∇J, so the pairs describe the curvature where the first steps go).
    """
    epsilon = settings.probe_scale * float(theta.norm())
    directions: list[torch.Tensor] = []
    u = first_direction
    for _ in range(min(settings.lbfgs_probes, settings.lbfgs_memory)):
        for previous in directions:
            u = u - torch.dot(u, previous) * previous
        if not float(u.norm()) > 0:
            break
        u = u / u.norm()
        directions.append(u)
        objective.vec.set(theta + epsilon * u)
        _, g_probe = objective.task_point()
        y = g_probe - g_t
        lbfgs.update(epsilon * u, y)
        u = y
    objective.vec.set(theta)


__all__ = [
    "BaseLosses",
    "LoraVector",
    "RestoreResult",
    "RestoreSettings",
    "base_losses_with_adapter_disabled",
    "diagonal_fisher",
    "harmful_loss_correlation",
    "lbfgs_two_loop",
    "per_example_losses",
    "per_example_mean_loss_and_grad",
    "per_sample_grad_matrix",
    "restore",
    "woodbury_apply",
]
