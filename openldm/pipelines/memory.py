"""How much memory a generation needs, told from the model's sizes before anything is allocated.

A request that cannot fit (``--H 80000 --W 80000``, ``--n_samples 100000000``) is refused with one
message instead of growing until the machine runs out of memory. The estimate counts what the pipelines
hold at their peak, from the configs alone:

* the UNet (every sampler step; a batch of ``2 n`` with guidance): the skip connections it keeps for its
  output blocks, plus the widest block's working tensors (a transformer block's feed-forward holds about
  fourteen times its channels per token; a residual block about eight);
* the VAE decoder (all images of a repeat at once) at full resolution, where the last upsampling keeps
  the second level's channels; the encoder for an init image;
* the text encoder's activations, the latents, and the decoded images every repeat keeps until the end.

Activations are counted in the precision asked (2 bytes for fp16/bf16, else 4), group norms in float32,
as the networks compute them. Attention is counted as ``scaled_dot_product_attention`` runs it on the CPU
and CUDA: without the score matrix (flash and memory-efficient kernels); on MPS the scores are counted.
The constants were checked against measured peaks (see ``tests/test_memory.py``): the estimate is
meant to be close and on the high side, not a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from openldm.config import ModelSpec, UNetConfig, VAEConfig
from openldm.devices import available_memory
from openldm.nn.vae_bands import least_bytes
from openldm.pipelines.options import VaeTiling

# Tensors of a block's width alive at its peak, per latent pixel (see the module docstring).
TRANSFORMER_WORKING = 14
RESBLOCK_WORKING = 8
# The decoder at full resolution: the upsampled input (second level's width) and the first level's
# residual block (input, float32 norm, activation, convolutions, shortcut).
DECODER_INPUT_COPIES = 4
DECODER_OUTPUT_COPIES = 3
ENCODER_COPIES = 6
# A decoded image as float32 [-1, 1], its [0, 1] copy, the array and the PIL image's bytes.
IMAGE_BYTES_PER_VALUE = 4 + 4 + 4 + 1
GiB = 1024**3
# What a banded VAE call may keep where the free memory cannot be told.
BANDS_WITHOUT_FREE_MEMORY = 4 * GiB


class InsufficientMemoryError(ValueError):
    """A request that needs more memory than the device has available."""


@dataclass(frozen=True)
class Request:
    """What a generation computes, as far as memory goes.

    ``batch``: images per repeat (the UNet runs ``2 * batch`` rows with guidance); ``repeats``: how many
    batches whose decoded images are all kept; ``latent``: the UNet's (height, width) in latent pixels;
    ``image``: the output's (height, width) in pixels; ``piece``: what the VAE codes at once (default
    ``image``; a tile when tiled); ``encode``: an init image is encoded too; ``vae_tiling``: the VAE may
    code by bands (see :class:`~openldm.pipelines.options.GenerationOptions`).
    """

    batch: int
    repeats: int
    latent: tuple[int, int]
    image: tuple[int, int]
    piece: tuple[int, int] | None = None
    guided: bool = True
    encode: bool = False
    decode: bool = True
    element_bytes: int = 4
    vae_tiling: VaeTiling = "off"


@dataclass(frozen=True)
class Estimate:
    """Bytes by part, and the peak: the largest stage plus what stays alive through all of them."""

    unet: int
    vae: int
    text: int
    kept: int

    @property
    def peak(self) -> int:
        return max(self.unet, self.vae, self.text) + self.kept

    def describe(self) -> str:
        parts = {
            "UNet": self.unet,
            "VAE": self.vae,
            "text encoder": self.text,
            "kept images and latents": self.kept,
        }
        largest = max(parts, key=lambda name: parts[name])
        return f"{_gib(self.peak)} (the {largest} {_gib(parts[largest])})"


def _levels(height: int, width: int, count: int) -> list[int]:
    """Pixels per level of a network that halves the resolution ``count - 1`` times (rounding up)."""
    return [math.ceil(height / 2**i) * math.ceil(width / 2**i) for i in range(count)]


def unet_bytes(config: UNetConfig, rows: int, latent: tuple[int, int], element: int, scores: bool) -> int:
    """The UNet's activations at their peak for ``rows`` latents of ``latent`` size."""
    widths = [config.model_channels * m for m in config.channel_mult]
    pixels = _levels(*latent, len(widths))
    skips = config.model_channels * pixels[0]
    working = 0
    attention = 0
    for level, (width, count) in enumerate(zip(widths, pixels, strict=True)):
        skips += config.num_res_blocks * width * count
        if level + 1 < len(widths):
            skips += width * pixels[level + 1]
        has_attention = 2**level in config.attention_resolutions
        copies = TRANSFORMER_WORKING if has_attention else RESBLOCK_WORKING
        working = max(working, copies * 2 * width * count)  # output blocks see the skip concatenated
        if has_attention and scores:
            heads, _ = config.heads_for(width)
            attention = max(attention, heads * count * count)
    return rows * element * (skips + working + attention)


def vae_bytes(config: VAEConfig, images: int, image: tuple[int, int], encode: bool, decode: bool) -> int:
    """The autoencoder's activations at full resolution, float32 norms counted at 4 bytes."""
    widths = [config.ch * m for m in config.ch_mult]
    pixels = image[0] * image[1]
    second = widths[1] if len(widths) > 1 else widths[0]
    decoder = (DECODER_INPUT_COPIES * second + DECODER_OUTPUT_COPIES * widths[0]) * pixels if decode else 0
    encoder = ENCODER_COPIES * widths[0] * pixels if encode else 0
    return 4 * images * max(decoder, encoder)


def banded_vae_bytes(
    config: VAEConfig, images: int, image: tuple[int, int], encode: bool, decode: bool
) -> int:
    """The autoencoder coding by bands (:mod:`openldm.nn.vae_bands`) in its leanest way."""
    factor = config.downsampling_factor
    latent = (images, config.embed_dim, *(math.ceil(side / factor) for side in image))
    pixels = (images, config.in_channels, *(math.ceil(side / factor) * factor for side in image))
    decoder = least_bytes(config, latent, "decode") if decode else 0
    encoder = least_bytes(config, pixels, "encode") if encode else 0
    return max(decoder, encoder)


def estimate(spec: ModelSpec, request: Request, device: torch.device, banded: bool = False) -> Estimate:
    """What ``request`` needs on ``device`` beyond the weights already loaded (``banded``: with the
    VAE coding by bands)."""
    rows = request.batch * (2 if request.guided else 1)
    element = request.element_bytes
    text = rows * spec.text.max_length * spec.text.width * 8 * element
    # Per image: its final latents (float32; the output's size over the VAE factor) and decoded image.
    factor = spec.vae.downsampling_factor
    latent_values = (
        spec.vae.embed_dim * math.ceil(request.image[0] / factor) * math.ceil(request.image[1] / factor)
    )
    image_values = 3 * request.image[0] * request.image[1] if request.decode else 0
    kept = request.batch * request.repeats * (4 * latent_values + IMAGE_BYTES_PER_VALUE * image_values)
    return Estimate(
        unet=unet_bytes(spec.unet, rows, request.latent, element, device.type == "mps"),
        vae=(banded_vae_bytes if banded else vae_bytes)(
            spec.vae, request.batch, request.piece or request.image, request.encode, request.decode
        ),
        text=text,
        kept=kept,
    )


def check_memory(spec: ModelSpec, request: Request, device: torch.device, reserved: int = 0) -> Estimate:
    """Raise :class:`InsufficientMemoryError` when ``request`` cannot fit in ``device``'s free memory,
    less ``reserved`` bytes the model may still take (Winograd filters not yet made)."""
    free = available_memory(device)
    free = None if free is None else free - reserved
    needed = estimate(spec, request, device, banded=_banded(spec, request, free))
    if free is not None and needed.peak > free:
        height, width = request.image
        kept = f" once the Winograd convolutions keep {_gib(reserved)} (--winograd-memory 0: none)"
        raise InsufficientMemoryError(
            f"this request needs about {needed.describe()} of memory for {request.batch} image(s) of "
            f"{width}x{height} at a time, but {device.type} has {_gib(free)} available"
            f"{kept if reserved else ''}; ask for fewer images at a time (n_samples) or smaller ones "
            "(width, height)"
        )
    return needed


def _banded(spec: ModelSpec, request: Request, free: int | None) -> bool:
    image = request.piece or request.image
    whole = vae_bytes(spec.vae, request.batch, image, request.encode, request.decode)
    return band_budget(request.vae_tiling, whole, free) is not None


def band_budget(tiling: VaeTiling, whole: int, free: int | None) -> int | None:
    """The bytes a VAE call coding by bands may keep, or None to code the whole image at once (a call
    whose whole-image activations take ``whole`` bytes, with ``free`` bytes free): half the free memory
    (:data:`BANDS_WITHOUT_FREE_MEMORY` where it cannot be told); "auto" bands only when the whole image
    would not fit in that half, "on" always, "off" never."""
    if tiling == "off":
        return None
    budget = free // 2 if free is not None else BANDS_WITHOUT_FREE_MEMORY
    if tiling == "auto" and (free is None or whole <= budget):
        return None
    return budget


def _gib(count: int) -> str:
    return f"{count / GiB:.1f} GiB" if count >= GiB / 10 else f"{count / 1024**2:.0f} MiB"
