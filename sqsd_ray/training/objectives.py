"""Training objectives as plain torch: the SFT loss of Eq. 4 and the DPO loss of Eq. 3 (β = 0.1 in the paper).

SFT follows the usual trainer convention (and LLaMA-Factory's, which the paper used): the mean NLL over every
supervised response token of the *global* batch, so a long response weighs more than a short one. The
token count is a global quantity; ``sft_loss`` takes it as an argument so that data-parallel workers and
gradient-accumulation micro-batches each contribute ``their token NLL sum / global tokens`` and the summed
gradient is exactly that of one big batch.

DPO is the sigmoid loss of Rafailov et al. (2023), Eq. 7:

    L = −log σ( β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))] )

with sequence log-probabilities summed over response tokens. With LoRA the reference policy is the base
model itself (the adapter switched off), so no second copy of the weights is needed. The loss is written
here rather than taken from a library: TRL keeps it inside ``DPOTrainer``, which owns its own training loop
(Accelerate), while this project's loop runs under Ray Train and DeepSpeed; the formula is three lines and
``tests/unit/test_train.py`` checks it against sequence log-probabilities computed token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scoring.scorer import per_sample_mean_nll


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed response-token NLL (n,) and supervised token counts (n,)."""
    mean_nll, counts = per_sample_mean_nll(logits, labels)
    return mean_nll * counts, counts


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, global_tokens: float | torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's share of the global-batch token-mean NLL: Σ token NLL / ``global_tokens``.

    ``weights`` (n,) scale each sample's token NLLs (per-sample loss weights of a curated corpus); the caller
    then passes Σ weight × response tokens as ``global_tokens``, so the loss stays a weighted token mean.
    """
    nll_sum, _ = token_nll_sum(logits, labels)
    if weights is not None:
        nll_sum = nll_sum * weights
    return nll_sum.sum() / global_tokens


@torch.no_grad()
def token_mean_nll(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean response NLL of a whole set (its SFT loss): Σ token NLL / Σ supervised tokens over ``batches``.

    A long response weighs more than a short one, as in training. (Restoration's refusal term is the other
    measure, a mean over examples of each one's token mean: ``mitigation.restore.per_example_losses``.)
    """
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        nll, counts = token_nll_sum(logits, batch["labels"].to(device))
        total, tokens = total + float(nll.sum()), tokens + int(counts.sum())
    return total / max(tokens, 1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) per sample: the sum of response-token log-probabilities (n,)."""
    nll_sum, _ = token_nll_sum(logits, labels)
    return -nll_sum


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair sigmoid DPO loss (n,) and the implicit rewards β·(log π − log π_ref) for logging."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses, {"chosen_reward": chosen_reward.detach(), "rejected_reward": rejected_reward.detach()}


__all__ = ["dpo_loss", "sequence_logps", "sft_loss", "token_mean_nll", "token_nll_sum"]
