"""DPM++ 2M, DPM++ 2M SDE and UniPC against diffusers' multistep schedulers, plus analytic checks.

The parity runs drive one tiny random UNetModel twice: through diffusers' own loop
(``scale_model_input``, UNet, ``step`` with a generator) in the DDPM picture, and through our
Denoiser and sampler in sigma space, from the same initial noise. The schedules end at sigma 0, where
both pictures coincide, so the final latents are compared directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from openldm.nn.unet import UNetModel
from openldm.sampling.denoiser import Denoiser
from openldm.sampling.dpm_solver import multistep_sigmas, sample_dpmpp_2m, sample_dpmpp_2m_sde
from openldm.sampling.schedule import NoiseSchedule
from openldm.sampling.unipc import sample_unipc
from tests.helpers import assert_close_rel, relative_error
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

SEED = 4321
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
SAMPLE_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
MODELS = {"eps": "sd1", "v": "sd2-v"}
SPACINGS = ("leading", "linspace", "trailing")


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.cache
def random_unet(prediction: str) -> UNetModel:
    """The tiny UNet of the eps (SD 1) or v (SD 2) kind, every parameter seeded random."""
    model = UNetModel(TINY[MODELS[prediction]].unet).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return model


class RoundedTimesteps(nn.Module):
    """A UNet fed round(t): what diffusers' multistep schedulers pass it for Karras sigmas (our Denoiser
    passes the continuous t of each sigma, as k-diffusion does)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.unet(x, timesteps.round(), **cond)


def diffusers_scheduler(
    name: str, prediction: str, spacing: str, karras: bool, final_sigmas_type: str = "zero"
) -> Any:
    common = {
        **SD_SCHEDULER,
        "final_sigmas_type": final_sigmas_type,
        "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[prediction],
        "timestep_spacing": spacing,
        "use_karras_sigmas": karras,
    }
    if name == "unipc":
        return UniPCMultistepScheduler(**common)
    algorithm = {"dpmpp_2m": "dpmsolver++", "dpmpp_2m_sde": "sde-dpmsolver++"}[name]
    return DPMSolverMultistepScheduler(**common, algorithm_type=algorithm)


def inputs(prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit initial noise (1, 4, 8, 8) and a fixed text context."""
    gen = torch.Generator().manual_seed(SEED + 1)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 7, TINY[MODELS[prediction]].unet.context_dim, generator=gen)
    return noise, context


@functools.cache
def run_diffusers(
    name: str, prediction: str, spacing: str, steps: int, karras: bool = False, final: str = "zero"
) -> tuple[torch.Tensor, torch.Generator]:
    scheduler = diffusers_scheduler(name, prediction, spacing, karras, final)
    scheduler.set_timesteps(steps)
    unet = random_unet(prediction)
    noise, context = inputs(prediction)
    generator = torch.Generator().manual_seed(SEED + 2)
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(latents, t), t, context=context)
            kwargs = {} if name == "unipc" else {"generator": generator}
            latents = scheduler.step(out, t, latents, **kwargs).prev_sample
    return latents, generator


@functools.cache
def run_ours(
    name: str, prediction: str, spacing: str, steps: int, karras: bool = False, final: str = "zero"
) -> tuple[torch.Tensor, torch.Generator, int]:
    """Our final latent in the DDPM picture (x itself when the schedule ends at sigma 0)."""
    schedule = NoiseSchedule()
    sigmas = multistep_sigmas(schedule, steps, spacing, karras=karras)
    if final == "sigma_min":
        sigmas[-1] = schedule.sigma_min
    unet: nn.Module = random_unet(prediction)
    if karras:
        unet = RoundedTimesteps(unet)
    denoiser = Denoiser(unet, schedule, prediction)
    noise, context = inputs(prediction)
    generator = torch.Generator().manual_seed(SEED + 2)
    calls = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma))
        return denoiser(x, sigma, context=context)

    # diffusers starts these schedulers from unit noise in the DDPM picture: x = z * sqrt(1 + sigma^2).
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    x = SAMPLE_FNS[name](model, x, sigmas, generator=generator)
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2), generator, len(calls)


PARITY_CASES = [
    ("dpmpp_2m", "eps", "leading", 10),
    ("dpmpp_2m", "v", "leading", 20),
    ("dpmpp_2m", "eps", "linspace", 15),
    ("dpmpp_2m", "v", "trailing", 10),
    ("dpmpp_2m_sde", "eps", "leading", 10),
    ("dpmpp_2m_sde", "v", "linspace", 12),
    ("dpmpp_2m_sde", "eps", "trailing", 15),
    ("unipc", "eps", "leading", 10),
    ("unipc", "v", "leading", 10),
    ("unipc", "eps", "linspace", 12),
    ("unipc", "v", "trailing", 10),
]


@pytest.mark.parametrize(("name", "prediction", "spacing", "steps"), PARITY_CASES)
def test_matches_diffusers(name: str, prediction: str, spacing: str, steps: int) -> None:
    expected, their_gen = run_diffusers(name, prediction, spacing, steps)
    assert expected.abs().max() > 1.0, "reference output is trivially small"
    actual, our_gen, calls = run_ours(name, prediction, spacing, steps)
    assert calls == steps
    err = assert_close_rel(actual, expected, tol=1e-4)
    # The SDE sampler consumed exactly the generator draws diffusers' step did.
    assert torch.equal(our_gen.get_state(), their_gen.get_state())
    print(f"{name} {prediction} {spacing} {steps} steps: relative error vs diffusers {err:.2e}")


@pytest.mark.parametrize(
    ("name", "prediction", "steps"),
    [("dpmpp_2m", "eps", 15), ("dpmpp_2m", "v", 10), ("dpmpp_2m_sde", "eps", 10), ("unipc", "eps", 10)],
)
def test_matches_diffusers_with_karras_sigmas(name: str, prediction: str, steps: int) -> None:
    expected, _ = run_diffusers(name, prediction, "leading", steps, karras=True)
    actual, _, _ = run_ours(name, prediction, "leading", steps, karras=True)
    err = assert_close_rel(actual, expected, tol=1e-4)
    print(f"{name} {prediction} karras {steps} steps: relative error vs diffusers {err:.2e}")


@pytest.mark.parametrize(("name", "steps"), [("dpmpp_2m", 16), ("unipc", 10)])
def test_matches_diffusers_ending_at_sigma_min(name: str, steps: int) -> None:
    """``final_sigmas_type="sigma_min"``: from 15 steps on diffusers keeps DPM++'s last step second order."""
    expected, _ = run_diffusers(name, "eps", "leading", steps, final="sigma_min")
    actual, _, _ = run_ours(name, "eps", "leading", steps, final="sigma_min")
    err = assert_close_rel(actual, expected, tol=1e-4)
    print(f"{name} eps sigma_min-final {steps} steps: relative error vs diffusers {err:.2e}")


def test_the_three_samplers_differ() -> None:
    """Parity above is not parity of one shared update: the corrector and the noise matter (the runs are
    cached from the parity tests)."""
    runs = {name: run_ours(name, "eps", "leading", 10)[0] for name in SAMPLE_FNS}
    assert relative_error(runs["unipc"], runs["dpmpp_2m"]) > 1e-3
    assert relative_error(runs["dpmpp_2m_sde"], runs["dpmpp_2m"]) > 1e-2


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 15, 20, 50, 100])
def test_sigmas_and_timesteps_match_diffusers(name: str, spacing: str, karras: bool, steps: int) -> None:
    scheduler = diffusers_scheduler(name, "eps", spacing, karras)
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule()
    sigmas = multistep_sigmas(schedule, steps, spacing, karras=karras)
    assert sigmas.dtype == torch.float64 and float(sigmas[-1]) == 0.0
    # diffusers builds alphas_cumprod in float32: ~3e-5 relative at the smallest sigma, where
    # 1 - alphas_cumprod is 8.5e-4; ours is float64.
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=5e-5, atol=0)
    timesteps = schedule.sigma_to_t(sigmas[:-1]).round().long()
    assert torch.equal(timesteps, scheduler.timesteps)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 1000])
def test_multistep_sigmas_rejects_bad_steps(bad: Any) -> None:
    with pytest.raises(ValueError, match="steps must be an integer"):
        multistep_sigmas(NoiseSchedule(), bad)


def test_multistep_sigmas_rejects_unknown_spacing() -> None:
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'"):
        multistep_sigmas(NoiseSchedule(), 10, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        multistep_sigmas(NoiseSchedule(), 10, "middle", karras=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SAMPLE_FNS)
@pytest.mark.parametrize(
    "sigmas", [[1.0], [2.0, 3.0, 0.0], [2.0, 2.0, 0.0], [2.0, 0.0, 0.0], [2.0, -1.0], [[2.0, 0.0]]]
)
def test_rejects_bad_schedules(name: str, sigmas: list[Any]) -> None:
    with pytest.raises(ValueError, match="sigmas must be"):
        SAMPLE_FNS[name](lambda x, s: x, torch.zeros(3), torch.tensor(sigmas, dtype=torch.float64))


# Analytic checks with exact denoisers in float64.

MU, DATA_STD = 0.5, 1.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for data ~ N(MU, DATA_STD^2) per element and x = x0 + sigma * noise."""
    shrink = DATA_STD**2 / (DATA_STD**2 + float(sigma) ** 2)
    return MU + shrink * (x - MU)


def gaussian_flow(x_start: torch.Tensor, sigma_start: float, sigma: float) -> torch.Tensor:
    """The exact probability-flow ODE solution for Gaussian data: the deviation from the mean scales
    with the marginal standard deviation sqrt(DATA_STD^2 + sigma^2)."""
    return MU + (x_start - MU) * math.sqrt((DATA_STD**2 + sigma**2) / (DATA_STD**2 + sigma_start**2))


def start_noise(sigmas: torch.Tensor, n: int = 20000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spread = math.sqrt(DATA_STD**2 + float(sigmas[0]) ** 2)
    return MU + spread * torch.randn(n, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("name", SAMPLE_FNS)
def test_point_mass_returns_the_data(name: str) -> None:
    data = torch.linspace(-2.0, 3.0, 64, dtype=torch.float64)
    sigmas = multistep_sigmas(NoiseSchedule(), 12)
    x_start = start_noise(sigmas, 64)
    states: list[torch.Tensor] = []
    out = SAMPLE_FNS[name](
        lambda x, s: data.clone(),
        x_start.clone(),
        sigmas,
        generator=torch.Generator().manual_seed(1),
        callback=lambda i, total, x, x0: states.append(x),
    )
    torch.testing.assert_close(out, data, rtol=0, atol=1e-12)
    assert len(states) == 12
    if name != "dpmpp_2m_sde":
        # Exponential integrators are exact for a point mass: x = data + sigma / sigma_0 (x_start - data).
        for i, x in enumerate(states):
            exact = data + float(sigmas[i + 1] / sigmas[0]) * (x_start - data)
            torch.testing.assert_close(x, exact, rtol=1e-12, atol=1e-12)


def flow_error(name: str, steps: int) -> float:
    """Max error along the run (every state before the final jump to sigma 0) against the exact flow,
    relative to the largest initial deviation."""
    sigmas = multistep_sigmas(NoiseSchedule(), steps, karras=True)
    x_start = start_noise(sigmas)
    sigma_start = float(sigmas[0])
    errors: list[float] = []

    def record(i: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i < total - 1:
            exact = gaussian_flow(x_start, sigma_start, float(sigmas[i + 1]))
            errors.append(float((x - exact).abs().max()))

    SAMPLE_FNS[name](gaussian_denoiser, x_start.clone(), sigmas, callback=record)
    return max(errors) / float((x_start - MU).abs().max())


@pytest.mark.parametrize(("name", "max_ratio"), [("dpmpp_2m", 0.3), ("unipc", 0.2)])
def test_gaussian_data_converges_at_the_solver_order(name: str, max_ratio: float) -> None:
    """Doubling the steps divides the error by about 4 for DPM++ 2M (order 2) and about 8 for UniPC
    (order 2 predictor + corrector = order 3); a first-order method would only halve it."""
    coarse, fine = flow_error(name, 20), flow_error(name, 40)
    assert coarse < 2e-3
    assert fine / coarse < max_ratio, f"error ratio {fine / coarse:.3f} when doubling the steps"


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_gaussian_data_samples_have_the_data_distribution(name: str) -> None:
    sigmas = multistep_sigmas(NoiseSchedule(), 20, karras=True)
    x_start = start_noise(sigmas, 100000)
    out = SAMPLE_FNS[name](gaussian_denoiser, x_start.clone(), sigmas)
    exact = gaussian_flow(x_start, float(sigmas[0]), 0.0)
    assert float((out - exact).abs().max() / (x_start - MU).abs().max()) < 2e-3
    assert abs(float(out.mean()) - MU) < 0.01 and abs(float(out.std()) - DATA_STD) < 0.03


def test_sde_samples_have_the_data_distribution() -> None:
    sigmas = multistep_sigmas(NoiseSchedule(), 100, karras=True)
    x_start = start_noise(sigmas, 200000)
    out = sample_dpmpp_2m_sde(gaussian_denoiser, x_start, sigmas, generator=torch.Generator().manual_seed(1))
    assert abs(float(out.mean()) - MU) < 0.015
    assert abs(float(out.std()) - DATA_STD) < 0.015


def test_sde_same_seed_same_result() -> None:
    sigmas = multistep_sigmas(NoiseSchedule(), 10)
    x_start = start_noise(sigmas, 256).float()

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample_dpmpp_2m_sde(gaussian_denoiser, x_start.clone(), sigmas, generator=gen)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert relative_error(other, first) > 1e-2


# The registry entries (added to openldm/sampling/samplers.py by the lead).

REGISTRY = {
    "dpmpp_2m": ("DPM++ 2M", False),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", True),
    "unipc": ("UniPC", False),
}


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_entry(name: str) -> None:
    from openldm.sampling.samplers import SAMPLERS

    info = SAMPLERS[name]
    display_name, stochastic = REGISTRY[name]
    assert (info.fn, info.display_name, info.spacing, info.stochastic) == (
        SAMPLE_FNS[name],
        display_name,
        "leading",
        stochastic,
    )
    schedule = NoiseSchedule()
    for spacing, karras in [(None, False), ("linspace", False), ("trailing", True)]:
        expected = multistep_sigmas(schedule, 10, spacing or "leading", karras=karras)
        assert torch.equal(info.sigmas(schedule, 10, spacing, karras=karras), expected)
    sigmas = multistep_sigmas(schedule, 10)
    assert info.initial_sigma(sigmas) == pytest.approx(math.sqrt(1.0 + float(sigmas[0]) ** 2), rel=1e-12)
