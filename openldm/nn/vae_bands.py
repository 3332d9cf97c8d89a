"""The autoencoder run band by band: large images coded in bounded memory, with no seams.

The whole-image VAE holds several full-resolution activations at once (a 2048x2048 decode needs
about 23 GB in fp32). Here every layer runs over horizontal bands of rows, one after another, and
only the maps a layer reads or writes are kept whole: a residual block's input, its middle activation
and (when its width changes) its output. GroupNorm statistics are summed over all bands as a map is
written, so every norm uses the whole map's statistics and every convolution sees its true neighbours
(one row above and below the band): the result is the whole-image computation up to the order of
floating-point sums — no tiles, no blending, no seams.

Two parts are not row-local:

* the mid block's self-attention, over every latent pixel: computed whole (queries by bands against all
  keys) up to :data:`GLOBAL_ATTENTION_TOKENS` latent pixels; beyond that (a 2048 decode of the x4
  upscaler's VAE, 262144 tokens: 140 TFLOP whole), each square of latents attends to a neighbourhood
  of :data:`WINDOW_MARGIN` latents around it — the one approximation, stated in :func:`attention_is_whole`;
* the maps kept whole: stored in float32, or in float16 when float32 does not fit the memory given
  (half the bytes; values are rounded to fp16 between layers, computed in fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openldm.config import VAEConfig
from openldm.nn.upcast import compute_dtype
from openldm.nn.vae import AttnBlock, AutoencoderKL, DiagonalGaussian, Level, MidBlock, ResnetBlock

# Latent pixels up to which the mid block's attention is computed over all of them.
GLOBAL_ATTENTION_TOKENS = 256 * 256
# Beyond that: squares of WINDOW latents attend to WINDOW_MARGIN latents around them.
WINDOW = 64
WINDOW_MARGIN = 32
# Working memory of one band (its input rows, output rows and temporaries).
BAND_BYTES = 64 * 1024**2


class BandMemoryError(ValueError):
    """The maps a banded VAE call keeps whole do not fit the memory given, even in float16."""


@dataclass
class _Tracker:
    """Bytes of the maps alive, and their peak."""

    live: int = 0
    peak: int = 0

    def add(self, count: int) -> None:
        self.live += count
        self.peak = max(self.peak, self.live)


class _Moments:
    """Per-group mean and variance of everything added, band by band: each band's from GroupNorm's own
    fused kernel (stable, one pass), merged in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.state: tuple[Tensor, Tensor, Tensor] | None = None  # count, mean, squared deviations

    def add(self, values: Tensor) -> None:
        batch, channels = values.shape[:2]
        _, mean, rstd = torch.ops.aten.native_group_norm(
            values, None, None, batch, channels, values[0, 0].numel(), self.groups, 0.0
        )
        count = values[0].numel() / self.groups
        mean, squares = mean.double(), rstd.double().pow(-2) * count
        if self.state is None:
            self.state = (torch.tensor(count, dtype=torch.float64), mean, squares)
            return
        seen, seen_mean, seen_squares = self.state
        total = seen + count
        delta = mean - seen_mean
        self.state = (
            total,
            seen_mean + delta * (count / total),
            seen_squares + squares + delta.square() * (seen * count / total),
        )

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean, variance) per [B, groups], float64."""
        assert self.state is not None, "statistics of a map nothing was written to"
        count, mean, squares = self.state
        return mean, squares / count


@dataclass
class _Map:
    """A [B, C, H, W] map kept whole, written band by band, with the per-group moments of what was
    written since :meth:`track` (for the GroupNorm that reads it next)."""

    data: Tensor
    tracker: _Tracker
    moments: _Moments | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def rows(self) -> int:
        return self.data.shape[-2]

    def track(self, groups: int | None) -> None:
        """Gather the moments of what is written from now on per ``groups`` channel groups (None: none)."""
        self.moments = None if groups is None else _Moments(groups)

    def write(self, start: int, values: Tensor) -> None:
        stored = values.to(self.data.dtype)
        if (
            stored.dtype == torch.float16
            and stored.device.type != "meta"
            and not torch.isfinite(stored).all()
        ):
            raise BandMemoryError(
                "a VAE activation exceeds the float16 range the banded VAE stores it in (float32 did not "
                "fit the memory given); free memory, or code a smaller image"
            )
        self.data[:, :, start : start + values.shape[-2]] = stored
        if self.moments is not None:
            self.moments.add(values)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean, variance) per [B, groups], float64, of everything written since :meth:`track`."""
        assert self.moments is not None, "statistics of a map without moments"
        return self.moments.statistics()

    def read(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows ``start:stop`` (clipped to the map) in ``dtype``."""
        return self.data[:, :, max(start, 0) : min(stop, self.rows)].to(dtype)

    def free(self) -> None:
        self.tracker.add(-self.data.numel() * self.data.element_size())
        self.data = self.data.new_empty(0)


@dataclass
class _Run:
    """One banded call: where maps live, their storage dtype, the compute dtype, the GroupNorm groups,
    and the bytes of the maps kept (tracked)."""

    device: torch.device
    storage: torch.dtype
    compute: torch.dtype
    groups: int
    recompute: bool = False
    band_bytes: int = BAND_BYTES
    tracker: _Tracker = field(default_factory=_Tracker)

    def band_rows(self, per_row: int) -> int:
        """Rows per band for a layer needing ``per_row`` bytes of working memory per output row."""
        return max(1, self.band_bytes // max(per_row, 1))

    def new_map(
        self,
        like: Tensor | _Map | _Computed,
        channels: int,
        height: int,
        width: int,
        dtype: torch.dtype | None = None,
    ) -> _Map:
        batch = like.shape[0]
        data = torch.empty(batch, channels, height, width, dtype=dtype or self.storage, device=self.device)
        self.tracker.add(data.numel() * data.element_size())
        out = _Map(data, self.tracker)
        out.track(self.groups if channels % self.groups == 0 else None)
        return out

    def weights(self, layer: nn.Module) -> tuple[Tensor, Tensor | None]:
        weight = layer.weight.to(self.device, self.compute)
        return weight, None if layer.bias is None else layer.bias.to(self.device, self.compute)


class _Computed:
    """The decoder's upsampling convolution's output, computed when read instead of kept (its rows are
    recomputed for the next residual block: time for the largest map's memory). Its statistics come
    from one pass at creation; the last rows read are cached for a second read of the same band."""

    def __init__(self, run: _Run, source: _Map, conv: nn.Conv2d) -> None:
        self.run, self.source, self.conv = run, source, conv
        batch, _, height, width = source.shape
        self.shape = (batch, conv.out_channels, height * 2, width * 2)
        self.rows = height * 2
        self.cached: tuple[int, int, Tensor] | None = None
        self.moments = _Moments(run.groups)
        step = run.band_rows(4 * 3 * conv.in_channels * width * 2 * 3)
        for start in range(0, self.rows, step):
            self.moments.add(self._compute(start, min(start + step, self.rows)))

    def _compute(self, start: int, stop: int) -> Tensor:
        weight, bias = self.run.weights(self.conv)
        rows = _conv_input(self.run, self.source, start - 1, stop + 1, None, upsample=True)
        return F.conv2d(rows, weight, bias, padding=(0, 1))

    def read(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        start, stop = max(start, 0), min(stop, self.rows)
        if self.cached is None or not self.cached[0] <= start <= stop <= self.cached[1]:
            self.cached = (start, stop, self._compute(start, stop))
        first, _, rows = self.cached
        return rows[:, :, start - first : stop - first].to(dtype)

    def statistics(self) -> tuple[Tensor, Tensor]:
        return self.moments.statistics()

    def free(self) -> None:
        self.cached = None
        self.source.free()


def _normalize(x: Tensor, norm: nn.GroupNorm, source: _Map | _Computed, silu: bool = True) -> Tensor:
    """GroupNorm of band ``x`` with the statistics of the whole ``source``, then SiLU (unless not)."""
    return _normalize_with(x, norm, source.statistics(), silu)


def _normalize_with(
    x: Tensor, norm: nn.GroupNorm, statistics: tuple[Tensor, Tensor], silu: bool = True
) -> Tensor:
    mean, var = statistics
    per_group = x.shape[1] // norm.num_groups
    # Folded into one scale and shift per channel: a single pass over the band.
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.to(x.device, torch.float64)
    shift = norm.bias.to(x.device, torch.float64) - mean.repeat_interleave(per_group, dim=1) * scale
    out = torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])
    return F.silu(out, inplace=True) if silu else out


def _conv_input(
    run: _Run, source: _Map | _Computed, start: int, stop: int, norm: nn.GroupNorm | None, upsample: bool
) -> Tensor:
    """Rows ``start:stop`` of a convolution's input (the source, normalised, upsampled x2 when asked),
    zero outside the map as the convolution's padding is."""
    scale = 2 if upsample else 1
    first, last = max(start, 0), min(stop, source.rows * scale)
    rows = source.read(first // scale, (last - 1) // scale + 1, run.compute)
    if norm is not None:
        rows = _normalize(rows, norm, source)
    if upsample:
        rows = F.interpolate(rows, scale_factor=2.0, mode="nearest")
        rows = rows[:, :, first % 2 : first % 2 + last - first]
    if first == start and last == stop:
        return rows
    return F.pad(rows, (0, 0, first - start, stop - last))


def _conv(
    run: _Run,
    source: _Map | _Computed,
    conv: nn.Conv2d,
    target: _Map,
    *,
    norm: nn.GroupNorm | None = None,
    upsample: bool = False,
    downsample: bool = False,
    skip: Callable[[int, int], Tensor] | None = None,
    after: Callable[[int, int], None] | None = None,
) -> None:
    """``target = conv(silu(norm(source)))`` (+ ``skip(start, stop)``), band by band of rows;
    ``after(start, stop)`` is called once a band is written.

    ``upsample``: nearest x2 before the convolution (the decoder's Upsample); ``downsample``: the
    encoder's Downsample (pad right and bottom by one, 3x3 with stride 2)."""
    weight, bias = run.weights(conv)
    kernel = conv.kernel_size[0]
    stride = 2 if downsample else 1
    pad = 0 if downsample else conv.padding[0]
    width = source.shape[-1] * (2 if upsample else 1)
    per_row = 4 * (3 * conv.in_channels * width * stride + 3 * conv.out_channels * target.shape[-1])
    step = run.band_rows(per_row)
    for start in range(0, target.rows, step):
        stop = min(start + step, target.rows)
        x = _conv_input(run, source, start * stride - pad, (stop - 1) * stride - pad + kernel, norm, upsample)
        if downsample:
            x = F.pad(x, (0, 1))
        out = F.conv2d(x, weight, bias, stride=stride, padding=(0, pad))
        if skip is not None:
            out = out + skip(start, stop)
        target.write(start, out)
        if after is not None:
            after(start, stop)


def _resnet(run: _Run, x: _Map | _Computed, block: ResnetBlock) -> _Map:
    _, _, height, width = x.shape
    middle = run.new_map(x, block.conv1.out_channels, height, width)
    if block.nin_shortcut is None and isinstance(x, _Map):
        # The output replaces the input band by band: each band's skip is read before it is overwritten.
        _conv(run, x, block.conv1, middle, norm=block.norm1)
        out = x
        out.track(run.groups)  # (a residual block keeps its width: divisible)
    else:
        # The skip is stored in the output as the first pass reads its input (from a computed map: while
        # the band is at hand), then the second pass adds to it.
        out = run.new_map(x, block.conv2.out_channels, height, width)
        out.track(None)
        shortcut = None if block.nin_shortcut is None else run.weights(block.nin_shortcut)

        def store_skip(start: int, stop: int) -> None:
            rows = x.read(start, stop, run.compute)
            out.write(start, rows if shortcut is None else F.conv2d(rows, *shortcut))

        _conv(run, x, block.conv1, middle, norm=block.norm1, after=store_skip)
        out.track(run.groups)

    def skip(start: int, stop: int) -> Tensor:
        return out.read(start, stop, run.compute)

    _conv(run, middle, block.conv2, out, norm=block.norm2, skip=skip)
    middle.free()
    if out is not x:
        x.free()
    return out


def attention_is_whole(latent_pixels: int) -> bool:
    """Whether a banded call's mid-block attention is the whole-image one (else windowed)."""
    return latent_pixels <= GLOBAL_ATTENTION_TOKENS


def _tokens(run: _Run, x: Tensor, layer: nn.Conv2d) -> Tensor:
    """[B, C, h, w] -> the 1x1 projection as [B, 1, h * w, C] (contiguous, as SDPA's CPU kernel wants)."""
    weight, bias = run.weights(layer)
    return F.linear(x.flatten(2).transpose(1, 2), weight.flatten(1), bias)[:, None].contiguous()


def _attended(run: _Run, band: Tensor, attended: Tensor, block: AttnBlock) -> Tensor:
    """The block's output on ``band``: its input plus the projected attention ([B, 1, n, C] tokens)."""
    b, c, h, w = band.shape
    weight, bias = run.weights(block.proj_out)
    projected = F.linear(attended[:, 0], weight.flatten(1), bias)
    return band + projected.transpose(1, 2).reshape(b, c, h, w)


def _attention(run: _Run, x: _Map, block: AttnBlock) -> _Map:
    _, channels, height, width = x.shape
    if attention_is_whole(height * width):
        return _whole_attention(run, x, block)
    out = run.new_map(x, channels, height, width)
    if run.device.type == "meta":  # planning: the maps are what counts
        out.write(0, out.data.to(run.compute))
        x.free()
        return out
    for top in range(0, height, WINDOW):
        bottom = min(top + WINDOW, height)
        lo, hi = max(top - WINDOW_MARGIN, 0), min(bottom + WINDOW_MARGIN, height)
        around = _normalize(x.read(lo, hi, run.compute), block.norm, x, silu=False)
        band = x.read(top, bottom, run.compute)
        pieces = []
        for left in range(0, width, WINDOW):
            right = min(left + WINDOW, width)
            window = around[..., max(left - WINDOW_MARGIN, 0) : min(right + WINDOW_MARGIN, width)]
            query = _tokens(run, around[:, :, top - lo : bottom - lo, left:right], block.q)
            attended = F.scaled_dot_product_attention(
                query, _tokens(run, window, block.k), _tokens(run, window, block.v)
            )
            pieces.append(_attended(run, band[..., left:right], attended, block))
        out.write(top, torch.cat(pieces, dim=-1))
    x.free()
    return out


def _whole_attention(run: _Run, x: _Map, block: AttnBlock) -> _Map:
    _, channels, height, width = x.shape
    step = run.band_rows(4 * channels * width * 6)
    keys, values = [], []
    for start in range(0, height, step):
        normed = _normalize(x.read(start, start + step, run.compute), block.norm, x, silu=False)
        keys.append(_tokens(run, normed, block.k))
        values.append(_tokens(run, normed, block.v))
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    kept = 2 * k.numel() * k.element_size()
    run.tracker.add(kept)
    statistics = x.statistics()
    out = x  # each band's queries and skip are read before the band is overwritten
    out.track(run.groups)
    for start in range(0, height, step):
        band = x.read(start, start + step, run.compute)
        query = _tokens(run, _normalize_with(band, block.norm, statistics, silu=False), block.q)
        out.write(start, _attended(run, band, F.scaled_dot_product_attention(query, k, v), block))
    run.tracker.add(-kept)
    return out


def _mid(run: _Run, x: _Map, mid: MidBlock) -> _Map:
    return _resnet(run, _attention(run, _resnet(run, x, mid.block_1), mid.attn_1), mid.block_2)


def _level(run: _Run, x: _Map | _Computed, level: Level) -> _Map | _Computed:
    for block in level.block:
        x = _resnet(run, x, block)
    for resample, up in ((level.upsample, True), (level.downsample, False)):
        if resample is not None:
            _, channels, height, width = x.shape
            size = (height * 2, width * 2) if up else (height // 2, width // 2)
            if up and run.recompute:
                x = _Computed(run, x, resample.conv)
                continue
            out = run.new_map(x, channels, *size)
            _conv(run, x, resample.conv, out, upsample=up, downsample=not up)
            x.free()
            x = out
    return x


def _convolved(
    run: _Run, x: _Map | _Computed, conv: nn.Conv2d, norm: nn.GroupNorm | None = None, last: bool = False
) -> _Map:
    """A new map ``conv(silu(norm(x)))`` of ``x``'s size; ``x`` freed. ``last``: in the compute dtype."""
    _, _, height, width = x.shape
    out = run.new_map(x, conv.out_channels, height, width, run.compute if last else None)
    _conv(run, x, conv, out, norm=norm)
    x.free()
    return out


def _start(run: _Run, tensor: Tensor) -> _Map:
    """The call's input as a map (counted, as the caller keeps it)."""
    x = run.new_map(tensor, tensor.shape[1], *tensor.shape[-2:], run.compute)
    x.write(0, tensor.to(run.device, run.compute))
    return x


def _decode(run: _Run, vae: AutoencoderKL, z: Tensor) -> Tensor:
    decoder = vae.decoder
    x = _convolved(run, _start(run, z), vae.post_quant_conv)
    x = _mid(run, _convolved(run, x, decoder.conv_in), decoder.mid)
    for level in reversed(decoder.up):
        x = _level(run, x, level)
    return _convolved(run, x, decoder.conv_out, decoder.norm_out, last=True).data


def _encode(run: _Run, vae: AutoencoderKL, pixels: Tensor) -> Tensor:
    encoder = vae.encoder
    x = _convolved(run, _start(run, pixels), encoder.conv_in)
    for level in encoder.down:
        x = _level(run, x, level)
    x = _convolved(run, _mid(run, x, encoder.mid), encoder.conv_out, encoder.norm_out)
    return _convolved(run, x, vae.quant_conv, last=True).data


Direction = Literal["decode", "encode"]


@dataclass(frozen=True)
class Plan:
    """How a banded call keeps its maps: ``storage`` dtype; ``recompute``: the decoder's upsampled maps
    are recomputed when read rather than kept (about a third more time, a third less memory)."""

    storage: torch.dtype
    recompute: bool = False


def _call(
    vae: AutoencoderKL, x: Tensor, direction: Direction, plan: Plan, device: torch.device
) -> tuple[Tensor, int]:
    band_bytes = 2**62 if device.type == "meta" else BAND_BYTES  # one band per layer when nothing is computed
    groups = vae.decoder.norm_out.num_groups
    run = _Run(device, plan.storage, compute_dtype(vae), groups, plan.recompute, band_bytes)
    with torch.no_grad():
        out = (_decode if direction == "decode" else _encode)(run, vae, x)
    return out, run.tracker.peak


def kept_bytes(vae: AutoencoderKL, shape: tuple[int, ...], direction: Direction, plan: Plan) -> int:
    """The peak bytes of the maps a banded call on an input of ``shape`` keeps whole, told without
    computing anything (the same call on the meta device). Each band's working memory comes on top:
    about :data:`BAND_BYTES`."""
    meta = torch.empty(shape, dtype=compute_dtype(vae), device="meta")
    return _call(vae, meta, direction, plan, torch.device("meta"))[1]


def plan_for(vae: AutoencoderKL, shape: tuple[int, ...], direction: Direction, memory: int) -> Plan:
    """The first plan that fits ``memory`` bytes, most exact and fastest first: maps in the compute
    dtype, then recomputed upsamplings, then float16 storage; :class:`BandMemoryError` when none does."""
    compute = compute_dtype(vae)
    storages = [compute] if compute.itemsize <= 2 else [compute, torch.float16]
    plans = [Plan(storage, recompute) for storage in storages for recompute in (False, True)]
    if direction == "encode":
        plans = [plan for plan in plans if not plan.recompute]
    for plan in plans:
        needed = kept_bytes(vae, shape, direction, plan) + BAND_BYTES
        if needed <= memory:
            return plan
    raise BandMemoryError(
        f"coding a {shape[-1]}x{shape[-2]} {'latent' if direction == 'decode' else 'image'} by bands needs "
        f"about {needed / 1024**3:.2f} GiB, but {memory / 1024**3:.2f} GiB is available; free memory or "
        "code a smaller image"
    )


def decode_in_bands(vae: AutoencoderKL, z: Tensor, memory: int, plan: Plan | None = None) -> Tensor:
    """``vae.decode(z)`` (unscaled latents) band by band, within about ``memory`` bytes (or by ``plan``)."""
    vae._check_input(z, vae.config.embed_dim, "latent", 1)
    plan = plan or plan_for(vae, tuple(z.shape), "decode", memory)
    return _call(vae, z, "decode", plan, z.device)[0]


def encode_in_bands(
    vae: AutoencoderKL, pixels: Tensor, memory: int, plan: Plan | None = None
) -> DiagonalGaussian:
    """``vae.encode(pixels)`` band by band, within about ``memory`` bytes (or by ``plan``)."""
    vae._check_input(pixels, vae.config.in_channels, "image", vae.config.downsampling_factor)
    plan = plan or plan_for(vae, tuple(pixels.shape), "encode", memory)
    return DiagonalGaussian(_call(vae, pixels, "encode", plan, pixels.device)[0])


@functools.lru_cache(maxsize=64)
def least_bytes(config: VAEConfig, shape: tuple[int, ...], direction: Direction) -> int:
    """The memory of the leanest banded call (float16 maps, upsamplings recomputed) on an input of
    ``shape`` for a VAE of ``config``, its band's working memory included: what a memory check counts."""
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    plan = Plan(torch.float16, recompute=direction == "decode")
    return kept_bytes(vae, shape, direction, plan) + BAND_BYTES
