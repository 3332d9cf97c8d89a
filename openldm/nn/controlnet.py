"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder that reads a control image
(edges, depth, pose...) and hands the UNet one residual per skip connection and one for its middle.

The module tree mirrors the reference's ``cldm.ControlNet`` so that the ``control_model.*`` tensors of
the original files load with ``strict=True`` and no rename table:

- ``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``: as the UNet's (built by
  :class:`~openldm.nn.unet.UNetModel` without its decoder);
- ``input_hint_block.{0,2,...,14}``: eight 3x3 convolutions with SiLU between them, three of stride 2,
  taking the control image (in [0, 1], at the image's size) down to the latent grid and the UNet's
  first width;
- ``zero_convs.N.0``: a 1x1 convolution per input block, ``middle_block_out.0`` one for the middle.
"""

from __future__ import annotations

import torch
from torch import nn

from openldm.config import UNetConfig
from openldm.nn.unet import UNetModel, timestep_embedding
from openldm.nn.upcast import compute_dtype

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNetModel(nn.Module):
    def __init__(self, config: UNetConfig, hint_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        encoder = UNetModel(config, decoder=False)
        self.time_embed = encoder.time_embed
        self.label_emb = encoder.label_emb
        self.input_blocks = encoder.input_blocks
        self.middle_block = encoder.middle_block
        layers: list[nn.Module] = []
        width = hint_channels
        for out, stride in zip(HINT_WIDTHS, HINT_STRIDES, strict=True):
            layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1), nn.SiLU()]
            width = out
        layers.append(nn.Conv2d(width, config.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in encoder.skip_channels])
        width = encoder.skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))
        # Where it was read from, for the images' parameters (set by the reader).
        self.name, self.short_hash = "", ""

    @property
    def hint_channels(self) -> int:
        return self.input_hint_block[0].in_channels

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        hint: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals for latents ``x`` at ``timesteps`` under ``hint`` (B, C, 8H, 8W) in [0, 1]:
        one per UNet skip connection, then the middle block's."""
        dtype = compute_dtype(self)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this ControlNet is class-conditioned; pass y")
            emb = emb + self.label_emb(y if isinstance(self.label_emb, nn.Embedding) else y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        outs = []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
