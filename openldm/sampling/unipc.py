"""UniPC (Zhao et al., 2023) in sigma space: diffusers' ``UniPCMultistepScheduler`` defaults for SD.

Order 2, data prediction (``predict_x0``), ``B(h) = expm1(-h)`` ("bh2"), ``lower_order_final``, the
corrector applied at every step but the first. With lambda = -log(sigma), h the lambda increment of a
step, q = sigma' / sigma = exp(-h) and B = q - 1, all updates are diffusers' divided by ``alpha_t``:

- predictor UniP from x at sigma_i to sigma_{i+1} with m0 = x0_i, m1 = x0_{i-1}:
  ``x' = q x - B m0 - B rho D1`` with ``D1 = (m1 - m0) / r``, ``r = (lambda_{i-1} - lambda_i) / h`` and
  rho = 1/2 (order 2; order 1 drops the term, which makes it DPM-Solver++(2M) in disguise);
- corrector UniC, once x0_i is known at the predicted x_i, redoes the previous step from x_{i-1}:
  ``x_i = q x_{i-1} - B m0 - B (rho_0 D1 + rho_1 (x0_i - m0))`` with m0 = x0_{i-1}, m1 = x0_{i-2},
  (rho_0, rho_1) solving ``[[1, 1], [r, 1]] rho = (b_1, b_2)``, ``b_k = k! (-h) phi_{k+1}(-h) / B``
  (order 1: rho_1 = 1/2 alone). The denoiser is not called again: the next predictor starts from the
  corrected x_i with x0_i as evaluated at the uncorrected one.

Orders: the first step is order 1 (warm-up) and so is the last (lower_order_final), whose step to sigma
0 returns x0 itself; the corrector's order is the previous step's. One denoiser call per step.
"""

from __future__ import annotations

import math

import torch

from openldm.sampling.dpm_solver import Callback, Denoiser, schedule_levels

ORDER = 2


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """UniPC-2 (bh2): deterministic, one denoiser call per step. ``generator`` is unused."""
    levels = schedule_levels(sigmas)
    n = len(levels) - 1
    lambdas = [-math.log(s) if s > 0 else math.inf for s in levels]
    x0s: list[torch.Tensor] = []
    x_prev = x
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        if i > 0:
            x = _corrector(x_prev, x0, x0s[-2:], levels, lambdas, i, order=min(ORDER, i))
        x0s = [*x0s[-1:], x0]
        x_prev = x
        x = _predictor(x, x0s, levels, lambdas, i, order=min(ORDER, n - i, i + 1))
        if callback is not None:
            callback(i, n, x, x0)
    return x


def _predictor(
    x: torch.Tensor, x0s: list[torch.Tensor], levels: list[float], lambdas: list[float], i: int, order: int
) -> torch.Tensor:
    """UniP from sigma_i to sigma_{i+1}; ``x0s`` ends with x0_i (and x0_{i-1} before it for order 2)."""
    m0 = x0s[-1]
    if levels[i + 1] == 0:
        return m0
    h = lambdas[i + 1] - lambdas[i]
    q = levels[i + 1] / levels[i]
    b = math.expm1(-h)
    x = q * x - b * m0
    if order == 2:
        r = (lambdas[i - 1] - lambdas[i]) / h
        x = x - (0.5 * b / r) * (x0s[-2] - m0)
    return x


def _corrector(
    x_prev: torch.Tensor,
    x0: torch.Tensor,
    history: list[torch.Tensor],
    levels: list[float],
    lambdas: list[float],
    i: int,
    order: int,
) -> torch.Tensor:
    """UniC: x_i recomputed from x_{i-1} using x0_i; ``history`` ends with x0_{i-1} (x0_{i-2} before)."""
    m0 = history[-1]
    h = lambdas[i] - lambdas[i - 1]
    q = levels[i] / levels[i - 1]
    b = math.expm1(-h)
    x = q * x_prev - b * m0
    if order == 1:
        return x - (0.5 * b) * (x0 - m0)
    r = (lambdas[i - 2] - lambdas[i - 1]) / h
    phi = b / -h - 1.0  # phi_2(-h) * (-h), then b_1 and b_2 as diffusers builds them
    b1 = phi / b
    b2 = 2.0 * (phi / -h - 0.5) / b
    rho0 = (b1 - b2) / (1.0 - r)
    rho1 = b1 - rho0
    return x - (b * rho0 / r) * (history[-2] - m0) - (b * rho1) * (x0 - m0)
