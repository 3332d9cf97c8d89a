"""T2I-Adapter (Mou et al. 2023): a small convolutional network that turns a control image into one
feature map per UNet level, added to the UNet's encoder once per run (it does not see the latents, the
timestep or the text, so one evaluation serves every step).

The module tree mirrors the reference's ``Adapter`` so that the released SD 1.x files (``conv_in``,
``body.N.{in_conv,block1,block2,down_opt}``) load with ``strict=True``:

- ``PixelUnshuffle(8)`` folds the image onto the latent grid (8x8 pixels -> 64 channels each);
- ``conv_in``: 3x3 to the first level's width;
- ``body``: ``num_res_blocks`` residual blocks per level, the first of each later level halving the grid
  (average pool, or ``down_opt.op``, a 3x3 stride-2 convolution) and, when the width changes,
  ``in_conv`` mapping it; a block is ``x + block2(relu(block1(x)))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.upcast import compute_dtype

UNSHUFFLE = 8


@dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3  # the control image's: 3, or 1 for the sketch adapters
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    kernel_size: int = 1  # of block2 and in_conv (block1 is always 3x3)
    conv_downsample: bool = False  # a strided convolution instead of an average pool


class AdapterBlock(nn.Module):
    def __init__(self, config: T2IAdapterConfig, width_in: int, width: int, down: bool) -> None:
        super().__init__()
        k = config.kernel_size
        self.down = down
        self.down_opt = _StridedConv(width_in) if down and config.conv_downsample else None
        self.in_conv = nn.Conv2d(width_in, width, k, 1, k // 2) if width_in != width else None
        self.block1 = nn.Conv2d(width, width, 3, 1, 1)
        self.block2 = nn.Conv2d(width, width, k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            # ceil: the grid halves as the UNet's stride-2 convolutions halve it, odd sizes included
            x = F.avg_pool2d(x, 2, ceil_mode=True) if self.down_opt is None else self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class _StridedConv(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class T2IAdapter(nn.Module):
    def __init__(self, config: T2IAdapterConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.channels
        self.conv_in = nn.Conv2d(config.in_channels * UNSHUFFLE**2, widths[0], 3, 1, 1)
        blocks = []
        for level, width in enumerate(widths):
            for index in range(config.num_res_blocks):
                first_of_later_level = level > 0 and index == 0
                width_in = widths[level - 1] if first_of_later_level else width
                blocks.append(AdapterBlock(config, width_in, width, down=first_of_later_level))
        self.body = nn.ModuleList(blocks)
        # Where it was read from, for the images' parameters (set by the reader).
        self.name, self.short_hash = "", ""

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per level for ``image`` (B, in_channels, 8H, 8W) in [0, 1]: the first at the
        latent grid (H, W), each next one half the size."""
        if image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"this T2I-Adapter reads {self.config.in_channels}-channel images, got {image.shape[1]}"
            )
        dtype = compute_dtype(self)
        x = self.conv_in(F.pixel_unshuffle(image.to(dtype), UNSHUFFLE))
        features = []
        for index, block in enumerate(self.body):
            x = block(x)
            if (index + 1) % self.config.num_res_blocks == 0:
                features.append(x)
        return features
