"""Latent consistency sampling (Luo et al. 2023, "Latent Consistency Models"), in sigma space.

A latent consistency model (a full LCM, or a model with an LCM-LoRA applied) maps a noisy latent
straight to its clean estimate, so a few steps suffice (2 to 8). Each step takes the model's denoised
estimate ``x0`` at timestep ``t`` through the consistency boundary condition

    denoised = c_out(t) x0 + c_skip(t) x_t
    c_skip = s^2 / ((10 t)^2 + s^2),   c_out = 10 t / sqrt((10 t)^2 + s^2)

(``s`` = 0.5, ``x_t`` the DDPM latent ``x / sqrt(1 + sigma^2)``), then noises ``denoised`` afresh to
the next timestep (``x' = denoised + sigma' z``); the last step returns ``denoised``. The timesteps are
``steps`` of the 50 the models were distilled on (``k T / 50 - 1``, k = 1..50), picked at evenly spaced
indices from the top, as diffusers' ``LCMScheduler`` picks them; its noise draws are the same too, so a
generator given to both gives the same samples. On a model that is not a consistency model the
sampler still runs, but a few steps give blurred images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from openldm.sampling.dpm_solver import step_noise
from openldm.sampling.schedule import NoiseSchedule, Spacing

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

ORIGINAL_STEPS = 50  # the distillation's timestep grid
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """The descending integer timesteps (float64) of a ``steps``-step run."""
    if not isinstance(steps, int) or not 1 <= steps <= ORIGINAL_STEPS:
        raise ValueError(
            f"the LCM sampler takes 1 to {ORIGINAL_STEPS} steps (its distillation grid), got {steps!r}"
        )
    k = num_timesteps // ORIGINAL_STEPS
    grid = torch.arange(ORIGINAL_STEPS, 0, -1, dtype=torch.float64) * k - 1
    picks = [math.floor(i * ORIGINAL_STEPS / steps) for i in range(steps)]
    return grid[picks]


def lcm_sigmas(schedule: NoiseSchedule, steps: int, spacing: Spacing, karras: bool) -> torch.Tensor:
    """The sigmas of :func:`lcm_timesteps`, then 0 (the LCM grid replaces any spacing)."""
    if karras:
        raise ValueError("the LCM sampler walks its distillation timesteps; Karras sigmas do not apply")
    sigmas = schedule.t_to_sigma(lcm_timesteps(schedule.num_timesteps, steps))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition at timestep ``t``."""
    scaled = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """Latent consistency sampling (see the module docstring). ``schedule`` tells each sigma's timestep
    (default: Stable Diffusion's)."""
    schedule = schedule or NoiseSchedule()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    total = len(sigmas) - 1
    timesteps = schedule.sigma_to_t(sigmas[:-1]).round()
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        c_skip, c_out = boundary_scalings(float(timesteps[i]))
        denoised = x0 * c_out + x * (c_skip / math.sqrt(1.0 + sigma**2))
        x = denoised if i == total - 1 else denoised + step_noise(denoised, generator) * sigma_next
        if callback is not None:
            callback(i, total, x, denoised)
    return x
