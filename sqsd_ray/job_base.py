"""The head of the job configs that run a LoRA-wrapped model over a data set (``score``, ``train`` and the jobs
built on training): one definition, so the three sections and their order are the same in every such job.

Here rather than in ``scoring`` or ``training``: each of those imports it, and neither should import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data.records import DataConfig
from .models.loading import ModelConfig
from .models.lora import LoraSettings


@dataclass
class ModelDataJob:
    """``model``, ``lora``, ``data``: a subclass's own sections follow them (dataclass fields keep base order)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)


__all__ = ["ModelDataJob"]
