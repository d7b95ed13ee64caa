"""The paper's baselines (App. D) as batch scorers: padded batch in, one risk value per sample out.

    RewardModelScorer     Risk = cost of (prompt, response) under beaver-7b-unified-cost (Eq. 20)
    RepsScorer            Bi-Anchor(Reps): max cosine of the final-layer hidden state at the second-to-last
                          token with the harmful anchors' (Eq. 21)
    GradAnchorScorer      Bi-Anchor(Grad): ⟨ĝ, ḡ_harm⟩ − ⟨ĝ, ḡ_safe1⟩ − ⟨ĝ, ḡ_safe2⟩, ĝ the L2-normalised
                          per-sample gradient, ḡ the anchor sets' mean normalised gradients (Eq. 22)
    SelfInfNScorer        Self-Inf-N: log(‖g‖² + 1) + log(|y| + 1) (Eq. 23-24)
    LarfScorer            LARF: ⟨h_l, h̄_unsafe⟩ − ⟨h_l, h̄_safe⟩ at the layer ``find_safety_layer`` picks by
                          scaling each block's weights (α ∈ {0.8, 0.9, 1.1, 1.2}) and watching refusals (Eq. 25)

The gradient baselines use the LoRA gradient (g_A, g_B of every adapted module), or the dense gradient of the same
modules' weights (``space="full"``), computed for the whole padded batch in one backward with the same hooks and
per-sample kernel as SQSD (``hooks.LoraGradCapture``, ``kernel.per_sample_lora_grads``), reduced to squared norms
and anchor inner products inside the hook: no per-sample gradient outlives its module. The LoRA state the gradient
is taken at is the caller's (a fresh peft adapter has B = 0, where g_A vanishes: give it a non-zero state, e.g. a
pilot checkpoint; the full-space gradient is exact at B = 0, i.e. at θ0).
Plain torch; no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..models.lora import get_lora_factors, get_lora_scalings, lora_layers
from ..scoring.hooks import LoraGradCapture
from ..scoring.kernel import per_sample_lora_grads
from ..scoring.scorer import per_sample_mean_nll

GradDict = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (g_A, g_B) of one vector


def _to(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)


class LoraGradientFeatures:
    """Per-sample gradients of a batch, reduced on the fly to ‖g‖² and ⟨g, anchor⟩ for fixed anchors.

    ``space="lora"``: g = (g_A, g_B) of every adapted module. ``space="full"``: g = ∂ℓ/∂W of the same modules'
    dense weights, G = Σ_t δ_t x_tᵀ from the same captured activations x and output gradients δ; ‖G‖² by the Gram
    identity Σ_{t,t'} (x_t·x_t')(δ_t·δ_t') and ⟨G, M⟩ = Σ_t δ_tᵀ M x_t, so no per-sample dense gradient is built
    except for the anchors. (Embeddings, norms and the LM head are not among the adapted modules.)
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str = "default", space: str = "lora") -> None:
        if space not in ("lora", "full"):
            raise ValueError(f"gradient space must be 'lora' or 'full', got {space!r}")
        self.model, self.adapter, self.space = peft_model, adapter_name, space
        self.layers = lora_layers(peft_model, adapter_name)
        self.factors = get_lora_factors(peft_model, adapter_name)
        self.scalings = get_lora_scalings(peft_model, adapter_name)
        self.device = next(peft_model.parameters()).device

    def _module_terms(self, module: str, x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor,
                      token_mask: torch.Tensor | None, anchors: Mapping[str, GradDict], keep: bool):
        """(‖g‖² (n,), {anchor: ⟨g, anchor⟩ (n,)}, the per-sample gradient if ``keep``) of one module."""
        if self.space == "lora":
            _, B0 = self.factors[module]
            g_a, g_b = per_sample_lora_grads(x, a, gu, B0.to(x.device), token_mask)
            sq = g_a.pow(2).sum((1, 2)).double() + g_b.pow(2).sum((1, 2)).double()
            inner = {name: ((g_a * anc[module][0].to(g_a)).sum((1, 2)) + (g_b * anc[module][1].to(g_b)).sum((1, 2))).double()
                     for name, anc in anchors.items()}
            return sq, inner, ((g_a.detach().cpu(), g_b.detach().cpu()) if keep else None)
        # gu = s·δ (the LoRA branch is scaled by s); torch.where so a non-finite padded slot cannot leak
        x, gu = x.float(), gu.float() / self.scalings[module]
        if token_mask is not None:
            x = torch.where(token_mask[..., None], x, 0.0)
            gu = torch.where(token_mask[..., None], gu, 0.0)
        sq = ((x @ x.transpose(1, 2)) * (gu @ gu.transpose(1, 2))).sum((1, 2)).double()
        inner = {name: ((gu @ anc[module][0].to(gu)) * x).sum((1, 2)).double() for name, anc in anchors.items()}
        dense = (gu.transpose(1, 2) @ x).detach().cpu() if keep else None  # (n, d_out, d_in)
        return sq, inner, ((dense, None) if keep else None)

    def run(self, batch: Mapping, anchors: Mapping[str, GradDict] | None = None, keep: bool = False):
        """(‖g‖² (n,), {anchor: ⟨g, anchor⟩ (n,)}, per-sample loss (n,), and with ``keep`` the per-sample
        gradients {module: (g_A (n,r,d_in), g_B (n,d_out,r))}, or {module: (G (n,d_out,d_in), None)} in the full
        space — only for small sets such as the anchors)."""
        input_ids, attention_mask, labels = _to(batch, self.device)
        token_mask = attention_mask.bool() if bool((attention_mask == 0).any()) else None
        n = input_ids.shape[0]
        sq_norm = torch.zeros(n, dtype=torch.float64, device=self.device)
        inner = {name: torch.zeros(n, dtype=torch.float64, device=self.device) for name in (anchors or {})}
        kept: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def on_grad(module: str, x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> None:
            sq, dots, grad = self._module_terms(module, x, a, gu, token_mask, anchors or {}, keep)
            sq_norm.add_(sq)
            for name, value in dots.items():
                inner[name].add_(value)
            if keep:
                kept[module] = grad

        self.model.zero_grad(set_to_none=True)
        with LoraGradCapture(self.model, self.adapter, on_grad, layers=self.layers):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            losses, _ = per_sample_mean_nll(logits, labels)
            del logits
            losses.sum().backward()  # each sample's own mean-NLL gradient (the sum keeps them apart)
        self.model.zero_grad(set_to_none=True)
        return sq_norm, inner, losses.detach(), kept


def mean_normalised_gradient(features: LoraGradientFeatures, batches: Sequence[Mapping]) -> GradDict:
    """ḡ = mean over the samples of ``batches`` of g / ‖g‖ (the norm over every module), per module as a pair
    of tensors ((A, B) in the LoRA space, (G, None) in the full space), accumulated batch by batch in fp64."""
    total: dict[str, list] = {}
    count = 0
    for batch in batches:
        sq_norm, _, _, kept = features.run(batch, keep=True)
        scale = 1.0 / sq_norm.cpu().sqrt().clamp_min(1e-30)
        count += len(scale)
        for module, parts in kept.items():
            sums = [None if p is None else (p.double() * scale.view(-1, 1, 1)).sum(0) for p in parts]
            if module not in total:
                total[module] = sums
            else:
                total[module] = [None if t is None else t + s for t, s in zip(total[module], sums)]
    if count == 0:
        raise ValueError("an anchor set has no samples")
    return {m: tuple(None if t is None else t / count for t in parts) for m, parts in total.items()}


class SelfInfNScorer:
    """Self-Inf-N (Guan et al. 2025): log(‖g‖² + 1) + log(|y| + 1), |y| the response tokens."""

    column = "self_inf_n"

    def __init__(self, peft_model: nn.Module, adapter_name: str = "default", space: str = "lora") -> None:
        self.features = LoraGradientFeatures(peft_model, adapter_name, space)

    def score_batch(self, batch: Mapping) -> dict[str, np.ndarray]:
        sq_norm, _, losses, _ = self.features.run(batch)
        n_response = (batch["labels"][:, 1:] != -100).sum(1).double()
        risk = torch.log1p(sq_norm.cpu()) + torch.log1p(n_response)
        return {"sample_id": np.asarray(batch["sample_ids"]), self.column: risk.numpy(),
                "self_influence": sq_norm.cpu().numpy(), "loss": losses.cpu().double().numpy()}


class GradAnchorScorer:
    """Bi-Anchor(Grad) (He et al. 2024): weights (1, −1, −1) on the harmful and two safe anchor means."""

    column = "bianchor_grad"
    WEIGHTS = {"harmful": 1.0, "safe1": -1.0, "safe2": -1.0}

    def __init__(self, peft_model: nn.Module, anchor_batches: Mapping[str, Sequence[Mapping]],
                 adapter_name: str = "default", space: str = "lora") -> None:
        """``anchor_batches``: harmful / safe1 / safe2 -> padded batches of that anchor set."""
        if set(anchor_batches) != set(self.WEIGHTS):
            raise ValueError(f"Bi-Anchor(Grad) needs the anchor sets {sorted(self.WEIGHTS)}, got {sorted(anchor_batches)}")
        self.features = LoraGradientFeatures(peft_model, adapter_name, space)
        self.anchors = {name: mean_normalised_gradient(self.features, batches)
                        for name, batches in anchor_batches.items()}

    def score_batch(self, batch: Mapping) -> dict[str, np.ndarray]:
        sq_norm, inner, losses, _ = self.features.run(batch, anchors=self.anchors)
        norm = sq_norm.sqrt().clamp_min(1e-30)
        risk = sum(weight * inner[name] / norm for name, weight in self.WEIGHTS.items())
        out = {"sample_id": np.asarray(batch["sample_ids"]), self.column: risk.cpu().numpy(),
               "loss": losses.cpu().double().numpy()}
        out.update({f"cos_{name}": (inner[name] / norm).cpu().numpy() for name in self.WEIGHTS})
        return out


def second_to_last_hidden(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """Final-layer hidden state at each sequence's second-to-last real token (the last is the end-of-turn
    token), for right- or left-padded batches: (n, hidden)."""
    input_ids, attention_mask, _ = _to(batch, next(model.parameters()).device)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                       use_cache=False).hidden_states[-1]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).max(dim=1).values  # last real position, any padding side
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), (last - 1).clamp_min(0)].float()


class RepsScorer:
    """Bi-Anchor(Reps): max cosine similarity to the harmful anchors' representations."""

    column = "bianchor_reps"

    def __init__(self, model: nn.Module, anchor_batches: Sequence[Mapping]) -> None:
        self.model = model
        self.anchors = torch.cat([second_to_last_hidden(model, b) for b in anchor_batches])
        self.anchors = self.anchors / self.anchors.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def score_batch(self, batch: Mapping) -> dict[str, np.ndarray]:
        reps = second_to_last_hidden(self.model, batch)
        cosine = (reps / reps.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ self.anchors.T  # (n, anchors)
        best, which = cosine.max(dim=1)
        return {"sample_id": np.asarray(batch["sample_ids"]), self.column: best.cpu().double().numpy(),
                "nearest_anchor": which.cpu().numpy()}


__all__ = [
    "GradAnchorScorer",
    "LarfScorer",
    "decoder_layers",
    "find_safety_layer",
    "last_token_hidden",
    "LoraGradientFeatures",
    "RepsScorer",
    "SelfInfNScorer",
    "mean_normalised_gradient",
    "second_to_last_hidden",
]


# ---------------------------------------------------------------------------------------------------- LARF


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (``model.model.layers`` for Llama / Qwen / Mistral)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no model.layers: LARF needs a decoder-only transformer")
    return layers


def last_token_hidden(model: nn.Module, batch: Mapping, layer: int) -> torch.Tensor:
    """Hidden state after decoder block ``layer`` (0-based) at each sequence's last real token: (n, hidden)."""
    input_ids, attention_mask, _ = _to(batch, next(model.parameters()).device)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                       use_cache=False).hidden_states[layer + 1]  # [0] is the embeddings
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def find_safety_layer(model: nn.Module, refusal_rate, layers: Sequence[int],
                      alphas: Sequence[float] = (0.8, 0.9, 1.1, 1.2),
                      known: Mapping[tuple[int | None, float], float] | None = None, on_trial=None,
                      ) -> tuple[int, dict[int, float], dict[int, dict[float, float]]]:
    """LARF's layer search: scale each candidate block's weights by α, measure the refusal rate with
    ``refusal_rate(model) -> float`` (e.g. keyword refusals on an over-refusal prompt set), and pick the layer
    whose scaling moves it most (mean |Δ| over α). The weights are restored after each trial.

    ``known`` holds rates measured earlier, keyed (layer, α) with (None, 1.0) for the unscaled model: those trials
    are not run again (a resumed search). ``on_trial(layer, alpha, rate)`` is called after each trial that is run.

    Returns (best layer, {layer: mean |Δ|}, {layer: {α: rate}}); the unscaled rate is under α = 1.0.
    """
    known = dict(known or {})

    def measure(layer: int | None, alpha: float) -> float:
        if (layer, alpha) not in known:
            known[(layer, alpha)] = refusal_rate(model)
            if on_trial is not None:
                on_trial(layer, alpha, known[(layer, alpha)])
        return known[(layer, alpha)]

    blocks = decoder_layers(model)
    base = measure(None, 1.0)
    change: dict[int, float] = {}
    rates: dict[int, dict[float, float]] = {}
    for layer in layers:
        params = [p for p in blocks[layer].parameters()]
        saved = [p.detach().clone() for p in params]
        rates[layer] = {1.0: base}
        try:
            for alpha in alphas:
                if (layer, float(alpha)) not in known:
                    with torch.no_grad():
                        for p, s in zip(params, saved):
                            p.copy_(s * alpha)
                rates[layer][float(alpha)] = measure(layer, float(alpha))
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        change[layer] = float(sum(abs(rates[layer][float(a)] - base) for a in alphas) / len(alphas))
    best = max(change, key=lambda layer: (change[layer], -layer))  # ties: the earlier layer
    return best, change, rates


class LarfScorer:
    """LARF: ⟨h_l(z), h̄_unsafe⟩ − ⟨h_l(z), h̄_safe⟩ at the safety-sensitive layer l (Eq. 25)."""

    column = "larf"

    def __init__(self, model: nn.Module, layer: int, unsafe_batches: Sequence[Mapping],
                 safe_batches: Sequence[Mapping]) -> None:
        self.model, self.layer = model, layer
        self.unsafe = torch.cat([last_token_hidden(model, b, layer) for b in unsafe_batches]).mean(0)
        self.safe = torch.cat([last_token_hidden(model, b, layer) for b in safe_batches]).mean(0)

    def score_batch(self, batch: Mapping) -> dict[str, np.ndarray]:
        h = last_token_hidden(self.model, batch, self.layer)
        risk = h @ self.unsafe - h @ self.safe
        return {"sample_id": np.asarray(batch["sample_ids"]), self.column: risk.cpu().double().numpy()}
