"""Attention blocks of the UNet, mirroring the reference's ``ldm.modules.attention``.

Module and attribute names follow the original checkpoint keys (``to_q``, ``to_out.0``,
``ff.net.0.proj``, ``transformer_blocks.0.attn1``, ...), so an original state dict loads as is.
All attention goes through :func:`multi_head_attention`, a thin wrapper over
``torch.nn.functional.scaled_dot_product_attention`` on (B, N, C) tensors that other models
(e.g. the VAE's mid-block attention) can reuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openldm.nn import token_merging
from openldm.nn.token_merging import Merge


def whole_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` doubled when it has half of ``batch`` rows (the first of twin halves, see
    :func:`openldm.nn.unet.twin_halves`, taken back to the whole batch), else as it is."""
    return torch.cat([x, x]) if 2 * x.shape[0] == batch else x


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False
) -> torch.Tensor:
    """Softmax attention with ``heads`` heads on (B, N, C) queries and (B, M, C) keys/values.

    The scale is ``1/sqrt(C / heads)``. With ``upcast`` the computation runs in fp32 and the
    result is cast back to the input dtype (a no-op for fp32 inputs).
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    b, n, c = q.shape
    q = q.view(b, n, heads, c // heads).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, c // heads).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, v.shape[2] // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, -1).to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input dtype (the reference's GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when context is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # A Sequential so the key is ``to_out.0`` as in the reference (whose index 1 is dropout).
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast
        )
        return self.to_out(out)


class GEGLU(nn.Module):
    """A linear layer to twice the width, one half gating the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner_dim = dim * mult
        # Index 1 is the reference's dropout (p=0 in every Stable Diffusion config).
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual.

    With ``disable_self_attn`` the first attention attends to the context as well (the x4
    upscaler's lower levels).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        disable_self_attn: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, heads, dim_head, upcast=upcast
        )
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast=upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, merge: tuple[Merge, Merge] | None = None
    ) -> torch.Tensor:
        """``merge``: token merging's (merge, unmerge) around the first attention (see
        :mod:`openldm.nn.token_merging`). ``x`` may be the first half of twin halves (the context
        has the whole batch): it runs as a half up to the first attention that reads the context."""
        first_context = context if self.disable_self_attn else None
        if first_context is not None:
            x = whole_batch(x, context.shape[0])
        if merge is None:
            x = self.attn1(self.norm1(x), first_context) + x
        else:
            x = merge[1](self.attn1(merge[0](self.norm1(x)), first_context)) + x
        x = whole_batch(x, context.shape[0])
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a (B, C, H, W) feature map, added back as a residual.

    ``proj_in``/``proj_out`` are 1x1 convolutions before/after flattening (SD 1) or linear layers
    after/before it (SD 2, ``use_linear``). The input norm uses eps 1e-6, as the reference.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, disable_self_attn, upcast)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        merging = token_merging.active(h, w)
        if merging is not None:  # its plan draws from a generator: made for the whole batch
            x = whole_batch(x, context.shape[0])
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            if merging is None:
                x = block(x, context)
            else:
                x = block(x, context, token_merging.plan(x, h, w, merging.ratio, merging.generator))
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return whole_batch(x_in, x.shape[0]) + x
