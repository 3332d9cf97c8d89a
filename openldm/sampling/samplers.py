"""Samplers as pure functions of one signature, and the registry that names them.

``sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x`` where
``denoiser(x, sigma) -> x0`` works in sigma space (``x = x0 + sigma * eps``), ``x`` is the start at
``sigmas[0]`` and ``sigmas`` descends (to 0, or to the first training sigma for the reference's
DDIM/PLMS, see :meth:`SamplerInfo.sigmas`). ``callback(step, total, x, x0)`` runs after every step.
Noise is drawn on the generator's device and then moved, so a CPU generator gives the same numbers on
every device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from openldm.sampling.dpm_solver import multistep_sigmas, sample_dpmpp_2m, sample_dpmpp_2m_sde
from openldm.sampling.lcm import lcm_sigmas, sample_lcm
from openldm.sampling.schedule import NoiseSchedule, Spacing
from openldm.sampling.unipc import sample_unipc

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
SamplerFn = Callable[..., torch.Tensor]


def _as_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas).to("cpu", torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule of at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    if bool((sigmas[1:] > sigmas[:-1]).any()) or float(sigmas[-1]) < 0:
        raise ValueError("sigmas must be non-increasing and non-negative")
    return sigmas


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the move to ``sigma_next`` into a deterministic part (down) and fresh noise (up)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _ddpm_readout(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The DDPM latent at the last sigma: x itself when the schedule ends in 0."""
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - x0) / sigma``."""
    sigmas = _as_sigmas(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback(i, total, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Euler down to ``sigma_down``, then fresh noise up to ``sigma_next`` (ancestral sampling)."""
    sigmas = _as_sigmas(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        down, up = _ancestral_step(sigma, sigma_next, eta)
        x = x + (x - x0) / sigma * (down - sigma)
        if up > 0:
            x = x + _noise(x, generator) * up
        if callback is not None:
            callback(i, total, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, algorithm 1 without churn); Euler on the last step."""
    sigmas = _as_sigmas(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        d = (x - x0) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - denoiser(x_euler, sigmas[i + 1])) / sigma_next
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback(i, total, x, x0)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node ``sigmas[i - j]``
    among the nodes ``sigmas[i], ..., sigmas[i - order + 1]``: exact, by polynomial integration."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    basis = basis / float(np.prod([sigmas[i - j] - node for node in others]))
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep: the last ``order`` derivatives interpolated in sigma and integrated exactly."""
    if order < 1:
        raise ValueError(f"LMS order must be at least 1, got {order}")
    sigmas = _as_sigmas(sigmas)
    nodes = sigmas.numpy()
    total = len(sigmas) - 1
    history: list[torch.Tensor] = []
    for i in range(total):
        x0 = denoiser(x, sigmas[i])
        history.append((x - x0) / float(sigmas[i]))
        if len(history) > order:
            history.pop(0)
        current = min(i + 1, order)
        coeffs = [lms_coefficient(nodes, i, j, current) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(history), strict=True))
        if callback is not None:
            callback(i, total, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in sigma space: ``x0 + sigma_down * eps + sigma_up * noise``.

    With eta = 0 this is Euler's step; ``sigma_up`` is DDIM's sigma_t divided by sqrt(alpha_prev). Noise
    is drawn on every step that adds any, in order, as diffusers' DDIMScheduler draws it. A schedule
    ending above 0 (the reference's last step onto ``alphas_cumprod[0]``) returns that DDPM latent.
    """
    sigmas = _as_sigmas(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        eps = (x - x0) / sigma
        down, up = _ancestral_step(sigma, sigma_next, eta)
        x = x0 + eps * down
        if up > 0:
            x = x + _noise(x, generator) * up
        if callback is not None:
            callback(i, total, x, x0)
    return _ddpm_readout(x, sigmas)


@torch.no_grad()
def sample_plms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reference's PLMS (Liu et al. 2022, pseudo linear multistep) in sigma space.

    The first step is a pseudo improved Euler step (the mean of eps at both ends of a DDIM step), the
    next ones Adams-Bashforth of order 2, 3 and 4 over the eps of the previous steps. Each step is the
    DDIM step ``x + (sigma_next - sigma) * eps'``. The eps are those of each model evaluation, so an
    eps or a v model gives the same method. A schedule ending above 0 returns that DDPM latent.
    """
    sigmas = _as_sigmas(sigmas)
    total = len(sigmas) - 1
    old_eps: list[torch.Tensor] = []
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        eps = (x - denoiser(x, sigmas[i])) / sigma
        if not old_eps and sigma_next > 0:
            x_next = x + eps * (sigma_next - sigma)
            eps_next = (x_next - denoiser(x_next, sigmas[i + 1])) / sigma_next
            eps_prime = (eps + eps_next) / 2
        elif not old_eps:  # one step straight to sigma 0: no second evaluation possible
            eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x0 = x - eps_prime * sigma
        x = x + eps_prime * (sigma_next - sigma)
        old_eps = [*old_eps[-2:], eps]
        if callback is not None:
            callback(i, total, x, x0)
    return _ddpm_readout(x, sigmas)


def _sigma_start(sigmas: torch.Tensor) -> float:
    return float(sigmas[0])


def _unit_ddpm_start(sigmas: torch.Tensor) -> float:
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and how to drive it.

    ``initial_sigma(sigmas)`` is the standard deviation of the starting noise in sigma space;
    ``ddpm_final`` marks samplers whose last step lands on the first training sigma
    (``alphas_cumprod[0]``) as the reference's DDIM/PLMS (and diffusers with set_alpha_to_one=False) do.
    """

    fn: SamplerFn
    display_name: str
    spacing: Spacing
    initial_sigma: Callable[[torch.Tensor], float]
    stochastic: bool = False
    ddpm_final: bool = False
    schedule_fn: Callable[[NoiseSchedule, int, Spacing, bool], torch.Tensor] | None = None

    @property
    def has_eta(self) -> bool:
        """Whether the sampler takes an ``eta`` (DDIM's, the ancestral samplers' noise amount)."""
        return "eta" in inspect.signature(self.fn).parameters

    @property
    def takes_schedule(self) -> bool:
        """Whether the sampler needs the noise schedule (to tell each sigma's timestep: LCM)."""
        return "schedule" in inspect.signature(self.fn).parameters

    def sigmas(
        self, schedule: NoiseSchedule, steps: int, spacing: Spacing | None = None, karras: bool = False
    ) -> torch.Tensor:
        """The sigma schedule this sampler expects: ``schedule.sigmas`` with its final 0 replaced by the
        first training sigma for ``ddpm_final`` samplers."""
        if self.schedule_fn is not None:
            return self.schedule_fn(schedule, steps, spacing or self.spacing, karras)
        sigmas = schedule.sigmas(steps, spacing or self.spacing, karras=karras)
        if self.ddpm_final:
            sigmas[-1] = min(schedule.sigma_min, float(sigmas[-2]))
        return sigmas


SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(sample_ddim, "DDIM", "leading", _unit_ddpm_start, stochastic=True, ddpm_final=True),
    "plms": SamplerInfo(sample_plms, "PLMS", "leading", _unit_ddpm_start, ddpm_final=True),
    "euler": SamplerInfo(sample_euler, "Euler", "linspace", _sigma_start),
    "euler_a": SamplerInfo(sample_euler_ancestral, "Euler a", "linspace", _sigma_start, stochastic=True),
    "heun": SamplerInfo(sample_heun, "Heun", "linspace", _sigma_start),
    "lms": SamplerInfo(sample_lms, "LMS", "linspace", _sigma_start),
    "dpmpp_2m": SamplerInfo(
        sample_dpmpp_2m, "DPM++ 2M", "leading", _unit_ddpm_start, schedule_fn=multistep_sigmas
    ),
    "dpmpp_2m_sde": SamplerInfo(
        sample_dpmpp_2m_sde,
        "DPM++ 2M SDE",
        "leading",
        _unit_ddpm_start,
        stochastic=True,
        schedule_fn=multistep_sigmas,
    ),
    "unipc": SamplerInfo(sample_unipc, "UniPC", "leading", _unit_ddpm_start, schedule_fn=multistep_sigmas),
    "lcm": SamplerInfo(
        sample_lcm, "LCM", "leading", _unit_ddpm_start, stochastic=True, schedule_fn=lcm_sigmas
    ),
}


def get_sampler(name: str) -> SamplerInfo:
    """The registered sampler ``name``; a ValueError listing the known names otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None
