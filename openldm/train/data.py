"""Deterministic batches of the shapes dataset, and caption dropout.

Everything random in training is drawn from a generator fixed by ``(seed, stream, step)``
(:func:`step_generator`): the batch of step ``k`` is the same in a fresh run and after a resume, so
a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from openldm.shapes.dataset import ShapesDataset, to_tensor
from openldm.tokenizer import CLIPTokenizer

CAPTION_DROPOUT = 0.1  # Stable Diffusion's rate: 10% empty captions teach the unconditional model
# Independent random streams of one step.
STREAM_BATCH, STREAM_CROP, STREAM_NOISE, STREAM_DROPOUT, STREAM_POSTERIOR = range(5)
# Fine-tuning's prior preservation draws its class batch from streams of its own.
STREAM_PRIOR_BATCH, STREAM_PRIOR_POSTERIOR, STREAM_PRIOR_NOISE = range(5, 8)


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator fixed by ``(seed, stream, step)`` and nothing else."""
    state = np.random.SeedSequence([seed, stream, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def image_batch(
    dataset: ShapesDataset, step: int, batch_size: int, rows: slice | None = None
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] of step ``step``: samples ``step * B ... step * B + B - 1``
    (only the batch's ``rows`` when given).

    Sample ``i`` of the dataset is already random (drawn from a generator seeded by ``(seed, i)``),
    so consecutive indices make a random batch; the dataset wraps around after ``len(dataset)``.
    """
    start = step * batch_size
    chosen = range(batch_size)[rows] if rows is not None else range(batch_size)
    return torch.stack([to_tensor(dataset[(start + j) % len(dataset)].image) for j in chosen])


def random_crops(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    rows: slice | None = None,
    batch_size: int = 0,
) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image (offsets on a grid of 8 pixels, the latent grid).

    With ``rows``, ``images`` are those rows of a batch of ``batch_size``: the offsets are drawn for the
    whole batch and the rows' are used.
    """
    height, width = images.shape[-2:]
    if size > min(height, width) or size % 8:
        raise ValueError(f"crop size must be a multiple of 8 and at most {min(height, width)}, got {size}")
    if size == height == width:
        return images
    drawn = batch_size if rows is not None else len(images)
    ys = torch.randint(0, (height - size) // 8 + 1, (drawn,), generator=generator) * 8
    xs = torch.randint(0, (width - size) // 8 + 1, (drawn,), generator=generator) * 8
    if rows is not None:
        ys, xs = ys[rows], xs[rows]
    return torch.stack(
        [im[:, y : y + size, x : x + size] for im, y, x in zip(images, ys.tolist(), xs.tolist(), strict=True)]
    )


def dropout_mask(batch_size: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[B]``: True where the caption is replaced by the empty caption."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1], got {rate}")
    return torch.rand(batch_size, generator=generator) < rate


def drop_captions(
    ids: torch.Tensor, empty: torch.Tensor, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Token ids ``[B, 77]`` with a ``rate`` fraction of rows replaced by ``empty`` (the ids of "")."""
    mask = dropout_mask(len(ids), rate, generator)
    return torch.where(mask[:, None], empty.to(ids.dtype).expand_as(ids), ids)


@dataclass
class LatentCache:
    """The frozen VAE's posteriors of ``n`` dataset images, and their captions' token ids.

    Encoding once and sampling the stored posterior every step is the same as encoding every step
    (the encoder is frozen) at a fraction of the cost.
    """

    mean: torch.Tensor  # [N, 4, h, w] float32, unscaled
    logvar: torch.Tensor  # [N, 4, h, w] float32
    ids: torch.Tensor  # [N, 77] int64
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def indices(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """Batch ``step`` of an endless sequence of epochs, each a fresh permutation of the cache."""
        n = len(self)
        positions = torch.arange(step * batch_size, (step + 1) * batch_size)
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
            order = torch.randperm(n, generator=step_generator(seed, STREAM_BATCH, epoch))
            chosen = positions.div(n, rounding_mode="floor") == epoch
            out[chosen] = order[positions[chosen] % n]
        return out

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unscaled latents drawn from the stored posteriors."""
        mean, std = self.mean[indices], (0.5 * self.logvar[indices]).exp()
        return mean + std * torch.randn(mean.shape, generator=generator)

    def state_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "logvar": self.logvar, "ids": self.ids, "captions": self.captions}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> LatentCache:
        return cls(**state)  # type: ignore[arg-type]


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions))
