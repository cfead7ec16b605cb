"""The model side of continual merging: LoRA task vectors, fresh LoRAs, a frozen merged delta.

* :func:`task_vector`: ``τ = ΔW = scaling * B @ A`` per LoRA target module (float32), keyed by
  the module's name in the PEFT model (``base_model.model.<path>``), via
  :func:`aimm.merging.continual.lora_deltas` and PEFT's per-module ``scaling``;
* a fresh LoRA per task is :func:`aimm.models.reset_lora` (PEFT's init from a forked RNG);
* :class:`MergedDelta`: a frozen float32 ``ΔW`` per target module, added to the module's output
  as ``x @ ΔWᵀ`` (computed in float32, cast to the activation dtype) by a forward hook. It is
  never added into the base weights, which may be bfloat16;
* :func:`use_merged`: switch the model between *training* (``θ0 + LoRA``; the merged delta off)
  and *evaluation* (``θ0 + merged``; the LoRA disabled through PEFT's ``enable_adapters``, its
  weights kept and still ``requires_grad``, so the engine's adapter check and the stage files
  see the task's LoRA).
"""

from __future__ import annotations

from typing import Mapping

import torch

from aimm.merging.continual import lora_deltas
from aimm.models import lora_layers, unwrap


def _adapter(layer) -> str:
    names = list(layer.lora_A.keys())
    if len(names) != 1:
        raise ValueError(f"continual merging needs one LoRA adapter per module, found {names}")
    return names[0]


def task_vector(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module name -> scaling * B @ A`` (float32, on the LoRA's device) of the model's LoRA,
    in sorted name order (that of the saved adapter files; DARE draws its masks in this order)."""
    params, scaling = {}, {}
    for name, layer in sorted(lora_layers(model).items()):
        a = _adapter(layer)
        params[f"{name}.lora_A.{a}.weight"] = layer.lora_A[a].weight.detach().float()
        params[f"{name}.lora_B.{a}.weight"] = layer.lora_B[a].weight.detach().float()
        scaling[name] = float(layer.scaling[a])
    return lora_deltas(params, scaling)


class MergedDelta:
    """A frozen float32 ``ΔW`` per LoRA target module, added as ``x @ ΔWᵀ`` while :attr:`on`."""

    def __init__(self) -> None:
        self.delta: dict[str, torch.Tensor] = {}
        self.on = False
        self._handles: list = []
        self._model: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module) -> None:
        """Install the forward hooks on ``model``'s LoRA layers (once per model)."""
        inner = unwrap(model)
        if self._model is inner:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = [layer.register_forward_hook(self._hook(name))
                         for name, layer in lora_layers(inner).items()]
        self._model = inner
        self.set(self.delta)

    def set(self, delta: Mapping[str, torch.Tensor]) -> None:
        """The merged ``ΔW`` (float32 copies, on each layer's device once attached)."""
        layers = lora_layers(self._model) if self._model is not None else {}
        unknown = sorted(set(delta) - set(layers)) if layers else []
        if unknown:
            raise ValueError(f"merged delta names modules the model lacks, e.g. {unknown[0]}")
        self.delta = {}
        for name, d in delta.items():
            device = layers[name].get_base_layer().weight.device if layers else d.device
            self.delta[name] = d.detach().to(device=device, dtype=torch.float32).clone()

    def _hook(self, name: str):
        def hook(module, args, output):
            d = self.delta.get(name)
            if not self.on or d is None:
                return None
            x = args[0]
            return output + torch.nn.functional.linear(x.to(d.dtype), d).to(output.dtype)

        return hook


def use_merged(model: torch.nn.Module, delta: MergedDelta, on: bool) -> None:
    """``on``: the model computes ``θ0 + merged`` (LoRA disabled, delta added); ``off``:
    ``θ0 + LoRA`` (the delta not added). The LoRA weights keep ``requires_grad`` either way."""
    delta.attach(model)
    for layer in lora_layers(model).values():
        layer.enable_adapters(not on)
        if on:  # PEFT also freezes a disabled adapter; it stays the stage's trainable LoRA
            a = _adapter(layer)
            for p in (*layer.lora_A[a].parameters(), *layer.lora_B[a].parameters()):
                p.requires_grad_(True)
    delta.on = on


__all__ = ["MergedDelta", "task_vector", "use_merged"]
