"""The UNet seen as a denoiser in sigma space, and classifier-free guidance around it.

This is the one place that knows the parameterization: the UNet sees the DDPM picture (input scaled
by ``1/sqrt(sigma^2 + 1)``, integer-like timestep ``t``) and predicts eps or v; samplers only see
``denoiser(x, sigma) -> x0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from openldm.sampling.schedule import NoiseSchedule

PREDICTION_TYPES = ("eps", "v")
Cond = Mapping[str, Any]


class Denoiser:
    """``denoiser(x, sigma, context=..., y=..., c_concat=...) -> x0`` for an eps or v UNet.

    ``c_concat`` (inpainting mask + masked image, a depth map, the upscaler's low-res image) is
    concatenated to the scaled input along channels; every other keyword goes to the UNet as is.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str = "eps") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        batch = x.shape[0]
        # Scalings and t in float64 on the CPU (MPS has no float64), then moved next to x.
        sigma64 = torch.as_tensor(sigma).to("cpu", torch.float64).reshape(-1).expand(batch)
        c_in = (sigma64**2 + 1).rsqrt()
        t = self.schedule.sigma_to_t(sigma64).to(x.device, torch.float32)

        def per_sample(v: torch.Tensor) -> torch.Tensor:
            return v.to(x.device, x.dtype)[:, None, None, None]

        x_in = x * per_sample(c_in)
        c_concat = cond.pop("c_concat", None)
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in)], dim=1)
        out = self.unet(x_in, t, **cond).to(x.dtype)  # the UNet casts its input to the dtype it computes in
        if self.prediction_type == "eps":
            return x - per_sample(sigma64) * out
        # v = sqrt(a) eps - sqrt(1 - a) x0 with sqrt(a) = c_in and sqrt(1 - a) = sigma * c_in.
        return per_sample(c_in**2) * x - per_sample(sigma64 * c_in) * out


class CFGDenoiser:
    """Classifier-free guidance: ``x0_uncond + scale * (x0_cond - x0_uncond)``, one batched UNet call.

    ``cond`` / ``uncond`` are the UNet conditioning: a context tensor or a dict of keywords
    (``context``, ``y``, ``c_concat``) whose tensors have batch size 1 or that of ``x``. Guiding x0 is
    guiding eps (or v): at a fixed sigma x0 is an affine function of either. With ``scale == 1`` the
    unconditional half is skipped; so it is at noise levels ``sigma <= guided_above`` (guidance stopped
    for the last steps: the conditional prediction alone, one UNet row instead of two).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: torch.Tensor | Cond,
        uncond: torch.Tensor | Cond | None,
        scale: float,
        guided_above: float = 0.0,
    ) -> None:
        if uncond is None and scale != 1.0:
            raise ValueError(f"guidance scale {scale} needs an unconditional input (uncond)")
        self.denoiser = denoiser
        self.cond = _as_cond(cond)
        self.uncond = _as_cond(uncond) if uncond is not None else None
        self.scale = float(scale)
        self.guided_above = float(guided_above)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        batch = x.shape[0]
        unguided = self.guided_above > 0 and float(torch.as_tensor(sigma).max()) <= self.guided_above
        if self.scale == 1.0 or self.uncond is None or unguided:
            return self.denoiser(x, sigma, **_expanded(self.cond, batch))
        sigma = torch.as_tensor(sigma).reshape(-1).expand(batch)
        both = _concat(_expanded(self.uncond, batch), _expanded(self.cond, batch))
        x0_uncond, x0_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


def _as_cond(cond: torch.Tensor | Cond) -> dict[str, Any]:
    if isinstance(cond, torch.Tensor):
        return {"context": cond}
    return {key: value for key, value in cond.items() if value is not None}


def _expanded(cond: dict[str, Any], batch: int) -> dict[str, Any]:
    """Tensors of batch size 1 repeated to ``batch``; anything else checked."""
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            if value.shape[0] == 1 and batch > 1:
                value = value.expand(batch, *value.shape[1:])
            elif value.shape[0] != batch:
                raise ValueError(f"conditioning {key!r} has batch size {value.shape[0]}, the latents {batch}")
        out[key] = value
    return out


def _concat(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    if first.keys() != second.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(second)} and {sorted(first)}")
    return {key: torch.cat([first[key], second[key]]) for key in first}
