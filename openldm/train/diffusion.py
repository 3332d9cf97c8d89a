"""Stage 2: train the UNet and the text encoder on the eps or v objective in the frozen VAE's latents.

The images are encoded once into a :class:`~openldm.train.data.LatentCache` (posterior mean and
log-variance); each step draws fresh latents from those posteriors. The latent scale factor is
``1 / std`` of such latents, as Stable Diffusion computed its 0.18215, so the diffusion model sees
latents of unit variance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from openldm.config import ScheduleConfig, TextConfig, UNetConfig
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.sampling.denoiser import CFGDenoiser, Denoiser
from openldm.sampling.samplers import get_sampler
from openldm.sampling.schedule import NoiseSchedule
from openldm.shapes.dataset import ShapesDataset, to_tensor
from openldm.tokenizer import CLIPTokenizer
from openldm.train.autoencoder import channels_last
from openldm.train.data import (
    CAPTION_DROPOUT,
    STREAM_DROPOUT,
    STREAM_NOISE,
    STREAM_POSTERIOR,
    LatentCache,
    drop_captions,
    dropout_mask,
    step_generator,
)
from openldm.train.loop import LoopConfig, LoopResult, Part, load_ema_weights, train_loop
from openldm.train.losses import diffusion_loss
from openldm.train.text_encoder import init_text_weights

log = logging.getLogger("openldm")
CACHE = "latents.pt"
CACHE_SEED_OFFSET = 1_000_003  # the cache's images come after the autoencoder's in the dataset
SCALE_SEED = 12345


@dataclass(frozen=True)
class DiffusionRecipe:
    unet: UNetConfig
    text: TextConfig
    loop: LoopConfig
    prediction_type: str = "eps"
    schedule: ScheduleConfig = ScheduleConfig()
    image_size: int = 64
    batch_size: int = 32
    cache_size: int = 20_000  # images encoded once and drawn from for the whole stage
    canonical_fraction: float = 0.0  # cached captions that are the canonical one (ShapesDataset)
    caption_dropout: float = CAPTION_DROPOUT
    min_snr_gamma: float | None = None  # min-SNR loss weighting (losses.min_snr_weights); None: plain MSE
    # True: the text encoder comes pre-trained (train/text_encoder.py) and stays frozen, as in Stable
    # Diffusion; False: it is trained from scratch together with the UNet.
    frozen_text: bool = False
    dataset_seed: int = 0
    seed: int = 0


class TextToImage(nn.Module):
    """The two networks trained together in stage 2 (keys ``unet.*`` and ``text.*``)."""

    def __init__(self, unet: UNetConfig, text: TextConfig) -> None:
        super().__init__()
        self.unet = UNetModel(unet)
        self.text = CLIPTextEncoder(text)


def init_weights(model: TextToImage) -> None:
    """The reference initialisation where the modules' own differs: CLIP's embeddings
    (:func:`init_text_weights`), and zero output projections of the UNet's transformers (each starts as
    the identity)."""
    init_text_weights(model.text)
    for name, module in model.unet.named_modules():
        if name.endswith("proj_out") and isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def build_latent_cache(
    vae: AutoencoderKL, dataset: ShapesDataset, n: int, tokenizer: CLIPTokenizer, batch_size: int = 64
) -> LatentCache:
    """Encode dataset images ``0 .. n-1`` with the frozen ``vae`` and tokenize their captions."""
    device = next(vae.parameters()).device
    means, logvars, captions = [], [], []
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([to_tensor(s.image) for s in samples]).to(device)
        posterior = vae.encode(images.contiguous(memory_format=torch.channels_last))
        means.append(posterior.mean.float().cpu().contiguous())
        logvars.append(posterior.logvar.float().cpu().contiguous())
        captions += [s.caption for s in samples]
    return LatentCache(torch.cat(means), torch.cat(logvars), tokenizer(captions), captions)


def latent_scale_factor(cache: LatentCache) -> float:
    """``1 / std`` of latents sampled from every cached posterior, to 5 significant digits."""
    z = cache.sample(torch.arange(len(cache)), torch.Generator().manual_seed(SCALE_SEED))
    return float(f"{1.0 / float(z.double().std()):.5g}")


def load_or_build_cache(
    recipe: DiffusionRecipe, vae: AutoencoderKL, tokenizer: CLIPTokenizer, out_dir: Path
) -> LatentCache:
    path = out_dir / CACHE
    if path.is_file():
        cache = LatentCache.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if len(cache) == recipe.cache_size:
            return cache
    dataset = ShapesDataset(
        recipe.dataset_seed + CACHE_SEED_OFFSET,
        recipe.image_size,
        recipe.cache_size,
        canonical_fraction=recipe.canonical_fraction,
    )
    log.info("encoding %d images into the latent cache %s", recipe.cache_size, path)
    cache = build_latent_cache(vae, dataset, recipe.cache_size, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(cache.state_dict(), path)
    return cache


@torch.no_grad()
def frozen_contexts(
    text: CLIPTextEncoder,
    ids: torch.Tensor,
    empty: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 256,
) -> torch.Tensor:
    """``[N + 1, 77, width]``: the contexts of the ``N`` captions ``ids``, then that of ``empty`` (the
    empty caption's ids: the caption-dropout context), on ``device``."""
    rows = torch.cat([ids, empty[None]])
    return torch.cat([text(rows[i : i + batch_size].to(device)) for i in range(0, len(rows), batch_size)])


def train_diffusion(
    recipe: DiffusionRecipe,
    vae: AutoencoderKL,
    out_dir: str | Path,
    *,
    text: CLIPTextEncoder | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[TextToImage, float, LoopResult]:
    """Train (or resume) the UNet, and the text encoder unless ``recipe.frozen_text``; return them with
    the EMA weights, the latent scale factor and the loop's result.

    With ``recipe.frozen_text``, ``text`` is the pre-trained encoder; its weights are copied in and frozen.
    """
    if recipe.frozen_text != (text is not None):
        raise ValueError("pass the pre-trained text encoder exactly when recipe.frozen_text is set")
    out = Path(out_dir)
    tokenizer = CLIPTokenizer.for_config(recipe.text)
    cache = load_or_build_cache(recipe, vae, tokenizer, out)
    scale = latent_scale_factor(cache)
    log.info("latent scale factor 1/std = %s", scale)
    torch.manual_seed(recipe.seed)
    model = TextToImage(recipe.unet, recipe.text)
    init_weights(model)
    if text is not None:
        model.text.load_state_dict(text.state_dict())
        model.text.requires_grad_(False)
    model = channels_last(model.to(device), device)
    schedule = NoiseSchedule(recipe.schedule)
    empty = tokenizer("")[0]
    # A frozen encoder gives each cached caption the same context every step: computed once.
    contexts = frozen_contexts(model.text, cache.ids, empty, device) if recipe.frozen_text else None

    def loss_fn(step: int, part: Part) -> tuple[torch.Tensor, dict[str, float]]:
        indices = cache.indices(recipe.seed, step, recipe.batch_size)
        rows = part.rows(len(indices))
        z = cache.sample(indices, step_generator(recipe.seed, STREAM_POSTERIOR, step)) * scale
        dropout = step_generator(recipe.seed, STREAM_DROPOUT, step)
        if contexts is not None:
            dropped = dropout_mask(len(indices), recipe.caption_dropout, dropout)[rows].to(device)
            mine = contexts[indices[rows].to(device)]
            context = torch.where(dropped[:, None, None], contexts[-1:], mine)
        else:
            ids = drop_captions(cache.ids[indices], empty, recipe.caption_dropout, dropout)
            context = model.text(ids[rows].to(device))
        x0 = z.to(device).contiguous(memory_format=torch.channels_last)
        noise_generator = step_generator(recipe.seed, STREAM_NOISE, step)
        loss = diffusion_loss(
            model.unet,
            schedule,
            x0,
            context,
            recipe.prediction_type,
            noise_generator,
            recipe.min_snr_gamma,
            rows=rows,
        )
        return loss, {}

    result = train_loop(model, loss_fn, recipe.loop, out, resume=resume, desc="diffusion", progress=progress)
    load_ema_weights(out, model)
    return model.eval().requires_grad_(False), scale, result


@torch.no_grad()
def sample(
    model: TextToImage,
    vae: AutoencoderKL,
    prompts: list[str],
    *,
    scale_factor: float,
    prediction_type: str,
    schedule: ScheduleConfig | None = None,
    image_size: int = 64,
    steps: int = 25,
    guidance: float = 7.5,
    sampler: str = "euler",
    seed: int = 0,
) -> list[Image.Image]:
    """Images for ``prompts`` straight from the networks (no loading path): for previews while training."""
    device = next(model.parameters()).device
    tokenizer = CLIPTokenizer.for_config(model.text.config)
    noise_schedule = NoiseSchedule(schedule or ScheduleConfig())
    info = get_sampler(sampler)
    sigmas = info.sigmas(noise_schedule, steps)
    cond = model.text(tokenizer(prompts).to(device))
    uncond = model.text(tokenizer([""] * len(prompts)).to(device))
    denoiser = CFGDenoiser(Denoiser(model.unet, noise_schedule, prediction_type), cond, uncond, guidance)
    generator = torch.Generator().manual_seed(seed)
    f = vae.config.downsampling_factor
    noise = torch.randn(
        [len(prompts), vae.config.embed_dim, image_size // f, image_size // f], generator=generator
    )
    x = info.fn(denoiser, noise.to(device) * info.initial_sigma(sigmas), sigmas, generator=generator)
    images = (vae.decode(x / scale_factor).clamp(-1, 1) + 1) * 127.5
    array = images.round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * width, (i // columns) * height))
    return canvas
