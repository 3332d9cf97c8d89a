"""Text to image: encode the prompt, draw the noise, sample, decode.

Seeds: with seed s the starting noise of the run is ``torch.Generator("cpu").manual_seed(s)`` then
``torch.randn([n, 4, H/8, W/8], generator=g)`` on the CPU, moved to the model's device and scaled to
the sampler's starting sigma: the convention of diffusers with a CPU generator, so the same seed gives
the same image on every device and in both tools. ``n_iter`` repeats continue the same generator (as
the reference script continues its global RNG); stochastic samplers draw from it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from openldm.pipelines.common import (
    Callback,
    Generation,
    Sampling,
    autocast,
    batch_prompts,
    check_options,
    check_request_memory,
    check_size,
    check_weights_precision,
    conditioning,
    device_of,
    draw_noise,
    make_generator,
    progress_bar,
    prompt_count,
    run_repeats,
    run_settings,
    sampler_options,
    sampling_sigmas,
    size_multiple,
    unit_noise,
)

if TYPE_CHECKING:
    from openldm.checkpoints.load import StableDiffusion


def txt2img(
    model: StableDiffusion,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    sampler: str = "ddim",
    seed: int | None = None,
    n_samples: int = 1,
    n_iter: int = 1,
    eta: float | None = None,
    karras: bool = False,
    weighting: bool = True,
    callback: Callback | None = None,
    output_type: str = "pil",
    precision: str | None = None,
    noise: torch.Tensor | None = None,
    fixed_code: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Generation:
    """Generate ``n_iter`` batches of ``n_samples`` images per prompt.

    Args:
        prompt: a prompt or a list of prompts (each gets ``n_samples`` images, in a row).
        negative_prompt: what to guide away from; one for all prompts or one per prompt.
        steps: sampling steps (denoiser evaluations for first-order samplers).
        guidance_scale: classifier-free guidance scale (1 turns guidance off).
        width, height: image size in pixels, multiples of 8 (default: the model's image size).
        sampler: a name from :data:`openldm.sampling.samplers.SAMPLERS` (``"ddim"``, ``"euler_a"``...).
        seed: the seed of the CPU generator that draws all the noise (random when None).
        n_samples, n_iter: images per prompt in a batch, and how many batches.
        eta: DDIM's eta / the ancestral samplers' noise amount (None: the sampler's default).
        karras: use Karras et al.'s sigma spacing.
        weighting: read ``(word:1.3)``, ``(word)``, ``[word]`` as weights (False: literal text).
        callback: ``callback(step, total, x, x0)`` after every step (``x`` in sigma space).
        output_type: ``"pil"``, ``"np"`` ([N, H, W, 3] in [0, 1]), ``"pt"`` ([N, 3, H, W] in [0, 1])
            or ``"latent"`` (no decoding; see ``Generation.latents``).
        precision: None (run as stored), ``"fp32"``, or ``"fp16"``/``"bf16"`` (autocast).
        noise: the starting noise [batch, 4, H/8, W/8] at unit variance, used for every repeat
            (instead of drawing it); ``fixed_code``: draw it once and reuse it for every repeat.
        generator: a CPU generator to draw from instead of a new one seeded with ``seed``.
        progress: show a progress bar.
    """
    info = check_options(
        model,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        n_samples=n_samples,
        n_iter=n_iter,
        output_type=output_type,
        precision=precision,
    )
    check_weights_precision(model, precision)
    width = width if width is not None else model.spec.image_size
    height = height if height is not None else model.spec.image_size
    factor = model.spec.vae.downsampling_factor
    check_size(width, height, size_multiple(model))
    check_request_memory(
        model,
        images=prompt_count(prompt) * n_samples,
        repeats=n_iter,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        precision=precision,
        output_type=output_type,
    )
    prompts, negatives = batch_prompts(prompt, negative_prompt, n_samples)
    options = sampler_options(sampler, info, eta)
    seed, generator = make_generator(seed, generator)
    device = device_of(model.unet)
    shape = (len(prompts), model.spec.vae.embed_dim, height // factor, width // factor)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
    sigmas = sampling_sigmas(model, info, steps, karras)
    run = run_settings(
        model,
        info,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        width=width,
        height=height,
        karras=karras,
        eta=options.get("eta"),
    )

    with torch.inference_mode():
        # 1. Encode the prompts.
        with autocast(device, precision):
            cond, uncond = conditioning(model, prompts, negatives, guidance_scale, weighting)
        bar = progress_bar(n_iter * (len(sigmas) - 1), progress, "txt2img")
        sample = Sampling(
            model, info, sigmas, cond, uncond, guidance_scale, generator, options, precision, callback, bar
        )
        if noise is None and fixed_code:
            noise = draw_noise(generator, shape, device)

        def sample_one(iteration: int) -> torch.Tensor:
            # 2. The starting noise, scaled to the sampler's first sigma; 3. sample (4. decode).
            return sample(unit_noise(generator, shape, device, noise) * info.initial_sigma(sigmas))

        result = run_repeats(
            model,
            n_iter,
            sample_one,
            prompts=prompts,
            negatives=negatives,
            run=run,
            seed=seed,
            output_type=output_type,
            precision=precision,
        )
        bar.close()
    return result
