"""Guidance by image: ControlNets wrapped around the UNet for one sampling run.

Each :class:`~openldm.pipelines.options.Control` brings a ControlNet, its control image, a weight and
the fraction of the steps it guides (``start`` to ``end``, as diffusers' ``control_guidance_start`` /
``_end`` and the web UI's "starting / ending control step"); with ``guess_mode`` it guides the
conditional half of classifier-free guidance only, its residuals scaled from 0.1 (first block) to 1
(middle) as the reference's "guess mode". The residuals of all ControlNets add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from openldm.nn.controlnet import ControlNetModel
from openldm.pipelines.options import Control
from openldm.sampling.schedule import NoiseSchedule

ASPECT_TOLERANCE = 0.01


@dataclass
class PreparedControl:
    network: ControlNetModel
    hint: torch.Tensor  # [1, C, H, W] in [0, 1], at the output's size
    weight: float
    start: float
    end: float
    guess_mode: bool


def control_hint(image: Image.Image | torch.Tensor, size: tuple[int, int], index: int) -> torch.Tensor:
    """The control image as ``[1, 3, H, W]`` in [0, 1] at ``size`` (height, width): resized (Lanczos)
    when its aspect is the output's; another aspect is an error (cropping it is the user's choice)."""
    height, width = size
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        found = tuple(tensor.shape[-2:])
        if found != (height, width):
            raise ValueError(
                f"control image {index + 1} is {found[1]}x{found[0]}, the output {width}x{height}"
            )
        return tensor.float()
    if abs(math.log((image.width / image.height) / (width / height))) > ASPECT_TOLERANCE:
        raise ValueError(
            f"control image {index + 1} is {image.width}x{image.height}, another aspect than the "
            f"{width}x{height} output: crop it, or generate at its aspect"
        )
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def prepare_controls(controls: tuple[Control, ...], size: tuple[int, int]) -> list[PreparedControl]:
    return [
        PreparedControl(c.network, control_hint(c.image, size, i), c.weight, c.start, c.end, c.guess_mode)
        for i, c in enumerate(controls)
    ]


class ControlledUNet(nn.Module):
    """``unet(x, t, context, y, control_scale)`` with the ControlNets' residuals added.

    ``control_scale`` ([B], 1 for rows of the conditional half, 0 for the unconditional) says which rows
    a guess-mode ControlNet guides. The step of a call is the run's step whose timestep is nearest to
    ``t`` (for the start/end fractions, counted as diffusers counts them).
    """

    def __init__(
        self, unet: nn.Module, controls: list[PreparedControl], schedule: NoiseSchedule, sigmas: torch.Tensor
    ) -> None:
        super().__init__()
        self.unet = unet
        self.controls = controls
        self.timesteps = schedule.sigma_to_t(sigmas[:-1].double().cpu()).float()

    def step_fraction(self, t: torch.Tensor) -> tuple[int, int]:
        index = int((self.timesteps - float(t.reshape(-1)[0].cpu())).abs().argmin())
        return index, len(self.timesteps)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        index, total = self.step_fraction(t)
        residuals: list[torch.Tensor] | None = None
        for control in self.controls:
            outside = index / total < control.start or (index + 1) / total > control.end
            if outside or control.weight == 0:
                continue
            network = control.network
            hint = control.hint.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            latent = x[:, : network.config.in_channels]
            outs = network(latent, t, hint, context, y)
            scales = [control.weight] * len(outs)
            if control.guess_mode:
                scales = [control.weight * float(s) for s in torch.logspace(-1, 0, len(outs))]
            rows = None
            if control.guess_mode and control_scale is not None:
                rows = control_scale.to(x.device, x.dtype)[:, None, None, None]
            outs = [o * s if rows is None else o * s * rows for o, s in zip(outs, scales, strict=True)]
            residuals = outs if residuals is None else [a + b for a, b in zip(residuals, outs, strict=True)]
        return self.unet(x, t, context=context, y=y, control=residuals)
