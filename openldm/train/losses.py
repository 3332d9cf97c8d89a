"""Training objectives: the autoencoder's reconstruction + KL, and the diffusion eps / v objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openldm.nn.vae import DiagonalGaussian
from openldm.sampling.schedule import NoiseSchedule


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical finite differences of ``[B, C, H, W]`` images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


FOREGROUND_DISTANCE = 0.1  # summed |RGB| difference (in [-1, 1] units) from the background colour


def foreground_weights(images: Tensor, foreground_weight: float) -> Tensor:
    """``[B, 1, H, W]`` pixel weights: 1 on the background, ``1 + foreground_weight`` elsewhere.

    The background colour is each image's per-channel median. On images that are mostly a flat
    background, small objects are a few percent of the pixels, and an unweighted loss learns to
    drop them: weighting them is what makes the autoencoder keep their shapes.
    """
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = ((images - background).abs().sum(1, keepdim=True) > FOREGROUND_DISTANCE).float()
    return 1.0 + foreground_weight * foreground


def autoencoder_loss(
    images: Tensor,
    reconstruction: Tensor,
    posterior: DiagonalGaussian,
    kl_weight: float,
    l2_weight: float = 0.0,
    edge_weight: float = 0.0,
    foreground_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """``L1 + l2_weight * L2 + edge_weight * L1(image gradients) + kl_weight * KL``, all per element means.

    The KL is the posterior's divergence from N(0, I) averaged over latent elements, so ``kl_weight``
    does not depend on the image size. The edge term compares finite differences, which keeps the
    flat shapes' borders sharp (an L1/L2 loss alone averages an uncertain edge into a blur). With
    ``foreground_weight`` the L1 and L2 terms weight non-background pixels more
    (:func:`foreground_weights`).
    """
    weights = foreground_weights(images, foreground_weight) if foreground_weight else None
    error = reconstruction - images
    l1 = error.abs().mean() if weights is None else (error.abs() * weights).mean()
    loss = l1
    parts = {"l1": l1.item()}
    if l2_weight:
        l2 = F.mse_loss(reconstruction, images) if weights is None else (error.pow(2) * weights).mean()
        loss = loss + l2_weight * l2
        parts["l2"] = l2.item()
    if edge_weight:
        edge = sum(
            (a - b).abs().mean()
            for a, b in zip(image_gradients(reconstruction), image_gradients(images), strict=True)
        )
        loss = loss + edge_weight * edge
        parts["edge"] = float(edge.item())
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    parts["kl"] = kl.item()
    return loss + kl_weight * kl, parts


def diffusion_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """What the UNet learns to predict: eps, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        a = alpha_bar[:, None, None, None]
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; use 'eps' or 'v'")


def diffusion_loss(
    unet: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    context: Tensor,
    prediction_type: str,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
    rows: slice | None = None,
    offset_noise: float = 0.0,
) -> Tensor:
    """The DDPM objective: MSE between the UNet's output on ``x_t`` and the eps or v target.

    ``t`` is uniform over the training timesteps and ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
    (the DDPM picture the UNet sees at sampling time too). Noise and ``t`` come from the CPU
    ``generator``, so the loss is the same on every device. With ``rows`` only those rows of the batch
    ``x0`` go through the UNet, ``context`` holding those rows' contexts only, with the draws made for
    the whole batch; the result is their share of the batch's loss (the blocks' shares add up to it).
    ``offset_noise`` adds that much of a per-image, per-channel constant to the noise (drawn after the
    rest, so a run without it draws as before): the model learns to shift an image's mean brightness,
    which plain noise hides from it (Guttenberg 2023).
    """
    batch = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn((batch, x0.shape[1], 1, 1), generator=generator)
    noise = noise.to(x0.device, x0.dtype)
    if rows is not None:
        x0, t, noise = x0[rows], t[rows], noise[rows]
    alpha_bar = schedule.alphas_cumprod[t].to(x0.device, x0.dtype)
    a = alpha_bar[:, None, None, None]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    prediction = unet(noisy, t.to(x0.device), context=context)
    target = diffusion_target(x0, noise, alpha_bar, prediction_type).float()
    errors = (prediction.float() - target).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        errors = errors * min_snr_weights(alpha_bar.float(), min_snr_gamma, prediction_type)
    return errors.sum() / batch


def min_snr_weights(alpha_bar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): each timestep's loss weighted as if it predicted
    x0 with weight ``min(SNR, gamma)``, so the nearly clean timesteps (huge SNR) stop dominating.
    Expressed for the eps target (``min(SNR, gamma) / SNR``) or the v target (``... / (SNR + 1)``)."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "eps" else clipped / (snr + 1)
