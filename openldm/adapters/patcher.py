"""LoRAs applied to a model's weights, in place and reversibly.

The changes are added into the weights (so sampling costs nothing more than without LoRAs); the
original of every weight changed is kept, on the CPU, the first time it changes, and copied back when
the set of LoRAs changes: unloading restores the weights bit for bit. Only the layers a file names
are kept, never a copy of the whole network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from openldm.adapters.deltas import bias_change, weight_change
from openldm.adapters.lora_files import LoraFile
from openldm.adapters.names import Layer, Network


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file and the weights it is applied with (the web UI's ``<lora:name:text:unet>``)."""

    file: LoraFile
    unet_weight: float = 1.0
    text_weight: float = 1.0

    def weight_for(self, network: Network) -> float:
        return self.unet_weight if network == "unet" else self.text_weight

    def key(self) -> tuple[int, float, float]:
        return id(self.file), self.unet_weight, self.text_weight


@dataclass
class Patches:
    """What is applied to a model's networks now, and the originals of the weights it changed."""

    applied: tuple[LoraUse, ...] = ()
    originals: dict[tuple[Network, str], torch.Tensor] = field(default_factory=dict)

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def apply(self, networks: dict[Network, nn.Module], uses: tuple[LoraUse, ...]) -> None:
        """Make the networks' weights their originals plus ``uses`` (nothing to do if already so)."""
        if tuple(u.key() for u in uses) == tuple(u.key() for u in self.applied):
            return
        self._restore(networks)
        self.applied = ()
        try:
            self._add_all(networks, uses)
        except BaseException:
            self._restore(networks)
            self.originals.clear()
            raise
        self.applied = uses
        if not uses:
            self.originals.clear()

    def _add_all(self, networks: dict[Network, nn.Module], uses: tuple[LoraUse, ...]) -> None:
        with torch.no_grad():
            for use in uses:
                for layer, change in use.file.changes.items():
                    weight = use.weight_for(layer.network)
                    if weight == 0.0:
                        continue
                    module = networks[layer.network].get_submodule(layer.path)
                    self._add(layer, module, "weight", weight_change(change, module.weight.shape), weight)
                    bias = bias_change(change)
                    if bias is not None:
                        self._add(layer, module, "bias", bias, weight)

    def _add(self, layer: Layer, module: nn.Module, name: str, delta: torch.Tensor, weight: float) -> None:
        param = getattr(module, name)
        if param is None:
            raise ValueError(f"{layer.network} layer {layer.path} has no {name} to change")
        key = (layer.network, f"{layer.path}.{name}")
        if key not in self.originals:
            self.originals[key] = param.detach().to("cpu", copy=True)
        delta = delta.to(param.device).reshape(param.shape)
        if param.dtype == torch.float32:
            param.add_(delta, alpha=weight)
        else:
            param.copy_(param.float().add_(delta, alpha=weight))

    def _restore(self, networks: dict[Network, nn.Module]) -> None:
        with torch.no_grad():
            for (network, name), original in self.originals.items():
                networks[network].get_parameter(name).copy_(original)
