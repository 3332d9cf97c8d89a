"""What the pipelines share: checks, seeds, conditioning, the denoise loop, precision, decoding.

Latents live in the samplers' sigma space (``x = x0 + sigma * eps``) while sampling and are float32
throughout; the networks run in the model's dtype, or under autocast when a lower precision is asked.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from openldm.adapters import Adapters, activate
from openldm.adapters.embeddings import words_in
from openldm.adapters.patcher import Source
from openldm.adapters.state import vae_hash
from openldm.config import ModelSpec, Variant
from openldm.devices import available_memory
from openldm.images import PARAMETERS_KEY, format_parameters, tensor_to_pil, to_unit
from openldm.nn.token_merging import merging_tokens
from openldm.nn.unet import FeatureReusingUNet
from openldm.nn.upcast import compute_dtype
from openldm.nn.vae_bands import decode_in_bands, encode_in_bands
from openldm.nn.winograd import winograd_reserve
from openldm.pipelines.control import ControlledUNet, PreparedControl
from openldm.pipelines.memory import Request, band_budget, check_memory, vae_bytes
from openldm.pipelines.options import CONTROL_MODE_NAMES, PRECISIONS, Callback, GenerationOptions, VaeTiling
from openldm.prompts import encode_prompts, lora_tags
from openldm.sampling.denoiser import CFGDenoiser, Denoiser
from openldm.sampling.samplers import SamplerInfo
from openldm.sampling.schedule import NoiseSchedule

if TYPE_CHECKING:
    from openldm.nn.clip import CLIPTextEncoder
    from openldm.nn.clip_vision import CLIPVisionEncoder
    from openldm.nn.midas import MiDaSDepthEstimator
    from openldm.nn.unet import UNetModel
    from openldm.nn.vae import AutoencoderKL
    from openldm.tokenizer import CLIPTokenizer

log = logging.getLogger("openldm")

# Variants whose UNet takes the noisy latent alone (4 channels) and text: what txt2img/img2img drive.
TEXT_TO_IMAGE_VARIANTS: tuple[Variant, ...] = ("sd1", "sd2")


class NonFiniteOutputError(RuntimeError):
    """The sampler or the VAE produced NaN or infinite values (never saved as a black image)."""


@dataclass
class Generation:
    """What a pipeline returns.

    ``images``: a list of PIL images (``output_type="pil"``, each with its generation parameters in
    ``image.info["parameters"]``), a float32 array [N, H, W, 3] in [0, 1] ("np"), a float32 tensor
    [N, 3, H, W] in [0, 1] ("pt"), or None ("latent": nothing is decoded). ``latents``: the final
    latents [N, 4, H/8, W/8] (scaled, as ``vae.from_latent`` reads them), float32 on the CPU.
    ``parameters``: the web UI's parameters text of each image. ``seed``: the seed used.
    """

    images: list[Any] | np.ndarray | torch.Tensor | None
    latents: torch.Tensor
    parameters: list[str]
    seed: int
    settings: list[dict[str, Any]] = field(default_factory=list)


# --- the model ---------------------------------------------------------------------------------


class Model(Protocol):
    """What the pipelines read of a loaded model (:class:`openldm.model.StableDiffusion`)."""

    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    extras: dict[str, dict[str, torch.Tensor]]
    source: str
    depth_estimator: MiDaSDepthEstimator | None
    image_encoder: CLIPVisionEncoder | None
    unbuilt: dict[str, str]
    adapters: Adapters
    reread: Source | None


# --- checks ------------------------------------------------------------------------------------


def check_size(width: int, height: int, multiple: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} for this model, got {value!r}"
            )


def activation_bytes(model: Model, precision: str | None) -> int:
    """Bytes per activation value: 2 under fp16/bf16 autocast, else the weights' element size."""
    if precision in ("fp16", "bf16"):
        return 2
    return 4 if precision == "fp32" else dtype_of(model.unet).itemsize


def check_request_memory(
    model: Model,
    *,
    images: int,
    repeats: int,
    width: int,
    height: int,
    guidance_scale: float,
    precision: str | None,
    output_type: str,
    encode: bool = False,
    latent: tuple[int, int] | None = None,
    piece: tuple[int, int] | None = None,
    vae_tiling: VaeTiling = "off",
) -> None:
    """Refuse (:class:`~openldm.pipelines.memory.InsufficientMemoryError`) a request of ``images``
    images of ``width`` x ``height`` per repeat that cannot fit in the device's free memory, before
    anything is allocated. ``latent``: the UNet's size when it is not the image's over the VAE factor;
    ``piece``: the (height, width) the VAE decodes at once when it is not the whole image (tiles)."""
    factor = model.spec.vae.downsampling_factor
    request = Request(
        batch=images,
        repeats=repeats,
        latent=latent or (height // factor, width // factor),
        image=(height, width),
        piece=piece,
        guided=guidance_scale != 1.0,
        encode=encode,
        decode=output_type != "latent",
        element_bytes=activation_bytes(model, precision),
        vae_tiling=vae_tiling,
    )
    check_memory(model.spec, request, device_of(model.unet), winograd_reserve(model.unet, model.vae))


# --- seeds and noise ---------------------------------------------------------------------------


def make_generator(seed: int | None, generator: torch.Generator | None = None) -> tuple[int, torch.Generator]:
    """(seed, CPU generator): ``seed`` (random when None; checked with the options) seeds a new
    generator unless one is given."""
    if seed is None:
        seed = random.randrange(2**32)
    return seed, generator if generator is not None else torch.Generator("cpu").manual_seed(seed)


def draw_noise(generator: torch.Generator, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Unit normal noise drawn on the generator's device in float32, then moved: the same on every device."""
    return torch.randn(list(shape), generator=generator, device=generator.device).to(device)


# --- precision ---------------------------------------------------------------------------------


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in (its weights' unless its layers upcast them)."""
    return compute_dtype(module)


def autocast(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to fp16/bf16 when asked; fp32 and None run the networks in the dtype they are stored in."""
    if precision is None or precision == "fp32":
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"precision {precision!r} needs autocast, which {device.type} does not support; use fp32"
        )
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def check_weights_precision(model: Model, precision: str | None) -> None:
    if precision == "fp32" and dtype_of(model.unet) != torch.float32:
        raise ValueError(
            f"precision 'fp32' asked but the weights are {dtype_of(model.unet)}; "
            "load the model with dtype=torch.float32"
        )


# --- conditioning, schedule, sampling ----------------------------------------------------------


def conditioning(
    model: Model, prompts: list[str], negatives: list[str], options: GenerationOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond) for classifier-free guidance, encoded in one batch so their lengths match.

    With a guidance scale of 1 the unconditional half changes nothing and is not computed.
    """
    texts = prompts if options.guidance_scale == 1.0 else negatives + prompts
    both = encode_prompts(
        model.tokenizer,
        model.text_encoder,
        texts,
        weighting=options.weighting,
        skip_layers=options.clip_skip - 1,
    ).float()
    if options.guidance_scale == 1.0:
        return both, None
    return both[len(negatives) :], both[: len(negatives)]


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength!r}")


def strength_sigmas(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The last ``int(strength * steps)`` steps of a ``steps``-step schedule (img2img's SDEdit)."""
    return sigmas[steps - min(int(strength * steps), steps) :]


def encode_images(
    model: Model, options: GenerationOptions, pixels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents (one posterior sample each) on the UNet's device."""
    pixels = pixels.to(device_of(model.vae))
    config = model.spec.vae
    memory = band_memory(
        model, options.vae_tiling, vae_bytes(config, len(pixels), pixels.shape[-2:], True, False)
    )

    def encode(vae: AutoencoderKL) -> torch.Tensor:
        x = pixels.to(dtype_of(vae))
        if memory is None:
            return vae.to_latent(x, generator=generator)
        return encode_in_bands(vae, x, memory).sample(generator) * vae.config.scale_factor

    return vae_call(model, options.precision, "encoder", encode, generator).to(device_of(model.unet))


def band_memory(model: Model, tiling: VaeTiling, whole: int) -> int | None:
    """What a VAE call on the VAE's device may keep coding by bands, or None to code the whole image
    (:func:`~openldm.pipelines.memory.band_budget`)."""
    return band_budget(tiling, whole, available_memory(device_of(model.vae)))


def sampling_sigmas(model: Model, info: SamplerInfo, steps: int, karras: bool) -> torch.Tensor:
    """The float64 sigmas (``steps + 1``, descending, last 0) that ``info``'s sampler walks."""
    return info.sigmas(NoiseSchedule(model.spec.schedule), steps, karras=karras)


# ``hook(guided, x, sigma) -> x0``: wraps the guided denoiser (inpainting's latent blending).
DenoiserHook = Callable[
    [Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor
]


def guidance_floor(sigmas: torch.Tensor, cfg_end: float) -> float:
    """The noise level at and below which guidance stops: that of the first step past the fraction
    ``cfg_end`` of the run's steps (0: every step guided)."""
    steps = len(sigmas) - 1
    guided = math.ceil(round(cfg_end * steps, 9))
    return 0.0 if guided >= steps else float(sigmas[guided])


@dataclass
class Sampling:
    """One configured sampling run: ``sampling(x)`` denoises ``x`` (at ``sigmas[0]``) down ``sigmas``.

    Latents are float32 in and out; the UNet runs in its dtype, or under autocast for fp16/bf16.
    ``extra_cond``: more UNet conditioning next to the context (``c_concat``, ``y``), for both guidance
    branches unless ``extra_uncond`` gives the unconditional branch its own.
    """

    model: Model
    info: SamplerInfo
    sigmas: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance_scale: float
    generator: torch.Generator
    options: dict[str, Any]
    precision: str | None
    callback: Callback | None = None
    bar: tqdm | None = None
    extra_cond: dict[str, torch.Tensor] | None = None
    extra_uncond: dict[str, torch.Tensor] | None = None
    controls: list[PreparedControl] | None = None
    cfg_end: float = 1.0
    feature_reuse: int = 1
    token_merging: float = 0.0

    def __call__(self, x: torch.Tensor, hook: DenoiserHook | None = None) -> torch.Tensor:
        model = self.model
        dtype = dtype_of(model.unet)
        schedule = NoiseSchedule(model.spec.schedule)
        unet: nn.Module = (
            model.unet if self.feature_reuse == 1 else FeatureReusingUNet(model.unet, self.feature_reuse)
        )
        extra_cond, extra_uncond = self.extra_cond, self.extra_uncond
        if self.controls:
            unet = ControlledUNet(model.unet, self.controls, schedule, self.sigmas)
            base_uncond = extra_uncond if extra_uncond is not None else extra_cond
            extra_cond = {**(extra_cond or {}), "control_scale": torch.ones(1)}
            extra_uncond = {**(base_uncond or {}), "control_scale": torch.zeros(1)}
        denoiser = Denoiser(unet, schedule, model.spec.prediction_type)
        extra = self._extra(extra_cond)
        cond = {"context": self.cond.to(dtype), **extra}
        uncond = None
        if self.uncond is not None:
            extra_u = extra if extra_uncond is None else self._extra(extra_uncond)
            uncond = {"context": self.uncond.to(dtype), **extra_u}
        guided = CFGDenoiser(
            denoiser, cond, uncond, float(self.guidance_scale), guidance_floor(self.sigmas, self.cfg_end)
        )

        def x0_float(latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return guided(latent, sigma).float() if hook is None else hook(guided, latent, sigma)

        def step(i: int, total: int, latent: torch.Tensor, x0: torch.Tensor) -> None:
            if self.bar is not None:
                self.bar.update(1)
            if self.callback is not None:
                self.callback(i, total, latent, x0)

        options = {**self.options, **({"schedule": schedule} if self.info.takes_schedule else {})}
        merging = merging_tokens(self.token_merging, tuple(x.shape[-2:]), self._merging_generator())
        with autocast(device_of(model.unet), self.precision), merging:
            x = self.info.fn(x0_float, x, self.sigmas, generator=self.generator, callback=step, **options)
        check_latents(x, self.precision)
        return x

    def _merging_generator(self) -> torch.Generator | None:
        """Token merging's destinations come from a fork of the run's generator: the noise is unchanged."""
        if not self.token_merging:
            return None
        return torch.Generator(self.generator.device).set_state(self.generator.get_state())

    def _extra(self, extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Floating tensors in the UNet's dtype (integer labels kept), on its device."""
        unet = self.model.unet
        return {
            key: value.to(device_of(unet), dtype_of(unet) if value.is_floating_point() else value.dtype)
            for key, value in (extra or {}).items()
        }


def progress_bar(total: int, show: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=not show, desc=desc, unit="step", leave=False)


# --- VAE ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fp32_vae(model: Model) -> Iterator[nn.Module]:
    vae = model.vae if dtype_of(model.vae) == torch.float32 else copy.deepcopy(model.vae).float()
    yield vae


def _reduced(model: Model, precision: str | None) -> bool:
    return precision in ("fp16", "bf16") or dtype_of(model.vae) != torch.float32


def vae_call(
    model: Model,
    precision: str | None,
    what: str,
    run: Callable[[nn.Module], torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``run(vae)`` in the chosen precision; NaN/inf from a reduced precision is retried in fp32.

    The generator's state is restored for the retry, so a posterior sample draws the same noise.
    A result still not finite raises :class:`NonFiniteOutputError`.
    """
    state = generator.get_state() if generator is not None else None
    with autocast(device_of(model.vae), precision):
        out = run(model.vae).float()
    if torch.isfinite(out).all():
        return out
    if _reduced(model, precision):
        log.warning(
            "the VAE %s gave NaN/inf in %s; running it again in fp32", what, precision or dtype_of(model.vae)
        )
        if generator is not None and state is not None:
            generator.set_state(state)
        with _fp32_vae(model) as vae:
            out = run(vae).float()
        if torch.isfinite(out).all():
            return out
    raise NonFiniteOutputError(
        f"the VAE {what} produced NaN/inf values even in fp32; the VAE weights are broken or the latents "
        "are out of range (check the checkpoint, or lower the guidance scale)"
    )


def check_latents(latents: torch.Tensor, precision: str | None) -> None:
    if not torch.isfinite(latents).all():
        hint = "run with precision='fp32'" if precision in ("fp16", "bf16") else "check the checkpoint"
        raise NonFiniteOutputError(f"sampling produced NaN/inf latents (the UNet overflowed?); {hint}")


def decode(model: Model, latents: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32 on the latents' device."""
    device = device_of(model.vae)
    config = model.spec.vae
    image = tuple(side * config.downsampling_factor for side in latents.shape[-2:])
    memory = band_memory(model, options.vae_tiling, vae_bytes(config, len(latents), image, False, True))

    def decode(vae: AutoencoderKL) -> torch.Tensor:
        z = latents.to(device, dtype_of(vae))
        if memory is None:
            return vae.from_latent(z)
        return decode_in_bands(vae, z / vae.config.scale_factor, memory)

    return vae_call(model, options.precision, "decoder", decode)


# --- results -----------------------------------------------------------------------------------


def model_name(model: Model) -> str:
    source = Path(model.source) if model.source else None
    return source.stem if source is not None and source.name else model.spec.name


def run_settings(
    model: Model,
    options: GenerationOptions,
    *,
    seed: int,
    width: int,
    height: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The web UI's generation parameters shared by the images of a run, in its order."""
    vae = model.adapters.vae_file
    return {
        "Steps": options.steps,
        "Sampler": options.sampler_info.display_name,
        "Schedule type": "Karras" if options.karras else None,
        "CFG scale": options.guidance_scale,
        "CFG end": options.cfg_end if options.cfg_end < 1 else None,
        "Feature reuse": options.feature_reuse if options.feature_reuse > 1 else None,
        "Token merging ratio": options.token_merging or None,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model_name(model),
        "VAE hash": vae_hash(vae) if vae is not None else None,
        "VAE": vae.name if vae is not None else None,
        **(extra or {}),
        "Clip skip": options.clip_skip if options.clip_skip > 1 else None,
        "Eta": options.sampler_options.get("eta"),
        "Fixed code": True if options.fixed_code and options.n_iter > 1 else None,
        **hires_settings(options),
        **control_settings(options),
        **adapter_hashes(model, options),
    }


def hires_settings(options: GenerationOptions) -> dict[str, Any]:
    """The hires fix as the web UI writes it."""
    hires = options.hires
    if hires is None:
        return {}
    return {
        "Denoising strength": hires.strength,
        "Hires upscale": hires.scale,
        "Hires steps": hires.steps,
        "Hires upscaler": "Latent" if hires.upscaler == "latent" else "Lanczos",
    }


def control_settings(options: GenerationOptions) -> dict[str, str]:
    """Each ControlNet as the web UI's ControlNet extension writes it (``ControlNet 0: "Module: canny,
    Model: name [hash], Weight: 1.0, ..."``)."""
    out = {}
    for index, control in enumerate(options.controls):
        network = control.network
        out[f"ControlNet {index}"] = (
            f"Module: {control.module}, Model: {network.name} [{network.short_hash}], "
            f"Weight: {control.weight}, Guidance Start: {control.start}, Guidance End: {control.end}, "
            f"Control Mode: {CONTROL_MODE_NAMES[control.mode]}"
        )
    return out


def adapter_hashes(model: Model, options: GenerationOptions) -> dict[str, Any]:
    """The LoRAs and embeddings a run uses, as the web UI writes them (``Lora hashes: "name: hash"``,
    ``TI hashes``), and all hashes as Civitai's ``Hashes: {"lora:name": ...}`` JSON, which readers such
    as sd-parsers take apart."""
    adapters = model.adapters
    loras = [(u.file.name, u.file.short_hash) for u in adapters.patches.applied]
    words = words_in([*options.prompt, *options.negative_prompt], adapters.embeddings)
    embeddings = [(e.word, e.short_hash) for e in words]
    hashes = {f"lora:{name}": digest for name, digest in loras}
    hashes.update({f"embed:{word}": digest for word, digest in embeddings})
    if adapters.vae_file is not None:
        hashes["vae"] = vae_hash(adapters.vae_file)
    return {
        "Lora hashes": ", ".join(f"{n}: {h}" for n, h in loras) or None,
        "TI hashes": ", ".join(f"{n}: {h}" for n, h in embeddings) or None,
        "Hashes": hashes or None,
    }


def use_adapters(model: Model, prompts: list[str]) -> list[str]:
    """``prompts`` without their ``<lora:name:weight>`` tags, once the LoRAs they name (with those
    loaded for good) are applied to the model."""
    stripped: list[str] = []
    tags: list[tuple[str, float, float]] = []
    for prompt in prompts:
        text, found = lora_tags(prompt)
        stripped.append(text)
        tags += found
    activate(model, tags)
    return stripped


def image_settings(run: dict[str, Any], batch_size: int, n_iter: int, iteration: int) -> list[dict[str, Any]]:
    """``run`` plus each image's place (batch position, repeat) when there is more than one."""
    return [
        {
            **run,
            "Batch size": batch_size if batch_size > 1 else None,
            "Batch pos": position if batch_size > 1 else None,
            "Iteration": iteration if n_iter > 1 else None,
        }
        for position in range(batch_size)
    ]


def finish(
    images: torch.Tensor | None,
    latents: torch.Tensor,
    prompts: list[str],
    negatives: list[str],
    settings: list[dict[str, Any]],
    seed: int,
    output_type: str,
) -> Generation:
    """Package decoded images ([-1, 1]) as the output type asks, each with its parameters text."""
    texts = [format_parameters(p, n, s) for p, n, s in zip(prompts, negatives, settings, strict=True)]
    out: list[Any] | np.ndarray | torch.Tensor | None = None
    if images is not None:
        if output_type == "pil":
            out = tensor_to_pil(images)
            for image, text in zip(out, texts, strict=True):
                image.info[PARAMETERS_KEY] = text
        elif output_type == "np":
            out = to_unit(images).permute(0, 2, 3, 1).numpy()
        else:
            out = to_unit(images)
    return Generation(
        images=out, latents=latents.detach().float().cpu(), parameters=texts, seed=seed, settings=settings
    )
