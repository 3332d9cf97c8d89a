"""Hires fix, as the web UI's txt2img does it: generate at the asked size, upscale (the latents,
bilinearly, or the decoded images with Lanczos), then img2img the upscaled result at the larger size:
the last ``int(strength * steps)`` of ``steps`` steps from the upscaled latents noised to their first
sigma. The second pass draws from the run's generator after the first (the Lanczos path first encodes
the upscaled images, one posterior sample each)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.images import pil_to_tensor, tensor_to_pil
from openldm.pipelines.common import Model, sampling_sigmas, strength_sigmas
from openldm.pipelines.options import GenerationOptions, Hires


def hires_size(height: int, width: int, hires: Hires, factor: int) -> tuple[int, int]:
    """The second pass's (height, width): the size times ``scale``, down to a multiple of ``factor``."""
    return int(height * hires.scale) // factor * factor, int(width * hires.scale) // factor * factor


def hires_sigmas_of(model: Model, options: GenerationOptions) -> torch.Tensor:
    """The second pass's sigmas: the last ``int(strength * steps)`` of a ``steps``-step schedule."""
    hires = options.hires
    assert hires is not None
    steps = hires.steps or options.steps
    full = sampling_sigmas(model, options.sampler_info, steps, options.karras)
    return strength_sigmas(full, steps, hires.strength)


def upscale_latents(
    x: torch.Tensor,
    size: tuple[int, int],
    hires: Hires,
    factor: int,
    decode: Callable[[torch.Tensor], torch.Tensor | None],
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The first pass's latents at ``size`` (pixels): interpolated, or decoded, resized and encoded."""
    if hires.upscaler == "latent":
        return F.interpolate(
            x, size=(size[0] // factor, size[1] // factor), mode="bilinear", align_corners=False
        )
    decoded = decode(x)
    assert decoded is not None
    images = [
        image.resize((size[1], size[0]), Image.LANCZOS) for image in tensor_to_pil(decoded.float().cpu())
    ]
    return encode(torch.cat([pil_to_tensor(image) for image in images]))
