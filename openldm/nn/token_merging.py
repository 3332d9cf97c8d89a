"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

Self-attention at the UNet's full latent resolution costs the square of its token count (4096 tokens at
512x512, 9216 at 768x768). Many of those tokens are near copies of their neighbours; merging the most
similar ones before the self-attention and copying the result back after it removes their share of the
work. Per transformer block at the full resolution:

* destinations: one token of every 2x2 square of the map, at a random position in the square (drawn
  from the run's own generator, one draw per block call: reproducible; without a generator the
  top-left one); every other token is a source;
* each source is matched to its most similar destination (cosine similarity of the block's input);
  the ``ratio * N`` sources with the best matches are averaged into their destinations;
* the self-attention runs on the tokens left; each merged source then takes its destination's output.

Enabled by :func:`merging_tokens` (a context: every :class:`~openldm.nn.attention.SpatialTransformer`
called inside it merges, the ControlNets' too); ``ratio`` 0 changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TokenMerging:
    """The setting of one sampling run: the ratio, the latent's token count (the full resolution), and
    the generator the destinations are drawn from (None: always the top-left token of a square)."""

    ratio: float
    tokens: int
    generator: torch.Generator | None = None

    def applies(self, height: int, width: int) -> bool:
        """Whether a map of ``height`` x ``width`` is at the full resolution (downsampled by 1)."""
        return math.ceil(math.sqrt(self.tokens // (height * width))) <= 1


_ACTIVE: contextvars.ContextVar[TokenMerging | None] = contextvars.ContextVar("token_merging", default=None)


@contextlib.contextmanager
def merging_tokens(
    ratio: float, latent: tuple[int, int], generator: torch.Generator | None = None
) -> Iterator[None]:
    """Merge ``ratio`` of the tokens of every full-resolution self-attention for latents of size
    ``latent`` (height, width) inside the block, destinations drawn from ``generator``."""
    if not 0 <= ratio < 1:
        raise ValueError(f"the token merging ratio must be in [0, 1), got {ratio!r}")
    setting = TokenMerging(ratio, latent[0] * latent[1], generator) if ratio > 0 else None
    token = _ACTIVE.set(setting)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active(height: int, width: int) -> TokenMerging | None:
    """The merging setting for a transformer over a ``height`` x ``width`` map, or None."""
    setting = _ACTIVE.get()
    return setting if setting is not None and setting.applies(height, width) else None


def _destinations(
    height: int, width: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source indices, destination indices) of a ``height`` x ``width`` map's flattened tokens: one
    destination per whole 2x2 square (position 0-3 in it, row-major, drawn from ``generator``, else 0);
    rows and columns beyond the last whole square are sources."""
    squares_y, squares_x = height // 2, width // 2
    if generator is None:
        pick = torch.zeros(squares_y, squares_x, dtype=torch.int64)
    else:
        pick = torch.randint(4, (squares_y, squares_x), generator=generator, device=generator.device).cpu()
    is_destination = torch.zeros(height, width, dtype=torch.bool)
    rows = torch.arange(squares_y)[:, None] * 2 + pick // 2
    cols = torch.arange(squares_x)[None, :] * 2 + pick % 2
    is_destination[rows, cols] = True
    flat = is_destination.flatten()
    return torch.nonzero(~flat).squeeze(1), torch.nonzero(flat).squeeze(1)


def plan(
    x: torch.Tensor, height: int, width: int, ratio: float, generator: torch.Generator
) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens ``x`` [B, height * width, C]: ``merge`` maps [B, N, C'] to the
    [B, N - r, C'] kept tokens (sources unmatched, then destinations with their matches averaged in);
    ``unmerge`` maps those back to [B, N, C'], each merged source taking its destination's values."""
    sources, destinations = (index.to(x.device) for index in _destinations(height, width, generator))
    merged = min(int(x.shape[1] * ratio), len(sources))
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, sources] @ metric[:, destinations].transpose(1, 2)
        best, best_destination = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
    moved, kept = order[:, :merged], order[:, merged:]  # positions among the sources
    target = best_destination.gather(1, moved)  # positions among the destinations
    batch = x.shape[0]

    def merge(values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[-1]
        source_values, destination_values = values[:, sources], values[:, destinations]
        unmerged = source_values.gather(1, kept[..., None].expand(batch, -1, channels))
        moving = source_values.gather(1, moved[..., None].expand(batch, -1, channels))
        destination_values = destination_values.scatter_reduce(
            1, target[..., None].expand(batch, -1, channels), moving, reduce="mean", include_self=True
        )
        return torch.cat([unmerged, destination_values], dim=1)

    def unmerge(values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[-1]
        unmerged, destination_values = values[:, : kept.shape[1]], values[:, kept.shape[1] :]
        out = values.new_empty(batch, height * width, channels)
        out[:, destinations] = destination_values
        source_values = values.new_empty(batch, len(sources), channels)
        source_values.scatter_(1, kept[..., None].expand(batch, -1, channels), unmerged)
        taken = destination_values.gather(1, target[..., None].expand(batch, -1, channels))
        source_values.scatter_(1, moved[..., None].expand(batch, -1, channels), taken)
        out[:, sources] = source_values
        return out

    return merge, unmerge
