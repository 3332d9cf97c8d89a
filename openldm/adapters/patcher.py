"""LoRAs applied to a model's weights, reversibly.

The changes are added into the weights in place (so sampling costs nothing more than without LoRAs;
a plain LoRA is one ``addmm_`` per layer, with no change-sized temporary). Before any change, the way
back of every weight about to change is secured:

* when the model was loaded from files (``source``: its weights read again, memory-mapped) and the
  weight is still what the file holds (compared exactly, in the weight's dtype), nothing is copied:
  the file is the way back (its files' sizes and modification times, noted then, tell whether they
  changed meanwhile);
* otherwise a copy is kept on the CPU (all copies made before any change: copying and multiplying
  interleaved took twice as long on the CPU).

When the set of LoRAs changes, the weights come back from the file or the copies: unloading restores
them bit for bit, and at most the layers the files name are ever copied, never the whole network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from openldm.adapters.deltas import LayerChange, bias_change, low_rank, weight_change
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


Key = tuple[Network, str]


class Source(Protocol):
    """Where the weights came from (:class:`openldm.checkpoints.load.SourceFiles`)."""

    def read(self) -> dict[str, dict[str, torch.Tensor]]: ...
    def stamp(self) -> tuple[tuple[str, int, int], ...]: ...


class SourceChangedError(RuntimeError):
    """The checkpoint changed on disk while LoRAs were applied: the weights cannot come back from it."""


@dataclass
class Patches:
    """What is applied to a model's networks now, and the way back of every weight it changed."""

    applied: tuple[LoraUse, ...] = ()
    originals: dict[Key, torch.Tensor] = field(default_factory=dict)  # copies, on the CPU
    in_source: set[Key] = field(default_factory=set)  # restored from the source
    source: Source | None = None
    stamp: tuple[tuple[str, int, int], ...] = ()

    def apply(
        self, networks: dict[Network, nn.Module], uses: tuple[LoraUse, ...], source: Source | None = None
    ) -> None:
        """Make the networks' weights their originals plus ``uses`` (nothing to do if already so);
        ``source`` reads the weights as the files hold them."""
        if tuple(u.key() for u in uses) == tuple(u.key() for u in self.applied):
            return
        self.source = source
        self._restore(networks)
        self.applied = ()
        try:
            self._add_all(networks, uses)
        except BaseException:
            self._restore(networks)
            raise
        self.applied = uses

    def _add_all(self, networks: dict[Network, nn.Module], uses: tuple[LoraUse, ...]) -> None:
        work = [
            (networks[layer.network].get_submodule(layer.path), layer, change, use.weight_for(layer.network))
            for use in uses
            for layer, change in use.file.changes.items()
            if use.weight_for(layer.network) != 0.0
        ]
        with torch.no_grad():
            stored = _Stored(self.source)
            for module, layer, change, _ in work:
                self._keep(layer, "weight", module.weight, stored)
                if bias_change(change) is not None:
                    if module.bias is None:
                        raise ValueError(f"{layer.network} layer {layer.path} has no bias to change")
                    self._keep(layer, "bias", module.bias, stored)
            for module, _, change, weight in work:
                _add_weight(module.weight, change, weight)
                bias = bias_change(change)
                if bias is not None:
                    module.bias.copy_(module.bias.float().add_(bias.to(module.bias.device), alpha=weight))

    def _keep(self, layer: Layer, name: str, param: torch.Tensor, stored: _Stored) -> None:
        key = (layer.network, f"{layer.path}.{name}")
        if key in self.originals or key in self.in_source:
            return
        if stored.holds(key, param):
            if not self.in_source:
                self.stamp = stored.stamp
            self.in_source.add(key)
        else:
            self.originals[key] = param.detach().to("cpu", copy=True)

    def changed(self) -> list[Key]:
        """The (network, parameter name) of every weight the applied LoRAs change."""
        return [*self.originals, *self.in_source]

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def _restore(self, networks: dict[Network, nn.Module]) -> None:
        with torch.no_grad():
            for (network, name), original in self.originals.items():
                param = networks[network].get_parameter(name)
                if param.device == original.device:
                    param.data = original  # the copy becomes the weight again; the changed one is freed
                else:
                    param.copy_(original)
            self.originals.clear()
            if self.in_source:
                self._restore_from_source(networks)

    def _restore_from_source(self, networks: dict[Network, nn.Module]) -> None:
        assert self.source is not None
        keys, self.in_source = self.in_source, set()
        if self.source.stamp() != self.stamp:
            raise SourceChangedError(
                f"the checkpoint changed on disk while LoRAs were applied: {len(keys)} weights cannot come "
                "back from it; load the model again"
            )
        stored = self.source.read()
        for network, name in keys:
            networks[network].get_parameter(name).copy_(stored[network][name])


class _Stored:
    """The source's tensors, read once, when first asked for; one buffer for the comparisons."""

    def __init__(self, source: Source | None) -> None:
        self.source = source
        self.tensors: dict[str, dict[str, torch.Tensor]] | None = None
        self.stamp: tuple[tuple[str, int, int], ...] = ()
        self.buffer = torch.empty(0)

    def holds(self, key: Key, param: torch.Tensor) -> bool:
        """Whether the source holds exactly ``param`` under ``key`` (in ``param``'s dtype)."""
        if self.source is None:
            return False
        if self.tensors is None:
            self.stamp = self.source.stamp()
            self.tensors = self.source.read()
        network, name = key
        stored = self.tensors.get(network, {}).get(name)
        if stored is None or stored.shape != param.shape:
            return False
        if self.buffer.numel() < param.numel() or self.buffer.dtype != param.dtype:
            self.buffer = torch.empty(param.numel(), dtype=param.dtype, device=param.device)
        cast = self.buffer[: param.numel()].view(param.shape)
        return torch.equal(cast.copy_(stored), param)


def _add_weight(param: torch.Tensor, change: LayerChange, weight: float) -> None:
    """``param += weight * change``, in place, computed in float32."""
    factors = low_rank(change) if param.dtype == torch.float32 else None
    if factors is not None:
        up, down = (f.to(param.device) for f in factors)
        param.view(param.shape[0], -1).addmm_(up, down, alpha=weight)
        return
    delta = weight_change(change, param.shape).to(param.device)
    if param.dtype == torch.float32:
        param.add_(delta, alpha=weight)
    else:
        param.copy_(param.float().add_(delta, alpha=weight))
