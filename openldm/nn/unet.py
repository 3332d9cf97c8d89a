"""The denoising UNet of every Stable Diffusion variant (the reference's ``openaimodel.UNetModel``).

The module tree mirrors the reference exactly, so the keys of an original checkpoint's
``model.diffusion_model.*`` load with ``strict=True`` and no rename table:

- ``time_embed.0/2``: the timestep MLP; ``label_emb``: the class embedding (an ``nn.Embedding`` for
  integer classes, ``label_emb.0.0/0.2`` for a projected vector);
- ``input_blocks.N.M``: the stem conv, then per level ``num_res_blocks`` ResBlocks (each followed by
  a SpatialTransformer at levels in ``attention_resolutions``) and a ``Downsample`` (``op``);
- ``middle_block.0/1/2``: ResBlock, SpatialTransformer, ResBlock;
- ``output_blocks.N.M``: per level ``num_res_blocks + 1`` ResBlocks on the concatenated skip
  connection, transformers as on the way down, and an ``Upsample`` (``conv``) closing each level
  but the last;
- ``out.0/2``: GroupNorm, SiLU, conv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from openldm.config import UNetConfig
from openldm.nn.attention import GroupNorm32, SpatialTransformer, whole_batch
from openldm.nn.upcast import compute_dtype


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as (B, dim) fp32: the cosine half first."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def normalization(channels: int) -> GroupNorm32:
    """The reference's ``normalization``: 32 groups, eps 1e-5, computed in fp32."""
    return GroupNorm32(32, channels, eps=1e-5)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is the reference's dropout (p=0 in every Stable Diffusion config).
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """A 3x3 stride-2 conv (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (key ``conv``).

    ``size`` (the next skip connection's height and width) lets latents whose side is not a
    multiple of 8 (images that are multiples of 8 but not of 64) line up with their skips, where
    the reference's fixed 2x would fail; for even sizes the two are identical.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the embedding to ResBlocks and the context to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb[: x.shape[0]])  # x may be the first of twin halves (UNetModel)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class FeatureReuse:
    """DeepCache-style feature reuse (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for
    Free"): the UNet's deep features change little from one step to the next, so a full call every
    ``interval`` calls keeps the feature that enters the output block taking input block ``branch``'s
    skip, and the calls between run only input blocks 0..``branch`` and the output blocks from there on,
    starting from the kept feature (at branch 0 on SD 1.5: the first convolution and the last output
    block). The state of one sampling run: :meth:`start_call` before each UNet call."""

    interval: int
    branch: int = 0
    deep: torch.Tensor | None = None
    calls: int = 0

    def start_call(self, batch: int) -> None:
        """Forget the kept feature when this call is to be a full one (every ``interval``-th, and when the
        batch changed: guidance stopped by ``cfg_end``)."""
        if self.calls % self.interval == 0 or (self.deep is not None and self.deep.shape[0] != batch):
            self.deep = None
        self.calls += 1


class FeatureReusingUNet(nn.Module):
    """``unet(x, t, context, ...)`` with :class:`FeatureReuse` at ``interval`` (one sampling run)."""

    def __init__(self, unet: UNetModel, interval: int, branch: int = 0) -> None:
        super().__init__()
        if not 0 <= branch < len(unet.input_blocks):
            raise ValueError(
                f"branch {branch} is not an input block of this UNet (0..{len(unet.input_blocks) - 1})"
            )
        self.unet = unet
        self.state = FeatureReuse(interval, branch)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> torch.Tensor:
        self.state.start_call(x.shape[0])
        return self.unet(x, timesteps, context, reuse=self.state, **extra)


class UNetModel(nn.Module):
    """The UNet, built from a :class:`~openldm.config.UNetConfig`.

    Cheap to build on the meta device (``with torch.device("meta"): UNetModel(cfg)``) and then
    fill with ``load_state_dict(sd, assign=True, strict=True)``.
    """

    def __init__(self, config: UNetConfig, decoder: bool = True) -> None:
        """``decoder=False`` builds the encoder half only (a ControlNet takes it: no output blocks)."""
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        n_levels = len(config.channel_mult)
        disable_sa = config.disable_self_attentions or (False,) * n_levels

        def transformer(ch: int, disable_self_attn: bool) -> SpatialTransformer:
            heads, dim_head = config.heads_for(ch)
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                config.transformer_depth,
                config.context_dim,
                disable_self_attn=disable_self_attn,
                use_linear=config.use_linear_in_transformer,
                upcast=config.upcast_attention,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if isinstance(config.num_classes, int):
            self.label_emb: nn.Module | None = nn.Embedding(config.num_classes, emb_dim)
        elif config.num_classes == "sequential":
            assert config.adm_in_channels is not None
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )
        else:
            self.label_emb = None

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        level_ends = []
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            attention = 2**level in config.attention_resolutions
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if attention:
                    layers.append(transformer(ch, disable_sa[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            level_ends.append(len(self.input_blocks) - 1)
            if level != n_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), transformer(ch, False), ResBlock(ch, emb_dim, ch)
        )

        self.skip_channels = tuple(skip_channels)
        # The input block ending each level (before its downsample): where a T2I-Adapter's features add.
        self.level_ends = tuple(level_ends)
        self.output_blocks = nn.ModuleList()
        if not decoder:
            return
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            attention = 2**level in config.attention_resolutions
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if attention:
                    layers.append(transformer(ch, disable_sa[level]))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        # Training only: each block's activations are recomputed in the backward pass instead of kept.
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
        features: Sequence[torch.Tensor] | None = None,
        reuse: FeatureReuse | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for latents ``x`` (B, C, H, W) at ``timesteps`` (B,).

        ``context`` is the (B, N, context_dim) text conditioning; ``y`` the class input: int labels
        (B,) for an integer class embedding (the x4 upscaler's noise level), a (B, adm_in_channels)
        vector for ``num_classes="sequential"`` (unCLIP's image embedding). ``control``: residuals
        added to each skip connection and, last, to the middle block's output (a ControlNet's).
        ``features``: one map per level, added to the output of the level's last input block, which the
        next blocks and the skip connection then see (a T2I-Adapter's). ``reuse``: DeepCache-style
        feature reuse (:class:`FeatureReuse`): a full call keeps the deep feature at its branch, a call
        with one kept runs only the shallow blocks around it.

        A batch of twin halves (:func:`twin_halves`: classifier-free guidance's doubled latents) runs
        the blocks before the first attention that reads the context once, on one half, and goes on
        as a whole from there (on 2 CPU cores: SD 1.5 step at 512 7.99 -> 7.71 s, SD 2.1-v at 768
        21.91 -> 21.06 s; the output moves by 6e-6 relative, other products' rounding).
        """
        if context is None:
            raise ValueError("the UNet needs a context tensor (B, N, context_dim) for its cross-attention")
        if self.label_emb is None and y is not None:
            raise ValueError("y was given but this UNet has no class conditioning (num_classes is None)")
        if self.label_emb is not None and y is None:
            raise ValueError(
                f"this UNet is class-conditioned (num_classes={self.config.num_classes!r}); pass y"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])

        dtype = compute_dtype(self)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            assert y is not None
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]}, x has {x.shape[0]}")
            emb = emb + self.label_emb(y if isinstance(self.label_emb, nn.Embedding) else y.to(dtype))

        batch = x.shape[0]
        # Twin halves (classifier-free guidance): the blocks before the first attention that reads the
        # context compute the same for both halves, so they run once, on the first
        h = x.to(dtype)[: batch // 2] if twin_halves(x, timesteps, y) else x.to(dtype)
        context = context.to(dtype)
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        if features is not None and len(features) != len(self.level_ends):
            raise ValueError(
                f"features has {len(features)} maps; this UNet has {len(self.level_ends)} levels"
            )
        added = dict(zip(self.level_ends, features or (), strict=False))
        # Feature reuse: only the input blocks up to the branch, then the deep feature kept from an
        # earlier call goes on through the output blocks that take those blocks' skips.
        shallow = reuse is not None and reuse.deep is not None
        # the output block taking the branch's skip: where a full call keeps h, a shallow one resumes
        resume = len(self.output_blocks) - 1 - reuse.branch if reuse is not None else -1
        skips = []
        for index, block in enumerate(
            self.input_blocks[: reuse.branch + 1] if shallow else self.input_blocks
        ):
            h = run(block, h, emb, context)
            if index in added:
                h = whole_batch(h, batch) + added[index].to(h.dtype)
            skips.append(whole_batch(h, batch))
        h = whole_batch(h, batch)
        if shallow and control is not None:
            raise ValueError(
                "feature reuse takes no ControlNet residuals: its shallow calls skip their blocks"
            )
        h = reuse.deep if shallow else run(self.middle_block, h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control has {len(control)} residuals; this UNet takes {len(skips) + 1}")
            h = h + control[-1].to(h.dtype)
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, control, strict=False)]
        first = resume if shallow else 0
        for index, block in enumerate(self.output_blocks[first:], start=first):
            if reuse is not None and not shallow and index == resume:
                reuse.deep = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h).to(x.dtype)

    @staticmethod
    def _checkpointed(block: nn.Module, *args: object) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _call(block: nn.Module, *args: object) -> torch.Tensor:
    return block(*args)


def twin_halves(x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> bool:
    """Whether the batch is two equal halves up to the context: latents, timesteps and class input
    (classifier-free guidance's doubled call, its halves differing only in the prompt). Not while
    computing gradients (training's batches, and one path for the backward pass)."""
    half = x.shape[0] // 2
    if half == 0 or 2 * half != x.shape[0] or torch.is_grad_enabled():
        return False
    inputs = (x, timesteps) if y is None else (x, timesteps, y)
    return all(torch.equal(t[:half], t[half:]) for t in inputs)
