"""Schedule, denoiser and samplers: parity with diffusers' schedulers on a tiny random UNet, the
reference PLMS restated, and analytic checks with perfect denoisers of known data distributions."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from openldm.config import ScheduleConfig
from openldm.nn.unet import UNetModel
from openldm.sampling.denoiser import CFGDenoiser, Denoiser
from openldm.sampling.samplers import SAMPLERS, get_sampler, lms_coefficient
from openldm.sampling.schedule import NoiseSchedule, karras_sigmas
from tests.helpers import assert_close_rel, relative_error
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

SEED = 4321
SD_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
DIFFUSERS_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False, "clip_sample": False}),
    "plms": (PNDMScheduler, {"set_alpha_to_one": False, "skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
# diffusers' schedulers call np.array on tensors, which numpy 2 warns about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("single_thread"),
]


@functools.cache
def tiny_unet() -> UNetModel:
    """The tiny SD 1 UNet with seeded random weights; the output conv is scaled so eps and v are O(1)."""
    model = UNetModel(TINY["sd1"].unet).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
        model.out[2].weight.mul_(10.0)
        model.out[2].bias.mul_(10.0)
    return model


def context(seed: int = SEED + 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 7, 128, generator=torch.Generator().manual_seed(seed))


def start_noise(batch: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(SEED + 2))


def diffusers_scheduler(name: str, prediction: str, steps: int, **overrides: Any) -> Any:
    cls, extra = DIFFUSERS_SCHEDULERS[name]
    config = {
        **SD_SCHEDULER,
        **extra,
        "timestep_spacing": SAMPLERS[name].spacing,
        "prediction_type": PREDICTION[prediction],
        **overrides,
    }
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def run_diffusers(
    scheduler: Any,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    uncond: torch.Tensor | None = None,
    scale: float = 1.0,
    step_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """diffusers' sampling loop (the one in StableDiffusionPipeline), driving our tiny UNet."""
    unet = tiny_unet()
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        if uncond is None:
            out = unet(model_in, t, context=cond)
        else:
            out_uncond, out_cond = unet(
                torch.cat([model_in] * 2), t, context=torch.cat([uncond, cond])
            ).chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents, **(step_kwargs or {})).prev_sample
    return latents


def run_ours(
    name: str,
    prediction: str,
    steps: int,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    karras: bool = False,
    uncond: torch.Tensor | None = None,
    scale: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    info = get_sampler(name)
    schedule = NoiseSchedule()
    sigmas = info.sigmas(schedule, steps, karras=karras)
    denoiser = CFGDenoiser(Denoiser(tiny_unet(), schedule, prediction), cond, uncond, scale)
    return info.fn(denoiser, noise * info.initial_sigma(sigmas), sigmas, **options)


# ----------------------------------------------------------------------------- schedule


def test_schedule_values() -> None:
    schedule = NoiseSchedule()
    assert schedule.betas.dtype == torch.float64 and schedule.betas.shape == (1000,)
    assert math.isclose(float(schedule.betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(schedule.betas[-1]), 0.012, rel_tol=1e-12)
    reference = DDIMScheduler(**SD_SCHEDULER)
    assert_close_rel(schedule.alphas_cumprod, reference.alphas_cumprod.double(), 1e-6)
    # Known SD values: the largest and smallest training sigma.
    assert math.isclose(schedule.sigma_max, 14.6146, abs_tol=1e-4)
    assert math.isclose(schedule.sigma_min, 0.0292, abs_tol=1e-4)


def test_timestep_spacing_known_values() -> None:
    schedule = NoiseSchedule()
    leading = schedule.timesteps(50, "leading")
    assert leading.tolist() == list(range(981, 0, -20))
    assert schedule.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert schedule.timesteps(10, "linspace").tolist() == list(range(999, -1, -111))
    assert schedule.timesteps(1, "leading").tolist() == [1.0]
    with pytest.raises(ValueError, match="spacing"):
        schedule.timesteps(10, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        schedule.timesteps(0)


@pytest.mark.parametrize("steps", [7, 20, 50, 333])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_match_diffusers(spacing: str, steps: int) -> None:
    reference = EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing=spacing)
    reference.set_timesteps(steps)
    ours = NoiseSchedule().timesteps(steps, spacing)  # type: ignore[arg-type]
    torch.testing.assert_close(ours.float(), reference.timesteps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_sigmas_match_diffusers(spacing: str, karras: bool) -> None:
    reference = EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing=spacing, use_karras_sigmas=karras)
    reference.set_timesteps(13)
    sigmas = NoiseSchedule().sigmas(13, spacing, karras=karras)  # type: ignore[arg-type]
    assert sigmas.shape == (14,) and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert_close_rel(sigmas, reference.sigmas.double(), 1e-6)


def test_karras_sigmas() -> None:
    sigmas = karras_sigmas(5, 0.1, 10.0)
    assert math.isclose(float(sigmas[0]), 10.0) and math.isclose(float(sigmas[-1]), 0.1)
    # Evenly spaced in sigma^(1/7).
    roots = sigmas ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(4))


def test_sigma_to_t() -> None:
    schedule = NoiseSchedule()
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.train_sigmas), t)
    torch.testing.assert_close(schedule.t_to_sigma(t), schedule.train_sigmas)
    # Between training sigmas: linear in log sigma, as diffusers' _sigma_to_t; clamped outside.
    reference = EulerDiscreteScheduler(**SD_SCHEDULER)
    log_sigmas = schedule.log_sigmas.numpy()
    probe = np.array([0.01, 0.03, 0.5, 1.7, 14.0, 20.0])
    expected = reference._sigma_to_t(probe, log_sigmas)
    torch.testing.assert_close(schedule.sigma_to_t(torch.from_numpy(probe)), torch.from_numpy(expected))
    assert schedule.sigma_to_t(torch.tensor(0.01)).shape == ()


def test_custom_schedule_config() -> None:
    schedule = NoiseSchedule(ScheduleConfig(beta_start=0.0001, beta_end=0.02))
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    assert_close_rel(schedule.alphas_cumprod, reference.alphas_cumprod.double(), 1e-6)


# ----------------------------------------------------------------------------- denoiser


def test_denoiser_parameterizations_agree() -> None:
    """A v model and an eps model that describe the same x0 give the same denoiser output."""
    schedule = NoiseSchedule()
    x0_true = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_true = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 5.0], dtype=torch.float64)
    x = x0_true + sigma[:, None, None, None].float() * eps_true
    alpha = (1 / (1 + sigma**2)).float()[:, None, None, None]  # alphas_cumprod at sigma

    class Oracle(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            assert t.shape == (2,) and t.dtype == torch.float32
            torch.testing.assert_close(x_in, x * alpha.sqrt())  # the DDPM-space input
            if self.kind == "eps":
                return eps_true
            return alpha.sqrt() * eps_true - (1 - alpha).sqrt() * x0_true

    for kind in ("eps", "v"):
        out = Denoiser(Oracle(kind), schedule, kind)(x, sigma, context=torch.zeros(2, 1, 1))
        torch.testing.assert_close(out, x0_true, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction type"):
        Denoiser(Oracle("eps"), schedule, "x0")


def test_denoiser_passes_t_and_concat() -> None:
    """The UNet sees t = sigma_to_t(sigma), the scaled input with c_concat appended, and y."""
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_in: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            seen.update(x_in=x_in, t=t, **kwargs)
            return torch.zeros_like(x_in[:, :4])

    schedule = NoiseSchedule()
    sigma = schedule.train_sigmas[[500, 20]]
    x = torch.ones(2, 4, 8, 8)
    concat = torch.full((2, 5, 8, 8), 3.0)
    y = torch.tensor([3, 4])
    out = Denoiser(Recorder(), schedule)(x, sigma, context=torch.zeros(2, 1, 1), y=y, c_concat=concat)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(seen["t"], torch.tensor([500.0, 20.0]))
    assert seen["x_in"].shape == (2, 9, 8, 8)
    torch.testing.assert_close(seen["x_in"][:, 4:], concat)
    torch.testing.assert_close(
        seen["x_in"][1, 0, 0, 0].double(), (1 + sigma[1] ** 2).rsqrt(), rtol=1e-6, atol=0
    )
    assert seen["y"] is y


def test_cfg_skips_uncond_at_scale_one() -> None:
    batches: list[int] = []
    unet = tiny_unet()
    handle = unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        denoiser = Denoiser(unet, NoiseSchedule())
        x = start_noise(2)
        sigma = torch.tensor(3.0, dtype=torch.float64)
        with torch.no_grad():
            plain = denoiser(x, sigma, context=context(batch=2))
            guided = CFGDenoiser(denoiser, context(batch=2), context(7, batch=2), 1.0)(x, sigma)
            assert batches == [2, 2]
            # Batch-1 conditioning is broadcast; scale != 1 makes one call of twice the batch.
            CFGDenoiser(denoiser, context(), context(7), 7.5)(x, sigma)
            assert batches == [2, 2, 4]
    finally:
        handle.remove()
    torch.testing.assert_close(guided, plain)
    with pytest.raises(ValueError, match="unconditional"):
        CFGDenoiser(denoiser, context(), None, 7.5)


# ----------------------------------------------------------------------------- parity with diffusers

PARITY_CASES = [
    # name, prediction, steps, karras, our options, diffusers step kwargs
    ("ddim", "eps", 12, False, {}, {}),
    ("ddim", "v", 12, False, {}, {}),
    ("plms", "eps", 12, False, {}, {}),
    ("euler", "eps", 12, False, {}, {}),
    ("euler", "v", 15, False, {}, {}),
    ("euler", "eps", 12, True, {}, {}),
    ("heun", "eps", 10, False, {}, {}),
    ("heun", "v", 10, True, {}, {}),
    ("lms", "eps", 15, False, {}, {}),
    ("lms", "v", 12, True, {}, {}),
]


@pytest.mark.parametrize(("name", "prediction", "steps", "karras", "options", "step_kwargs"), PARITY_CASES)
def test_matches_diffusers(
    name: str, prediction: str, steps: int, karras: bool, options: dict, step_kwargs: dict
) -> None:
    overrides = {"use_karras_sigmas": True} if karras else {}
    scheduler = diffusers_scheduler(name, prediction, steps, **overrides)
    noise = start_noise()
    expected = run_diffusers(scheduler, noise, context(), step_kwargs=step_kwargs)
    actual = run_ours(name, prediction, steps, noise, context(), karras=karras, **options)
    assert expected.abs().max() > 0.1, "reference output is trivially small"
    assert relative_error(noise, expected) > 0.1, "sampling did not move the latents"
    err = assert_close_rel(actual, expected)
    print(f"{name}-{prediction}-{steps}{'-karras' if karras else ''}", f"relative error {err:.2e}")


@pytest.mark.parametrize(("name", "prediction"), [("ddim", "eps"), ("euler_a", "eps"), ("euler_a", "v")])
def test_stochastic_matches_diffusers(name: str, prediction: str) -> None:
    """Same generator seed on both sides: the noise is drawn in the same order and shape."""
    steps = 10
    noise = start_noise()
    step_kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(7)}
    options: dict[str, Any] = {"generator": torch.Generator().manual_seed(7)}
    if name == "ddim":
        step_kwargs["eta"] = options["eta"] = 1.0
    expected = run_diffusers(
        diffusers_scheduler(name, prediction, steps), noise, context(), step_kwargs=step_kwargs
    )
    actual = run_ours(name, prediction, steps, noise, context(), **options)
    err = assert_close_rel(actual, expected)
    print(f"{name}-{prediction}-{steps}-seeded", f"relative error {err:.2e}")


def test_guidance_matches_diffusers() -> None:
    """Classifier-free guidance (diffusers guides the v output, we guide x0: the same thing)."""
    steps, scale = 10, 6.0
    noise = start_noise(2)
    cond, uncond = context(batch=2), context(SEED + 9, batch=1).expand(2, 7, 128)
    scheduler = diffusers_scheduler("euler", "v", steps)
    expected = run_diffusers(scheduler, noise, cond, uncond=uncond, scale=scale)
    actual = run_ours("euler", "v", steps, noise, cond, uncond=uncond[:1], scale=scale)
    err = assert_close_rel(actual, expected)
    print("euler-v-10-cfg", f"relative error {err:.2e}")


# ----------------------------------------------------------------------------- the reference's PLMS


@torch.no_grad()
def reference_plms(noise: torch.Tensor, cond: torch.Tensor, steps: int, prediction: str) -> torch.Tensor:
    """The update equations of the reference's PLMSSampler, restated in the DDPM picture.

    x_T is unit noise; timesteps range(0, 1000, 1000 // steps) + 1 walked down; alphas_prev of the
    last step is alphas_cumprod[0]; the first step averages eps at x_t and at the DDIM prediction
    x_prev (evaluated at the next timestep), later steps are Adams-Bashforth over the stored eps.
    The reference PLMS only knows eps models; for v we convert each model output to eps as its DDIM
    sampler does (eps = sqrt(a) v + sqrt(1 - a) x_t), which is how our PLMS treats v models.
    """
    unet = tiny_unet()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = [t + 1 for t in range(0, 1000, 1000 // steps)]
    assert len(timesteps) == steps, "the reference runs more steps when steps does not divide 1000"
    alphas = [float(alphas_cumprod[t]) for t in timesteps]
    alphas_prev = [float(alphas_cumprod[0])] + alphas[:-1]

    def model_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        out = unet(x, torch.tensor([float(t)]), context=cond)
        if prediction == "v":
            a = float(alphas_cumprod[t])
            out = math.sqrt(a) * out + math.sqrt(1 - a) * x
        return out

    def ddim_step(x: torch.Tensor, e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e_t

    time_range = timesteps[::-1]
    x, old_eps = noise, []
    for i, t in enumerate(time_range):
        index = steps - i - 1
        t_next = time_range[min(i + 1, steps - 1)]
        e_t = model_eps(x, t)
        if len(old_eps) == 0:
            e_prime = (e_t + model_eps(ddim_step(x, e_t, index), t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = ddim_step(x, e_prime, index)
        old_eps = [*old_eps, e_t][-3:]
    return x


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_plms_matches_reference_equations(prediction: str) -> None:
    steps = 10
    noise = start_noise()
    expected = reference_plms(noise, context(), steps, prediction)
    actual = run_ours("plms", prediction, steps, noise, context())
    assert relative_error(noise, expected) > 0.1
    err = assert_close_rel(actual, expected)
    print(f"plms-{prediction}-{steps}-reference", f"relative error {err:.2e}")


# ----------------------------------------------------------------------------- analytic checks

DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms"]


def gaussian_denoiser(mu: float, s: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """E[x0 | x] for x0 ~ N(mu, s^2) per element and x = x0 + sigma * eps: the perfect denoiser."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = float(sigma)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_point_data_is_recovered(name: str) -> None:
    """All data at one point x*: every step of a consistent sampler lands on the exact path x* + sigma*eps."""
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = NoiseSchedule().sigmas(8, "linspace")
    start = target + sigmas[0].float() * start_noise()
    out = SAMPLERS[name].fn(lambda x, sigma: target, start, sigmas)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


# Convergence order of each method and its error bound at 40 steps.
ORDER = {"ddim": (1, 6e-2), "euler": (1, 6e-2), "heun": (2, 6e-3), "plms": (2, 2e-3), "lms": (3, 2e-3)}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_gaussian_data_follows_the_exact_flow(name: str) -> None:
    """For Gaussian data the probability-flow ODE is solvable: x(sigma) - mu scales with
    sqrt(s^2 + sigma^2). Deterministic samplers reach that end point, converging at their order.

    The Karras schedule ends at sigma 1e-3 so that the last step (Euler, to 0) adds no visible error."""
    mu, s = 0.5, 0.8
    errors = []
    for steps in (20, 40):
        sigmas = torch.cat([karras_sigmas(steps, 1e-3, 14.6), torch.zeros(1, dtype=torch.float64)])
        start = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * start_noise(2, 16).double()
        exact = mu + s / math.sqrt(s**2 + float(sigmas[0]) ** 2) * (start - mu)
        errors.append(relative_error(SAMPLERS[name].fn(gaussian_denoiser(mu, s), start, sigmas), exact))
    order, bound = ORDER[name]
    observed = math.log2(errors[0] / errors[1])
    print(f"gaussian {name}: error {errors[1]:.1e} at 40 steps, order {observed:.2f}")
    assert errors[1] < bound
    assert observed > order - 0.2


@pytest.mark.parametrize(("name", "options"), [("euler_a", {}), ("ddim", {"eta": 1.0})])
def test_ancestral_samplers_sample_the_data_distribution(name: str, options: dict) -> None:
    """Ancestral sampling with a perfect denoiser draws from the data distribution N(mu, s^2)."""
    mu, s = -0.3, 0.6
    sigmas = NoiseSchedule().sigmas(400, "linspace")  # first order: the variance converges slowly
    gen = torch.Generator().manual_seed(11)
    start = mu + math.sqrt(s**2 + float(sigmas[0]) ** 2) * torch.randn(8, 4, 32, 32, generator=gen)
    out = SAMPLERS[name].fn(gaussian_denoiser(mu, s), start, sigmas, generator=gen, **options)
    assert abs(float(out.mean()) - mu) < 0.02
    assert abs(float(out.std()) - s) < 0.015
    # The deterministic flow would keep the start's noise (correlation 1); ancestral steps replace most.
    assert float(torch.corrcoef(torch.stack([out.flatten(), start.flatten()]))[0, 1]) < 0.5


@pytest.mark.parametrize(("name", "options"), [("euler_a", {}), ("ddim", {"eta": 0.5})])
def test_seeds(name: str, options: dict) -> None:
    sigmas = NoiseSchedule().sigmas(6, "linspace")
    start = start_noise() * float(sigmas[0])
    denoise = gaussian_denoiser(0.0, 1.0)

    def run(seed: int) -> torch.Tensor:
        return SAMPLERS[name].fn(
            denoise, start, sigmas, generator=torch.Generator().manual_seed(seed), **options
        )

    assert torch.equal(run(5), run(5))
    assert relative_error(run(6), run(5)) > 0.05


def test_callback_and_ddpm_final() -> None:
    calls: list[tuple[int, int]] = []
    schedule = NoiseSchedule()
    info = get_sampler("ddim")
    sigmas = info.sigmas(schedule, 5)
    assert float(sigmas[-1]) == pytest.approx(schedule.sigma_min)
    assert get_sampler("euler").sigmas(schedule, 5)[-1] == 0
    target = torch.zeros(1, 4, 8, 8)
    out = info.fn(
        lambda x, sigma: target, start_noise(), sigmas, callback=lambda i, n, x, x0: calls.append((i, n))
    )
    assert calls == [(i, 5) for i in range(5)]
    # Ending at sigma_min: the DDPM latent sqrt(a0) * (x0 + sigma_min * eps) is returned.
    expected = start_noise() * float(sigmas[-1] / sigmas[0]) / math.sqrt(1 + float(sigmas[-1]) ** 2)
    torch.testing.assert_close(out, expected)


def test_lms_coefficients() -> None:
    sigmas = NoiseSchedule().sigmas(10, "linspace").numpy()
    for i in range(3, 9):
        coeffs = [lms_coefficient(sigmas, i, j, 4) for j in range(4)]
        # The Lagrange basis sums to 1, so the coefficients integrate 1 over the step.
        assert math.isclose(sum(coeffs), sigmas[i + 1] - sigmas[i], rel_tol=1e-9)
        # And a cubic in sigma is integrated exactly.
        cubic = [sigmas[i - j] ** 3 for j in range(4)]
        exact = (sigmas[i + 1] ** 4 - sigmas[i] ** 4) / 4
        assert math.isclose(sum(c * f for c, f in zip(coeffs, cubic, strict=True)), exact, rel_tol=1e-9)


def test_registry() -> None:
    assert {"ddim", "plms", "euler", "euler_a", "heun", "lms"} <= set(SAMPLERS)
    names = {key: info.display_name for key, info in SAMPLERS.items()}
    assert names["euler_a"] == "Euler a" and names["ddim"] == "DDIM" and names["lms"] == "LMS"
    with pytest.raises(ValueError, match="euler_a"):
        get_sampler("k_euler")
