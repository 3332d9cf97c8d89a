"""The KL autoencoder of Stable Diffusion: image <-> latent.

Module names mirror the reference ``ldm/modules/diffusionmodules/model.py`` Encoder/Decoder and
``ldm/models/autoencoder.py`` AutoencoderKL, so the state dict keys are the original single-file
keys without the ``first_stage_model.`` prefix (``encoder.down.0.block.0.conv1.weight``,
``quant_conv.weight``, ``decoder.up.3.upsample.conv.weight``, ...).

Latent scaling (``config.scale_factor``) is applied in :meth:`AutoencoderKL.to_latent` and
:meth:`AutoencoderKL.from_latent` and nowhere else.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openldm.config import VAEConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a (1x1 projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            # Contiguous: SDPA's flash kernel needs unit stride in C; on a transposed view the CPU falls
            # back to the math kernel, which holds the HW x HW scores (1 GiB per image at 16384 pixels).
            return t.reshape(b, 1, c, h * w).transpose(-1, -2).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a stride-2 3x3 conv (as the original)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: res blocks, then an optional resampler.

    ``attn`` stays an empty list (no attention at any level in the SD autoencoder); it exists so
    the module tree matches the original, which has no parameters under it either.
    """

    def __init__(self, channels: list[tuple[int, int]], resample: Literal["down", "up"] | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in channels)
        self.attn = nn.ModuleList()
        out = channels[-1][1]
        self.downsample = Downsample(out) if resample == "down" else None
        self.upsample = Upsample(out) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = config.ch
        for i, cout in enumerate(widths):
            pairs = [(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks)]
            self.down.append(Level(pairs, "down" if i != last else None))
            cin = cout
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        # Mean and log-variance of the posterior, stacked on the channel axis.
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # ``up[i]`` is level i (same resolution as ``encoder.down[i]``); it runs from the last to the first.
        levels: list[Level] = []
        cin = widths[-1]
        for i in reversed(range(len(widths))):
            cout = widths[i]
            pairs = [(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks + 1)]
            levels.insert(0, Level(pairs, "up" if i != 0 else None))
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: a normal distribution with diagonal covariance per latent pixel."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise.

        The noise is ``torch.randn(shape, generator=generator, dtype=mean.dtype)`` drawn on the
        generator's device (the mean's device without a generator), then moved to the mean's
        device: a CPU generator gives the same latent on every device.
        """
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to the standard normal, summed over C, H, W: one value per batch item."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], [B, in_channels, H, W] -> posterior over unscaled latents."""
        self._check_input(x, self.config.in_channels, "image", self.config.downsampling_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, out_ch, h * f, w * f]."""
        self._check_input(z, self.config.embed_dim, "latent", 1)
        return self.decoder(self.post_quant_conv(z))

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images -> scaled latents, as the diffusion model sees them (a sample, or the mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.config.scale_factor

    def from_latent(self, z: Tensor) -> Tensor:
        """Scaled latents -> images."""
        return self.decode(z / self.config.scale_factor)

    @staticmethod
    def _check_input(x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a 4-d {what} batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(
                f"expected a {what} with {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"{what} height and width must be multiples of {multiple}, got {height}x{width}; "
                f"resize or crop the {what} first"
            )
