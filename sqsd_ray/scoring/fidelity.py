"""First-order fidelity check of paper Eq. 13 (derivation in App. C), in LoRA parameter space.

    η·[L(z, θ_ref) − L(z, θ_target)] ≈ (θ' − θ_ref)ᵀ (θ_target − θ_ref),   θ' = θ_ref − η ∇L(z, θ_ref)

so, with θ = (A, B) the LoRA factors and g = (g_A, g_B) the per-sample gradient from the scoring kernel,

    predicted  L_ref − L_target = −⟨g_A, A_t − A0⟩ − ⟨g_B, B_t − B0⟩.

θ_ref is the init state at which ``direction`` is projected, and θ_target = θ_ref + ε·Δ with Δ in factor space:

* towards θ_V = θ0 + V written as LoRA factors: Δ = (A_v − A0, (s_v/s)·B_v − B0), when θ_ref is elsewhere
  (e.g. a fine-tune checkpoint);
* further along V: Δ = (0, (s_v/s)·B_v), when θ_ref already lies on the linear path θ0 + α·V with A0 = A_v
  (then θ_target = θ0 + (α + ε)·V exactly).

For small ε predicted and actual loss changes should agree (correlation → 1 over samples, relative error → 0);
the ε at which they part shows how local the first-order picture behind SQSD is.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models.lora import lora_layers
from .kernel import ProjectionTarget
from .scorer import SqsdScorer, per_sample_mean_nll
from .summary import pearson


def _pad_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to rank r (exact: the extra rows of A and columns of B contribute nothing)."""
    if A.shape[0] > r:
        raise ValueError(f"direction rank {A.shape[0]} exceeds the init state's rank {r}")
    if A.shape[0] == r:
        return A, B
    A_pad = torch.zeros(r, A.shape[1], dtype=A.dtype, device=A.device)
    B_pad = torch.zeros(B.shape[0], r, dtype=B.dtype, device=B.device)
    A_pad[: A.shape[0]], B_pad[:, : B.shape[1]] = A, B
    return A_pad, B_pad


def _displacement(scorer: SqsdScorer, direction, adapter: str, layers: dict) -> tuple[dict, bool]:
    """Δ per module in factor space (see the module docstring), and whether θ_ref lies on the path θ0 + α·V."""
    device, dtype = scorer.device, scorer.acc_dtype
    end_state = {}
    for m, (A0, _) in scorer._factors[adapter].items():
        f = direction.modules[m]
        B_v = (f.scaling / layers[m].scaling[adapter]) * f.B.to(device, dtype)
        end_state[m] = _pad_rank(f.A.to(device, dtype), B_v, A0.shape[0])
    on_linear_path = all(
        torch.allclose(A0, end_state[m][0], rtol=1e-5, atol=1e-8) for m, (A0, _) in scorer._factors[adapter].items()
    )
    displacement = {
        m: (torch.zeros_like(A0), end_state[m][1]) if on_linear_path else (end_state[m][0] - A0, end_state[m][1] - B0)
        for m, (A0, B0) in scorer._factors[adapter].items()
    }
    return displacement, on_linear_path


def first_order_fidelity(scorer: SqsdScorer, direction, direction_name: str, tokenized, pad_id: int, cfg) -> dict:
    """Predicted vs actual loss change for ``cfg.n_samples`` samples and each ε in ``cfg.eps``."""
    from ..data.tokenize import collate

    scoring_pass = next(p for p in scorer.passes if direction_name in p.directions)
    state = scoring_pass.state
    model, adapter = scorer.model, state.name
    layers = lora_layers(model, adapter)
    chosen = sorted(tokenized, key=lambda t: t.sample_id)[: cfg.n_samples]
    batch = collate(chosen, pad_id, padding_side="right")
    device = scorer.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    dtype = scorer.acc_dtype

    # The scoring pass, with Δ as the one target: ⟨g, Δ⟩ per sample (the right-hand side of Eq. 13 up to −ε).
    displacement, on_linear_path = _displacement(scorer, direction, adapter, layers)
    targets = {m: {"step": ProjectionTarget(right_A=dA, right_B=dB, v_norm=1.0)}
               for m, (dA, dB) in displacement.items()}
    loss_ref, results = scorer.run_pass(adapter, targets, input_ids, attention_mask, labels)
    inner = torch.zeros(len(chosen), dtype=dtype)
    for m in results:  # in the order the gradients arrived
        inner += results[m].inner["step"].cpu()
    loss_ref = loss_ref.cpu().to(dtype)

    rows, summary = [], []
    originals = {m: (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone())
                 for m, layer in layers.items()}
    try:
        for eps in cfg.eps:
            with torch.no_grad():
                for m, (dA, dB) in displacement.items():
                    A_orig, B_orig = originals[m]
                    layers[m].lora_A[adapter].weight.copy_(A_orig + (eps * dA).to(A_orig.dtype))
                    layers[m].lora_B[adapter].weight.copy_(B_orig + (eps * dB).to(B_orig.dtype))
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                loss_t, _ = per_sample_mean_nll(logits, labels)
            actual = (loss_ref - loss_t.cpu().to(dtype)).numpy()
            predicted = (-eps * inner).numpy()
            rel = np.abs(predicted - actual) / np.maximum(np.abs(actual), 1e-12)
            summary.append({
                "eps": eps,
                "pearson_r": pearson(predicted, actual),
                "median_rel_error": float(np.median(rel)),
                "mean_abs_actual": float(np.mean(np.abs(actual))),
            })
            rows += [{"eps": eps, "sample_id": t.sample_id, "predicted": float(p), "actual": float(a)}
                     for t, p, a in zip(chosen, predicted, actual)]
    finally:
        with torch.no_grad():
            for m, (A_orig, B_orig) in originals.items():
                layers[m].lora_A[adapter].weight.copy_(A_orig)
                layers[m].lora_B[adapter].weight.copy_(B_orig)
    return {
        "equation": "Eq. 13: L(ref) - L(target) ≈ -<g, θ_target - θ_ref>, θ_target = θ_ref + ε(θ0+V - θ_ref)",
        "state": state.description,
        "displacement": "further along V: θ0 + (α+ε)V" if on_linear_path else "towards θ0 + V",
        "direction": direction_name,
        "n_samples": len(chosen),
        "summary": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
                    for s in summary],
        "rows": rows,
    }
