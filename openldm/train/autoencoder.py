"""Stage 1: train the KL autoencoder (f=8, 4 latent channels) on shape images.

Reconstruction (L1, optionally L2 and an edge term on image gradients) plus a small KL to N(0, I), as
the latent diffusion paper's KL-regularised autoencoder without its perceptual and adversarial terms:
flat-coloured shapes need neither, and the edge term keeps their borders sharp.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from openldm.config import VAEConfig
from openldm.nn.vae import AttnBlock, AutoencoderKL, Downsample, ResnetBlock, Upsample
from openldm.shapes.dataset import ShapesDataset, to_tensor
from openldm.train.data import STREAM_CROP, STREAM_POSTERIOR, image_batch, random_crops, step_generator
from openldm.train.ema import EMA
from openldm.train.loop import LoopConfig, LoopResult, Part, load_ema_weights, train_loop
from openldm.train.losses import autoencoder_loss

log = logging.getLogger("openldm")
WEIGHTS = "vae.safetensors"
# Initial posterior log-variance: at the default (0) the decoder first sees latents drowned in unit
# noise and learns nothing for hundreds of steps; std 0.05 lets reconstruction start at once (the
# KL term then sets the variance).
INITIAL_LOGVAR = -6.0
DATASET_LENGTH = 10_000_000


@dataclass(frozen=True)
class AutoencoderRecipe:
    vae: VAEConfig
    loop: LoopConfig
    image_size: int = 64
    crop_size: int | None = None  # train on random crops of this size (None: whole images)...
    crop_steps: int | None = None  # ...for this many first steps (None: all), then on whole images
    batch_size: int = 16
    kl_weight: float = 1e-4
    l2_weight: float = 0.0
    edge_weight: float = 0.5
    foreground_weight: float = 0.0  # extra weight of non-background pixels (losses.foreground_weights)
    dense_fraction: float = 0.0  # fraction of training images that are dense scenes (dataset.dense_scene)
    recolour_fraction: float = 0.0  # fraction painted in off-palette colours (dataset.off_palette_colour)
    identity_init: bool = False  # start residual branches at zero and resamplers as pooling (identity_init)
    dataset_seed: int = 0
    dataset_length: int = DATASET_LENGTH  # distinct images (the batches wrap around after them)
    seed: int = 0


def init_posterior(vae: AutoencoderKL, logvar: float = INITIAL_LOGVAR) -> None:
    """Start the posterior's log-variance at ``logvar`` (the bias of ``quant_conv``'s second half)."""
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.embed_dim :] = logvar


def identity_init(vae: AutoencoderKL) -> None:
    """Start the autoencoder near a pixelated identity: every residual branch (res blocks' second conv,
    attention's output projection) at zero, downsamplers as 2x2 average pooling and upsamplers as
    nearest-neighbour copies, channel by channel.

    The network then begins as a short chain of convolutions that already carries each 8x8 block's
    colour, and the zero branches learn the details: with the default random initialisation the
    SD autoencoder learns flat colours and small shapes very slowly.
    """
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock) and module.nin_shortcut is None:
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, AttnBlock):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
            elif isinstance(module, (Downsample, Upsample)):
                conv = module.conv
                eye = torch.eye(conv.out_channels, conv.in_channels)
                conv.weight.zero_()
                conv.bias.zero_()
                if isinstance(module, Downsample):  # pad right/bottom, stride 2: taps (0..1, 0..1)
                    conv.weight[:, :, :2, :2] = eye[:, :, None, None] / 4
                else:
                    conv.weight[:, :, 1, 1] = eye


def channels_last(module: nn.Module, device: torch.device | str) -> nn.Module:
    """On the CPU, channels-last convolutions run several times faster (oneDNN); elsewhere unchanged."""
    return module.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else module


def train_autoencoder(
    recipe: AutoencoderRecipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[AutoencoderKL, LoopResult]:
    """Train (or resume) the autoencoder; write ``out_dir/vae.safetensors`` (EMA weights) when finished.

    Returns the EMA autoencoder in eval mode and the loop's result.
    """
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(recipe.vae)
    if recipe.identity_init:
        identity_init(vae)
    init_posterior(vae)
    vae = channels_last(vae.to(device), device)
    dataset = ShapesDataset(
        recipe.dataset_seed,
        recipe.image_size,
        recipe.dataset_length,
        dense_fraction=recipe.dense_fraction,
        recolour_fraction=recipe.recolour_fraction,
    )

    def loss_fn(step: int, part: Part) -> tuple[torch.Tensor, dict[str, float]]:
        rows = part.rows(recipe.batch_size)
        images = image_batch(dataset, step, recipe.batch_size, rows)
        if recipe.crop_size is not None and (recipe.crop_steps is None or step < recipe.crop_steps):
            crops = step_generator(recipe.seed, STREAM_CROP, step)
            images = random_crops(images, recipe.crop_size, crops, rows, recipe.batch_size)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(images)
        # The posterior's noise drawn for the whole batch (as posterior.sample would), the rows' kept.
        shape = (recipe.batch_size, *posterior.mean.shape[1:])
        draws = step_generator(recipe.seed, STREAM_POSTERIOR, step)
        noise = torch.randn(shape, generator=draws, dtype=posterior.mean.dtype)[rows]
        z = posterior.mean + posterior.std * noise.to(posterior.mean.device)
        reconstruction = vae.decode(z)
        loss, parts = autoencoder_loss(
            images,
            reconstruction,
            posterior,
            recipe.kl_weight,
            recipe.l2_weight,
            recipe.edge_weight,
            recipe.foreground_weight,
        )
        share = part.share(recipe.batch_size)  # the rows' means, weighed as their share of the batch's
        return loss * share, {name: value * share for name, value in parts.items()}

    ema = EMA(vae, recipe.loop.ema_decay)
    result = train_loop(
        vae, loss_fn, recipe.loop, out_dir, resume=resume, ema=ema, desc="vae", progress=progress
    )
    ema.copy_to(vae)
    vae.eval().requires_grad_(False)
    if result.finished:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(Path(out_dir) / WEIGHTS))
    return vae.to(memory_format=torch.contiguous_format), result


def load_autoencoder(
    config: VAEConfig, out_dir: str | Path, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """The trained autoencoder of ``out_dir`` (its final weights, else its checkpoint's EMA weights)."""
    vae = AutoencoderKL(config)
    path = Path(out_dir) / WEIGHTS
    if path.is_file():
        vae.load_state_dict(load_file(str(path)))
    else:
        step = load_ema_weights(out_dir, vae)
        log.warning(
            "%s: the autoencoder stage did not finish; using its EMA weights at step %d", out_dir, step
        )
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_error(
    vae: AutoencoderKL, dataset: ShapesDataset, n: int = 64, start: int = 0, batch_size: int = 16
) -> dict[str, float]:
    """Mean absolute error (0..255 pixel units) and PSNR (dB) of reconstructing ``n`` images from the
    posterior mean, over images ``start ... start + n - 1`` of ``dataset``."""
    device = next(vae.parameters()).device
    abs_sum, sq_sum, count = 0.0, 0.0, 0
    for first in range(start, start + n, batch_size):
        images = _images(dataset, first, min(batch_size, start + n - first)).to(device)
        reconstruction = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
        diff = (reconstruction - images) * 127.5
        abs_sum += float(diff.abs().sum())
        sq_sum += float(diff.pow(2).sum())
        count += diff.numel()
    mse = sq_sum / count
    return {"mae": abs_sum / count, "psnr": 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()}


@torch.no_grad()
def reconstruction_grid(
    vae: AutoencoderKL, dataset: ShapesDataset, n: int = 8, start: int = 0
) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row)."""
    device = next(vae.parameters()).device
    images = _images(dataset, start, n).to(device)
    reconstruction = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    rows = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(reconstruction), dim=2)], dim=1)
    array = ((rows + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _images(dataset: ShapesDataset, start: int, n: int) -> torch.Tensor:
    return torch.stack([to_tensor(dataset[start + i].image) for i in range(n)])


def with_recipe(recipe: AutoencoderRecipe, **loop_changes: object) -> AutoencoderRecipe:
    """The recipe with some loop settings replaced (steps, minutes...)."""
    return dataclasses.replace(recipe, loop=dataclasses.replace(recipe.loop, **loop_changes))
