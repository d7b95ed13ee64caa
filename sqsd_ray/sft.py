"""A plain in-process LoRA SFT loop that returns the trained adapter as a direction (paper Eq. 3-4).

From peft's fresh initialisation (B = 0) the trained adapter's displacement is exactly V = θ̂ − θ0 = s·B̂Â per
module, so the direction is the adapter's factors. This loop is the small, single-process path (quickstart,
tests); cluster-scale direction building runs the same loss under Ray Train.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .data import Sample, TokenizedSample, collate, tokenize_sample
from .directions import Direction, direction_from_factors
from .models import LoraSettings, apply_lora, get_lora_factors, get_lora_scalings
from .score import per_sample_mean_nll

log = logging.getLogger(__name__)


def train_lora_direction(
    base_model: torch.nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    lora: LoraSettings,
    kind: str,
    steps: int = 40,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    base_model_name: str = "unknown",
    source: str = "sft",
) -> tuple[Direction, list[float]]:
    """LoRA SFT (mean response NLL per sample, averaged over the batch) for ``steps`` AdamW steps.

    ``base_model`` is not modified (a copy is trained). Returns the direction and the per-step losses.
    """
    if not samples:
        raise ValueError(f"no samples to train the {kind} direction on")
    tokenized: list[TokenizedSample] = [tokenize_sample(s, tokenizer, max_length) for s in samples]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = apply_lora(copy.deepcopy(base_model), lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    losses = []
    order: list[int] = []
    for _ in tqdm(range(steps), desc=f"LoRA SFT ({kind})", unit="step", leave=False):
        if len(order) < batch_size:
            order += rng.sample(range(len(tokenized)), len(tokenized))
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([tokenized[i] for i in idx], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        loss = per_sample_mean_nll(logits, batch["labels"].to(device))[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    factors = get_lora_factors(model)
    direction = direction_from_factors(
        factors, get_lora_scalings(model), kind=kind, base_model=base_model_name, source=source,
        steps=str(steps), lr=repr(lr), batch_size=str(batch_size), first_loss=f"{losses[0]:.4f}", last_loss=f"{losses[-1]:.4f}",
    )
    log.info("%s direction: loss %.3f -> %.3f over %d steps, ‖V‖ = %.4g", kind, losses[0], losses[-1], steps, direction.norm())
    return direction, losses
