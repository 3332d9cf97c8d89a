"""The one run every pipeline goes through: check, prepare the conditioning, the noise and the sigmas,
sample each repeat, decode, and package the images with their parameters.

A pipeline is a :class:`Task`: it says only what is its own (the size it works at, an init latent and
a strength, extra UNet input channels, a class label, a mask blend) by overriding a few short methods;
the base class is plain text-to-image. The order in which the run draws from its one CPU generator is
fixed, so every pipeline draws its noise as diffusers' pipeline of the same kind does with a CPU
generator: whatever :meth:`Task.prepare` encodes (an init image's posterior sample, an embedding's
noise), then the starting noise of each repeat (after :meth:`Task.before_noise`), then what the sampler
draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from openldm.devices import reusing_freed_host_memory
from openldm.pipelines.common import (
    TEXT_TO_IMAGE_VARIANTS,
    DenoiserHook,
    Generation,
    Model,
    Sampling,
    autocast,
    check_request_memory,
    check_size,
    check_weights_precision,
    conditioning,
    decode,
    device_of,
    draw_noise,
    encode_images,
    finish,
    image_settings,
    make_generator,
    progress_bar,
    run_settings,
    sampling_sigmas,
    use_adapters,
)
from openldm.pipelines.control import prepare_controls
from openldm.pipelines.hires import hires_sigmas_of, hires_size, upscale_latents
from openldm.pipelines.options import GenerationOptions


@dataclass
class Run:
    """One generation under way: what a task's steps read and the helpers they call."""

    model: Model
    options: GenerationOptions
    size: tuple[int, int]  # (height, width) of the output images, pixels
    shape: tuple[int, int, int, int]  # the latents of one repeat
    sigmas: torch.Tensor
    generator: torch.Generator
    cond: torch.Tensor
    uncond: torch.Tensor | None
    bar: tqdm

    @property
    def device(self) -> torch.device:
        return device_of(self.model.unet)

    @property
    def batch(self) -> int:
        return self.shape[0]

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Unit noise from the run's generator, on the UNet's device."""
        return draw_noise(self.generator, shape, self.device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, one posterior sample each from the run's generator."""
        return encode_images(self.model, self.options, pixels, self.generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Latents -> images in [-1, 1]; None when the output type is "latent"."""
        if self.options.output_type == "latent":
            return None
        return decode(self.model, latents, self.options)

    def start(self, unit: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Where sampling starts: the unit noise at the sampler's first sigma, or ``latent`` noised to
        the first sigma of the run (img2img's ``z + sigma * noise``)."""
        if latent is None:
            return unit * self.options.sampler_info.initial_sigma(self.sigmas)
        return latent + float(self.sigmas[0]) * unit

    def hires(self, x: torch.Tensor) -> torch.Tensor:
        """The hires fix's second pass on the first pass's latents ``x`` (see :mod:`.hires`)."""
        hires = self.options.hires
        assert hires is not None
        factor = self.model.spec.vae.downsampling_factor
        size = hires_size(*self.size, hires, factor)
        latent = upscale_latents(x, size, hires, factor, self.decode, self.encode)
        sigmas = hires_sigmas_of(self.model, self.options)
        if len(sigmas) == 1:
            return latent
        big = dataclasses.replace(self, size=size, shape=tuple(latent.shape), sigmas=sigmas)
        return big.sample(big.start(big.draw(big.shape), latent))

    def sample(
        self,
        x: torch.Tensor,
        *,
        extra: dict[str, torch.Tensor] | None = None,
        extra_uncond: dict[str, torch.Tensor] | None = None,
        hook: DenoiserHook | None = None,
    ) -> torch.Tensor:
        """Denoise ``x`` (at ``sigmas[0]``) down the sigmas; ``extra`` UNet inputs beside the context
        (``extra_uncond`` for the unconditional half when it differs); ``hook`` wraps the denoiser."""
        options = self.options
        sampling = Sampling(
            self.model,
            options.sampler_info,
            self.sigmas,
            self.cond,
            self.uncond,
            options.guidance_scale,
            self.generator,
            options.sampler_options,
            options.precision,
            options.callback,
            self.bar,
            extra,
            extra_uncond,
            prepare_controls(options.controls, self.size) if options.controls else None,
            options.cfg_end,
            options.feature_reuse,
            options.token_merging,
        )
        with reusing_freed_host_memory(self.device):
            return sampling(x, hook)


class Task:
    """What a pipeline adds to the run; this base class is text to image.

    A task keeps what a run prepares (the init image's pixels and latent, ...) on itself; every run sets
    it again, from :meth:`image_size` and :meth:`prepare`, so one task serves several runs in turn (the
    batches of a command)."""

    name: ClassVar[str] = "txt2img"
    variants: ClassVar[tuple[str, ...]] = TEXT_TO_IMAGE_VARIANTS
    needs: ClassVar[str] = "txt2img and img2img need a text-to-image model (sd1 or sd2)"
    encodes: ClassVar[bool] = False  # encodes an init image (for the memory estimate)

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        """(height, width) of the output: the options', else the model's image size."""
        height = options.height if options.height is not None else model.spec.image_size
        width = options.width if options.width is not None else model.spec.image_size
        check_size(width, height, model.spec.vae.downsampling_factor)
        return height, width

    def tile_latent(self) -> tuple[int, int] | None:
        """The (height, width) in latent pixels sampled and decoded at once, when not the whole image
        (known once :meth:`image_size` ran)."""
        return None

    def settings(self) -> dict[str, Any]:
        """This task's entries of the images' parameters text."""
        return {}

    def schedule(self, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        """The sigmas the run walks, from the full schedule of ``steps`` steps."""
        return sigmas

    def passes(self) -> int:
        """Sampler runs per repeat (tiles; known once :meth:`image_size` ran)."""
        return 1

    def prepare(self, run: Run) -> None:
        """Encode what the task needs once (after the prompts, before the first starting noise)."""

    def before_noise(self, run: Run, iteration: int) -> None:
        """Draw what a repeat needs before its starting noise."""

    def denoise(self, run: Run, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One repeat from its unit starting noise: (final latents, decoded images or None)."""
        x = run.sample(run.start(unit))
        if run.options.hires is not None:
            x = run.hires(x)
        return x, run.decode(x)

    def finish(self, result: Generation) -> Generation:
        """The packaged result, changed as the task needs (inpainting's paste-back)."""
        return result


def generate(model: Model, task: Task, options: GenerationOptions) -> Generation:
    """Run ``task`` on ``model`` with ``options``: every check first, then the work."""
    height, width = _check(model, task, options)
    factor = model.spec.vae.downsampling_factor
    shape = (options.images_per_repeat, model.spec.vae.embed_dim, height // factor, width // factor)
    if options.noise is not None and tuple(options.noise.shape) != shape:
        raise ValueError(f"noise must have shape {list(shape)}, got {list(options.noise.shape)}")
    seed, generator = make_generator(options.seed, options.generator)
    full = sampling_sigmas(model, options.sampler_info, options.steps, options.karras)
    sigmas = task.schedule(full, options.steps)
    prompts, negatives = options.batch()
    texts = use_adapters(model, prompts)
    settings = run_settings(model, options, seed=seed, width=width, height=height, extra=task.settings())
    with torch.inference_mode():
        with autocast(device_of(model.unet), options.precision):
            cond, uncond = conditioning(model, texts, negatives, options)
        steps = task.passes() * (len(sigmas) - 1)
        if options.hires is not None:
            steps += len(hires_sigmas_of(model, options)) - 1
        bar = progress_bar(options.n_iter * steps, options.progress, task.name)
        run = Run(model, options, (height, width), shape, sigmas, generator, cond, uncond, bar)
        task.prepare(run)
        fixed = _fixed_noise(run)
        latents, images, per_image = [], [], []
        for iteration in range(options.n_iter):
            task.before_noise(run, iteration)
            unit = fixed if fixed is not None else run.draw(shape)
            x, decoded = task.denoise(run, unit)
            latents.append(x)
            if decoded is not None:
                images.append(decoded)
            per_image += image_settings(settings, len(prompts), options.n_iter, iteration)
        bar.close()
    decoded_all = torch.cat(images) if images else None
    n = options.n_iter
    result = finish(
        decoded_all, torch.cat(latents), prompts * n, negatives * n, per_image, seed, options.output_type
    )
    return task.finish(result)


def _check(model: Model, task: Task, options: GenerationOptions) -> tuple[int, int]:
    """What depends on the model: its variant, its schedule's length, its weights' precision, the
    output size and the memory the request needs. Returns the output (height, width)."""
    if model.spec.variant not in task.variants:
        raise ValueError(f"this is a {model.spec.variant} model; {task.needs}")
    if options.clip_skip > model.spec.text.layers:
        raise ValueError(
            f"clip_skip must be at most {model.spec.text.layers} for this model's "
            f"{model.spec.text.layers}-layer text encoder, got {options.clip_skip}"
        )
    if options.steps > model.spec.schedule.num_timesteps:
        raise ValueError(f"steps must be at most {model.spec.schedule.num_timesteps}, got {options.steps}")
    check_weights_precision(model, options.precision)
    height, width = task.image_size(model, options)
    tile = task.tile_latent()
    factor = model.spec.vae.downsampling_factor
    if options.hires is not None:
        if task.name != "txt2img":
            raise ValueError(f"the hires fix belongs to txt2img, not {task.name}")
        big_height, big_width = hires_size(height, width, options.hires, factor)
        check_size(big_width, big_height, factor)
        _check_memory(model, options, big_width, big_height, options.hires.upscaler == "lanczos", None)
    _check_memory(model, options, width, height, task.encodes, tile)
    return height, width


def _check_memory(
    model: Model,
    options: GenerationOptions,
    width: int,
    height: int,
    encode: bool,
    tile: tuple[int, int] | None,
) -> None:
    factor = model.spec.vae.downsampling_factor
    check_request_memory(
        model,
        images=options.images_per_repeat,
        repeats=options.n_iter,
        width=width,
        height=height,
        guidance_scale=options.guidance_scale,
        precision=options.precision,
        output_type=options.output_type,
        encode=encode,
        latent=tile,
        piece=(tile[0] * factor, tile[1] * factor) if tile is not None else None,
        vae_tiling=options.vae_tiling,
    )


def _fixed_noise(run: Run) -> torch.Tensor | None:
    """The unit noise every repeat starts from: the given one, or one drawn once with ``fixed_code``."""
    options = run.options
    if options.noise is not None:
        return options.noise.to(run.device, torch.float32)
    return run.draw(run.shape) if options.fixed_code else None
