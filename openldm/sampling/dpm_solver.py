"""DPM-Solver++(2M) and its SDE variant, in sigma space (``x = x0 + sigma * eps``).

Lu et al. (2022), "DPM-Solver++": a multistep exponential integrator of the data-prediction ODE in
lambda = -log(sigma). The step from sigma to sigma' only involves ``q = sigma' / sigma = exp(-h)``:

    ODE  x' = q x + (1 - q) D
    SDE  x' = q^2 x + (1 - q^2) D + sigma' sqrt(1 - q^2) z

where D is the denoised estimate x0 (first order) or the midpoint extrapolation
``x0 + (x0 - x0_prev) / (2 r)``, ``r = h_prev / h`` (second order). These are diffusers'
``DPMSolverMultistepScheduler`` updates (``solver_order=2``, ``solver_type="midpoint"``,
``lower_order_final=True``) divided through by ``alpha_t``. As there: the first step is first order,
and so is the last one when it ends at sigma 0 (``final_sigmas_type="zero"``) or the run has fewer
than 15 steps; a step to sigma 0 returns the denoised estimate itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from openldm.sampling.schedule import NoiseSchedule, Spacing, karras_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

# diffusers keeps the last step second order for runs of at least this many steps when the final sigma
# is not 0 (``lower_order_final`` only applies below it).
LOWER_ORDER_FINAL_BELOW = 15


def multistep_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: Spacing = "leading", karras: bool = False
) -> torch.Tensor:
    """The float64 sigma schedule (``steps + 1`` entries, the last 0) of diffusers' multistep solvers.

    ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` space their timesteps unlike the
    DDIM / Euler family: "leading" and "linspace" place ``steps + 1`` points and drop the final one
    (``t = k * (T // (steps + 1)) + 1`` and ``round(linspace(0, T - 1, steps + 1))``); "trailing" is the
    usual one. Karras sigmas span the whole training range (``sigma_min`` to ``sigma_max``) whatever the
    spacing; diffusers then feeds the UNet the rounded timestep of each Karras sigma.
    """
    n = schedule.num_timesteps
    if not isinstance(steps, int) or steps < 1 or steps >= n:
        raise ValueError(f"steps must be an integer between 1 and {n - 1}, got {steps!r}")
    if spacing not in ("leading", "linspace", "trailing"):
        raise ValueError(f"unknown timestep spacing {spacing!r}; use 'leading', 'linspace' or 'trailing'")
    if karras:
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    else:
        if spacing == "leading":
            t = torch.arange(steps, 0, -1, dtype=torch.float64) * (n // (steps + 1)) + 1
        elif spacing == "linspace":
            t = torch.linspace(0, n - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        else:
            t = torch.arange(n, 0, -n / steps, dtype=torch.float64).round() - 1
        sigmas = schedule.t_to_sigma(t)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def schedule_levels(sigmas: torch.Tensor) -> list[float]:
    """``sigmas`` as Python floats (float64 step coefficients on any device), checked."""
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule of at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    if bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) < 0:
        raise ValueError("sigmas must be strictly decreasing and non-negative (only the last one may be 0)")
    return sigmas.tolist()


def step_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn in float32 on the generator's device, then moved.

    The draw is diffusers' ``randn_tensor(x.shape, generator, dtype=float32)`` for a single generator, so
    a run with the same generator state consumes and produces the same numbers as theirs.
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): deterministic, one denoiser call per step. ``generator`` is unused."""
    return _dpmpp_2m(denoiser, x, sigmas, sde=False, generator=None, callback=callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), diffusers' ``algorithm_type="sde-dpmsolver++"``.

    Every step draws one float32 tensor shaped like ``x`` from ``generator`` (see ``step_noise``), the
    last step included although its noise is multiplied by 0, exactly as diffusers' ``step`` does, so a
    generator passed to both gives the same samples and leaves the same state behind.
    """
    return _dpmpp_2m(denoiser, x, sigmas, sde=True, generator=generator, callback=callback)


def _dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sde: bool,
    generator: torch.Generator | None,
    callback: Callback | None,
) -> torch.Tensor:
    levels = schedule_levels(sigmas)
    n = len(levels) - 1
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigmas[i])
        noise = step_noise(x, generator) if sde else None
        last_lower = i == n - 1 and (sigma_next == 0 or n < LOWER_ORDER_FINAL_BELOW)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        d = x0
        if prev_x0 is not None and not last_lower:
            d = x0 + (x0 - prev_x0) * (h / (2.0 * prev_h))
        if sigma_next == 0:
            x = d
        elif noise is None:
            q = sigma_next / sigma
            x = q * x + (1.0 - q) * d
        else:
            q2, one_minus_q2 = math.exp(-2.0 * h), -math.expm1(-2.0 * h)
            x = q2 * x + one_minus_q2 * d + (sigma_next * math.sqrt(one_minus_q2)) * noise
        prev_x0, prev_h = x0, h
        if callback is not None:
            callback(i, n, x, x0)
    return x
