"""Image to image (SDEdit): encode the init image, noise it to ``strength``, denoise the remaining steps.

Of a ``steps``-step schedule, the last ``int(strength * steps)`` steps run: the init image's latent
(a sample of the VAE posterior, drawn with the run's generator) gets noise at the first sigma of those
steps, ``x = z + sigma * noise``, and the sampler walks from there. This is diffusers'
``StableDiffusionImg2ImgPipeline`` exactly (its ``get_timesteps`` and ``scheduler.add_noise``). The
reference's img2img script runs the same steps but noises one schedule level higher than the step it
starts at (``stochastic_encode`` at ``ddim_timesteps[t_enc]``, then ``decode`` from
``ddim_timesteps[t_enc - 1]``), and fails at strength 1; here the noise level is always the one the
first step expects, and strength 1 is plain text-to-image from pure noise at ``sigmas[0]`` (without
the DDIM family's rescaling of the first noise; the init image still shows through the tiny
``sqrt(alphas_cumprod)`` left at the top of the schedule). Strength 0 returns the encoded image.

As in the reference, the init image is encoded once per batch image (each gets its own posterior
sample) before the repeats; each repeat draws fresh noise from the same generator.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from openldm.images import fit_to_multiple, load_image, pil_to_tensor
from openldm.pipelines.common import (
    Callback,
    Generation,
    Sampling,
    autocast,
    batch_prompts,
    check_options,
    check_request_memory,
    check_size,
    check_strength,
    check_weights_precision,
    conditioning,
    device_of,
    draw_noise,
    encode_images,
    make_generator,
    progress_bar,
    prompt_count,
    run_repeats,
    run_settings,
    sampler_options,
    sampling_sigmas,
    size_multiple,
    strength_sigmas,
    unit_noise,
)

if TYPE_CHECKING:
    from openldm.checkpoints.load import StableDiffusion

InitImage = Image.Image | str | os.PathLike[str] | torch.Tensor


def img2img(
    model: StableDiffusion,
    prompt: str | Sequence[str],
    init_image: InitImage,
    negative_prompt: str | Sequence[str] = "",
    *,
    strength: float = 0.75,
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
    """Repaint ``init_image`` after ``prompt``; ``strength`` in [0, 1] is how much of it is redrawn.

    ``init_image``: a PIL image, an image file, or a tensor [1, 3, H, W] in [-1, 1]. It is resized to
    ``width`` x ``height`` when given, else down to the nearest multiple of 64 per side for SD (as the
    reference script does; see :func:`~openldm.pipelines.common.size_multiple`). ``noise``
    (unit variance, the latent's shape) replaces the noise drawn for every repeat. The other options
    are :func:`openldm.pipelines.txt2img.txt2img`'s.
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
    check_strength(strength)
    factor = model.spec.vae.downsampling_factor
    image = prepare_init_image(init_image, width, height, size_multiple(model))
    height, width = image.shape[-2:]
    check_request_memory(
        model,
        images=prompt_count(prompt) * n_samples,
        repeats=n_iter,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        precision=precision,
        output_type=output_type,
        encode=True,
    )
    prompts, negatives = batch_prompts(prompt, negative_prompt, n_samples)
    options = sampler_options(sampler, info, eta)
    seed, generator = make_generator(seed, generator)
    device = device_of(model.unet)
    shape = (len(prompts), model.spec.vae.embed_dim, height // factor, width // factor)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
    # The last int(strength * steps) steps of the schedule.
    sigmas = strength_sigmas(sampling_sigmas(model, info, steps, karras), steps, strength)
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
        extra={"Denoising strength": strength},
    )

    with torch.inference_mode():
        # 1. Encode the prompts.
        with autocast(device, precision):
            cond, uncond = conditioning(model, prompts, negatives, guidance_scale, weighting)
        # 2. Encode the init image: one posterior sample per batch image.
        z = encode_images(model, precision, image.expand(len(prompts), -1, -1, -1), generator)
        bar = progress_bar(n_iter * (len(sigmas) - 1), progress, "img2img")
        sample = Sampling(
            model, info, sigmas, cond, uncond, guidance_scale, generator, options, precision, callback, bar
        )
        if noise is None and fixed_code:
            noise = draw_noise(generator, shape, device)

        def sample_one(iteration: int) -> torch.Tensor:
            # 3. Noise to the first sigma of the steps that run, and sample (4. decode).
            if len(sigmas) == 1:
                return z.clone()
            return sample(z + float(sigmas[0]) * unit_noise(generator, shape, device, noise))

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


def prepare_init_image(
    image: InitImage, width: int | None, height: int | None, multiple: int
) -> torch.Tensor:
    """The init image as a float32 tensor [1, 3, H, W] in [-1, 1] with sides multiples of ``multiple``."""
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"init_image tensor must be [1, 3, H, W] in [-1, 1], got {list(image.shape)}")
        if width is not None or height is not None:
            raise ValueError("width and height resize PIL init images; resize the tensor yourself")
        check_size(int(tensor.shape[-1]), int(tensor.shape[-2]), multiple)
        return tensor.float()
    if not isinstance(image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    if width is not None or height is not None:
        size = (width or image.width, height or image.height)
        check_size(size[0], size[1], multiple)
        image = image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)
    return pil_to_tensor(fit_to_multiple(image, multiple))
