"""Weights stored in one dtype, computed in another: a fp16 file's weights stay fp16 in memory (half
the bytes) while every layer computes in fp32, its parameters cast for the call and freed after it.

:func:`upcast_layers` turns the layers of a network into subclasses whose ``forward`` casts their
parameters to the network's compute dtype (the same modules, keys and parameters: LoRA patches and
state dicts see no difference); :func:`compute_dtype` is the dtype a network computes in, which its
inputs are cast to. Casting fp16 to fp32 is exact, so the results are those of the network upcast
once at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its ``compute_dtype`` when its layers upcast, else its weights'."""
    return getattr(module, "compute_dtype", None) or next(module.parameters()).dtype


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class _UpcastLinear(nn.Linear):
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        return F.linear(x.to(dtype), self.weight.to(dtype), _cast(self.bias, dtype))


class _UpcastConv2d(nn.Conv2d):
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        return self._conv_forward(x.to(dtype), self.weight.to(dtype), _cast(self.bias, dtype))


class _UpcastGroupNorm(nn.GroupNorm):
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight, bias = _cast(self.weight, dtype), _cast(self.bias, dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)


class _UpcastLayerNorm(nn.LayerNorm):
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight, bias = _cast(self.weight, dtype), _cast(self.bias, dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


class _UpcastEmbedding(nn.Embedding):
    compute_dtype: torch.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


_UPCAST = {
    nn.Linear: _UpcastLinear,
    nn.Conv2d: _UpcastConv2d,
    nn.GroupNorm: _UpcastGroupNorm,
    nn.LayerNorm: _UpcastLayerNorm,
    nn.Embedding: _UpcastEmbedding,
}


def upcast_layers(network: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make ``network`` compute in ``dtype`` with its weights left as stored (see the module docstring).
    Subclasses of these layers that compute in their own way (the GroupNorm computed in fp32) are left
    as they are; parameters outside layers (class and position embeddings) are cast where they are
    used, and one that were not would stop the computation with a dtype error, not lose precision.
    A network whose weights are already in ``dtype`` is left as it is."""
    if next(network.parameters()).dtype == dtype:
        return network
    for module in network.modules():
        upcast = _UPCAST.get(type(module))
        if upcast is not None:
            module.__class__ = upcast
            module.compute_dtype = dtype
    network.compute_dtype = dtype
    return network
