"""SD's training noise schedule, timestep spacing and the sigma schedules the samplers walk.

Everything is float64. Sigma space is k-diffusion's: ``x = x0 + sigma * eps`` where ``x`` is the DDPM
latent divided by ``sqrt(alphas_cumprod)``, so ``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``.
"""

from __future__ import annotations

from typing import Literal

import torch

from openldm.config import ScheduleConfig

Spacing = Literal["leading", "linspace", "trailing"]
SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
KARRAS_RHO = 7.0


class NoiseSchedule:
    """The discrete DDPM schedule (scaled-linear betas) and conversions between t and sigma."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        n = self.config.num_timesteps
        root = torch.linspace(self.config.beta_start**0.5, self.config.beta_end**0.5, n, dtype=torch.float64)
        self.betas = root**2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # The 1000 training sigmas (``sigmas`` is the method giving a sampling schedule).
        self.train_sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.train_sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous timestep of ``sigma`` by linear interpolation in log sigma, clamped to [0, T-1]."""
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.to(torch.float64).clamp_min(1e-30).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma.reshape(-1) - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        t = low.to(torch.float64) + w.clamp(0.0, 1.0)
        return t.reshape(log_sigma.shape).to(sigma.dtype if sigma.is_floating_point() else torch.float64)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep.

        Interpolated linearly in sigma, as diffusers' discrete schedulers do, so that sigma schedules match
        theirs exactly; at integer timesteps this is the training sigma itself.
        """
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        sigmas = self.train_sigmas.to(t.device)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return (1.0 - w) * sigmas[low] + w * sigmas[low + 1]

    def timesteps(self, steps: int, spacing: Spacing = "leading") -> torch.Tensor:
        """The descending float64 timesteps of a ``steps``-step sampling run.

        "leading" is the reference DDIM/PLMS spacing (``range(0, T, T // steps) + 1``, diffusers' SD
        configs with steps_offset 1); "linspace" is ``linspace(0, T-1, steps)`` (fractional, as diffusers'
        k-diffusion schedulers use it); "trailing" ends exactly at T-1.
        """
        n = self.num_timesteps
        if not isinstance(steps, int) or steps < 1 or steps > n:
            raise ValueError(f"steps must be an integer between 1 and {n}, got {steps!r}")
        if spacing == "leading":
            t = torch.arange(steps, dtype=torch.float64) * (n // steps) + 1
        elif spacing == "linspace":
            t = torch.linspace(0, n - 1, steps, dtype=torch.float64)
        elif spacing == "trailing":
            t = (torch.arange(n, 0, -n / steps, dtype=torch.float64).round() - 1).flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
        return t.flip(0)

    def sigmas(
        self, steps: int, spacing: Spacing = "leading", karras: bool = False, rho: float = KARRAS_RHO
    ) -> torch.Tensor:
        """Descending float64 sigmas of a ``steps``-step run, ``steps + 1`` entries, the last one 0.

        With ``karras`` the sigmas are Karras et al.'s (``rho`` = 7) between the first and last sigma of
        the spaced schedule (for "linspace" the schedule's own sigma_max and sigma_min), as diffusers'
        ``use_karras_sigmas`` does.
        """
        sigmas = self.t_to_sigma(self.timesteps(steps, spacing))
        if karras:
            sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]), rho)
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``steps`` sigmas from sigma_max to sigma_min, even in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
