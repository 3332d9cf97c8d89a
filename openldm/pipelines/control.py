"""Guidance by image: ControlNets and T2I-Adapters wrapped around the UNet for one sampling run.

Each :class:`~openldm.pipelines.options.Control` brings a ControlNet, its control image, a weight and
the fraction of the steps it guides (``start`` to ``end``, as diffusers' ``control_guidance_start`` /
``_end`` and the web UI's "starting / ending control step") and a mode, the web UI's control modes:
``balanced`` guides both halves of classifier-free guidance; ``prompt`` ("my prompt is more important")
scales its residuals from 0.1 (first block) to 1 (middle) on both; ``control`` ("ControlNet is more
important", the reference's and diffusers' guess mode) does that on the conditional half only. (The
web UI's ramp, 0.825 ** (12 - i), and the reference's, 10 ** (i / 12 - 1), differ by under 0.5%; this is
the latter.) The residuals of all ControlNets add up.

A T2I-Adapter (a :class:`~openldm.nn.t2i_adapter.T2IAdapter` in the same ``Control``) reads its image
once per run; its features, times its weight, add to the UNet's encoder on both halves of guidance
during its fraction of the steps (the other modes are a ControlNet's and are refused for it). The features of
all adapters add up too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from openldm.nn.controlnet import ControlNetModel
from openldm.nn.t2i_adapter import T2IAdapter
from openldm.pipelines.options import Control, ControlMode
from openldm.sampling.schedule import NoiseSchedule

ASPECT_TOLERANCE = 0.01


@dataclass
class PreparedControl:
    network: ControlNetModel | T2IAdapter
    hint: torch.Tensor  # [1, C, H, W] in [0, 1], at the output's size
    weight: float
    start: float
    end: float
    mode: ControlMode
    features: list[torch.Tensor] | None = None  # a T2I-Adapter's, made at its first step

    def guides(self, index: int, total: int) -> bool:
        return self.weight != 0 and self.start <= index / total and (index + 1) / total <= self.end


def check_control_aspect(image_size: tuple[int, int], output_size: tuple[int, int], index: int) -> None:
    """A control image (width, height) of another aspect than the output (width, height; (1, 1): a
    square of the model's default size) is an error."""
    (w, h), (width, height) = image_size, output_size
    if abs(math.log((w / h) / (width / height))) > ASPECT_TOLERANCE:
        output = "square" if output_size == (1, 1) else f"{width}x{height}"
        raise ValueError(
            f"control image {index + 1} is {w}x{h}, another aspect than the {output} output: "
            "crop it, or generate at its aspect"
        )


def control_hint(
    image: Image.Image | torch.Tensor, size: tuple[int, int], index: int, channels: int = 3
) -> torch.Tensor:
    """The control image as ``[1, channels, H, W]`` in [0, 1] at ``size`` (height, width): resized
    (Lanczos) when its aspect is the output's; another aspect is an error (cropping it is the user's
    choice). One channel is the image in grey (the sketch T2I-Adapters')."""
    height, width = size
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        found = tuple(tensor.shape[-2:])
        if found != (height, width):
            raise ValueError(
                f"control image {index + 1} is {found[1]}x{found[0]}, the output {width}x{height}"
            )
        if tensor.shape[1] != channels:
            raise ValueError(
                f"control image {index + 1} has {tensor.shape[1]} channels, its network reads {channels}"
            )
        return tensor.float()
    check_control_aspect(image.size, (width, height), index)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return (tensor.permute(2, 0, 1) if channels == 3 else tensor[None])[None]


def _hint_channels(network: ControlNetModel | T2IAdapter) -> int:
    return network.config.in_channels if isinstance(network, T2IAdapter) else network.hint_channels


def prepare_controls(controls: tuple[Control, ...], size: tuple[int, int]) -> list[PreparedControl]:
    for i, c in enumerate(controls):
        if c.mode != "balanced" and isinstance(c.network, T2IAdapter):
            raise ValueError(
                f"control {i + 1} is a T2I-Adapter: control mode {c.mode!r} is for ControlNets only"
            )
    return [
        PreparedControl(
            c.network,
            control_hint(c.image, size, i, _hint_channels(c.network)),
            c.weight,
            c.start,
            c.end,
            c.mode,
        )
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
        features: list[torch.Tensor] | None = None
        for control in self.controls:
            if not control.guides(index, total):
                continue
            network = control.network
            if isinstance(network, T2IAdapter):
                mine = [f.to(x.dtype).expand(x.shape[0], -1, -1, -1) for f in self._features(control, x)]
                features = mine if features is None else [a + b for a, b in zip(features, mine, strict=True)]
                continue
            hint = control.hint.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            latent = x[:, : network.config.in_channels]
            outs = network(latent, t, hint, context, y)
            scales = [control.weight] * len(outs)
            if control.mode != "balanced":
                scales = [control.weight * float(s) for s in torch.logspace(-1, 0, len(outs))]
            rows = None
            if control.mode == "control" and control_scale is not None:
                rows = control_scale.to(x.device, x.dtype)[:, None, None, None]
            outs = [o * s if rows is None else o * s * rows for o, s in zip(outs, scales, strict=True)]
            residuals = outs if residuals is None else [a + b for a, b in zip(residuals, outs, strict=True)]
        return self.unet(x, t, context=context, y=y, control=residuals, features=features)

    @staticmethod
    def _features(control: PreparedControl, x: torch.Tensor) -> list[torch.Tensor]:
        if control.features is None:
            adapter = control.network
            assert isinstance(adapter, T2IAdapter)
            with torch.no_grad():
                maps = adapter(control.hint.to(x.device))
            control.features = [m * control.weight for m in maps]
        return control.features
