"""Capture of LoRA activations and output-gradients during one forward and one backward pass.

For a peft LoRA linear, ``h = W x + s · lora_B(lora_A(x))``. Per module we record

- ``x``  = input of ``lora_A``             (batch, tokens, d_in)
- ``a``  = output of ``lora_A`` = A0 x      (batch, tokens, r)
- ``gu`` = ∂L/∂u for u = output of ``lora_B`` (batch, tokens, d_out); since h = ... + s·u, gu = s·δ.

The forward hooks cache ``x`` and ``a`` (detached) and hook the ``lora_B`` output tensor; when its gradient
arrives during backward, ``on_grad(name, x, a, gu)`` reduces it to per-sample scalars and that module's cache
is freed at once, so no per-sample gradient outlives its module's backward (the Kronfluence "self-score"
pattern). ``x`` is the activation the forward pass keeps anyway (q, k and v share one). The math lives in
``kernel``; this module never computes anything.

Only ``lora_B.weight`` needs ``requires_grad`` for gradients to reach every ``u``; the capture turns the
others off while it is active and restores them on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models.lora import lora_layers

GradCallback = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


class LoraGradCapture:
    """Context manager: hooks every LoRA layer of ``adapter_name`` and calls ``on_grad`` per module in backward.

    Usage::

        with LoraGradCapture(model, "danger_state", on_grad):
            loss = per_sample_losses(model(...)).sum()
            loss.backward()
    """

    def __init__(
        self, model: nn.Module, adapter_name: str, on_grad: GradCallback, layers: dict[str, nn.Module] | None = None
    ):
        self.model = model
        self.adapter_name = adapter_name
        self.on_grad = on_grad
        # Walking named_modules() costs more than a tiny model's whole backward: callers pass the layers once.
        self.layers = layers if layers is not None else lora_layers(model, adapter_name)
        self._handles: list[Any] = []
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> LoraGradCapture:
        for param in self.model.parameters():
            self._saved_requires_grad.append((param, param.requires_grad))
            param.requires_grad_(False)
        for name, layer in self.layers.items():
            lora_A = layer.lora_A[self.adapter_name]
            lora_B = layer.lora_B[self.adapter_name]
            if not isinstance(layer.lora_dropout[self.adapter_name], nn.Identity) and layer.training:
                raise RuntimeError(f"{name}: LoRA dropout is active; call model.eval() before scoring")
            lora_B.weight.requires_grad_(True)
            self._handles.append(lora_A.register_forward_hook(self._make_a_hook(name)))
            self._handles.append(lora_B.register_forward_hook(self._make_b_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._cache.clear()
        for param, flag in self._saved_requires_grad:
            param.requires_grad_(flag)
            param.grad = None
        self._saved_requires_grad.clear()

    def _make_a_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._cache[name] = (inputs[0].detach(), output.detach())

        return hook

    def _make_b_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:  # under torch.no_grad (e.g. generation): nothing to capture
                self._cache.pop(name, None)
                return

            def on_output_grad(grad: torch.Tensor) -> None:
                x, a = self._cache.pop(name)
                self.on_grad(name, x, a, grad.detach())

            output.register_hook(on_output_grad)

        return hook
