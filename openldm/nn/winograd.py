"""3x3 convolutions by Winograd's minimal filtering, F(m x m, 3 x 3) (Lavin and Gray, "Fast Algorithms
for Convolutional Neural Networks", 2015), for CPU inference.

The input is cut into overlapping (m+2) x (m+2) tiles; tiles and filters are taken to a domain where
the convolution is an elementwise product, which over all channels is (m+2)^2 independent matrix
products, and the products are taken back to m x m output tiles. F(4x4, 3x3) makes 36 multiplications
per 16 outputs instead of 144, in matrix products that run at the BLAS's full rate where a CPU's
direct convolution of a small map does not. On 2 AVX2 cores a guided SD 1.5 UNet step at 512 takes
0.74x the time of the direct convolutions. Against a fp64 convolution, relative to the largest
output: F(2x2) 3e-7, closer than the direct fp32 convolution (1e-6 to 4e-6); F(4x4) 5e-6, its
interpolation points +-2 costing a few bits. Large maps take their tiles in and out by native
transforms (``winograd.c``, built by :mod:`openldm.nn.native`), one pass over memory each instead of
PyTorch's pad, gather, products by the transforms' matrices and scatter; PyTorch's operators do it
where no C compiler is found.

The transformed filters take 4x the filter's bytes (F(4x4); 16/9x for F(2x2), used on maps under
16x16 where 4x4 tiles would be mostly padding), so they are a trade of memory for speed: each layer
makes its own at its first call and keeps it, within a byte budget (:class:`WinogradBudget`) shared by
a model's networks; a layer that finds the budget spent runs the direct convolution. The kept filters
are remade when the weights change (a LoRA applied in place). Used only on a CPU, in fp32, and when no
gradient is wanted: GPU libraries choose such algorithms themselves, and training keeps the direct
convolution's memory use.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from openldm.devices import available_memory
from openldm.nn import native
from openldm.nn.upcast import compute_dtype

TileSize = Literal[2, 4]
MIN_CHANNELS = 256  # narrower layers spend more on the transforms than the products save
SMALL_MAP = 16  # maps smaller than this (on a side) use F(2x2)
WINOGRAD_RECORD = "winograd_conv3x3"  # the profiler's name for a call (bench/unet_step.py counts it)
# A call's transformed tiles are made a band of rows at a time, the band's share of the L3 cache: on
# 2 AVX2 cores (32 MB L3) 16 MB bands ran 256-channel 128x128 maps 1.7x faster than the direct
# convolution where 256 MB bands ran them no faster; 320 channels at 96x96: 1.85x against 1.17x.
BAND_BYTES = 16 * 2**20
# Calls of F(4x4) with at least this many tiles take the tiles in and out by the native transforms
# (winograd.c, one pass over memory each), the products as filters @ tiles; with fewer tiles the
# products' matrices are too narrow that way round and PyTorch's operators do better. Those calls' bands
# only bound their memory: passes over whole maps ran faster than bands of the cache's size. On PyTorch's
# own threads (native.py) the transforms start sooner and pay from fewer tiles (2 cores, batch 2: 640 ch
# at 32x32, 128 tiles, 69 -> 63 ms; 2560 -> 1280 ch at 24x24, 72 tiles, 238 -> 212; 1280 ch at 24x24
# even).
NATIVE_MIN_TILES = 256
NATIVE_MIN_TILES_SHARED = 64
NATIVE_BAND_BYTES = 128 * 2**20

# The transforms' matrices (B^T, G, A^T) for interpolation points 0, +-1 (F(2)) and 0, +-1, +-2 (F(4)).
_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


@functools.cache
def _kron(tile: TileSize, which: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A transform acting on a tile flattened row by row: kron(M, M) of one of the three matrices."""
    matrix = torch.tensor(_MATRICES[tile][which], dtype=torch.float64)
    return torch.kron(matrix, matrix).to(device, dtype)


def _transform(tile: TileSize, which: int, like: torch.Tensor) -> torch.Tensor:
    return _kron(tile, which, like.dtype, like.device)


def filter_bytes(weight: torch.Tensor, tile: TileSize, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the transformed filters of ``weight`` (out, in, 3, 3) for ``tile``, in ``dtype``."""
    return (tile + 2) ** 2 * weight.shape[0] * weight.shape[1] * torch.finfo(dtype).bits // 8


def transform_filters(weight: torch.Tensor, tile: TileSize) -> torch.Tensor:
    """(out, in, 3, 3) filters -> their (tile+2)^2 transformed (out, in) matrices."""
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels * in_channels, 9)
    return (_transform(tile, 1, weight) @ flat.T).view(-1, out_channels, in_channels)


def winograd_conv3x3(
    x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, tile: TileSize
) -> torch.Tensor:
    """A 3x3 convolution, stride 1, padding 1, of ``x`` (N, C, H, W) with filters made by
    :func:`transform_filters`; the input's rows are taken a band at a time when their transformed
    tiles would pass :data:`BAND_BYTES`."""
    with torch.profiler.record_function(WINOGRAD_RECORD):
        return _winograd_conv3x3(x, filters, bias, tile)


def _winograd_conv3x3(
    x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, tile: TileSize
) -> torch.Tensor:
    batch, channels, height, width = x.shape
    side = tile + 2
    rows, cols = -(-height // tile), -(-width // tile)
    row_bytes = side * side * batch * cols * max(channels, filters.shape[1]) * x.element_size()
    library = _native_transforms() if tile == 4 else None
    if library is not None and batch * rows * cols >= _native_min_tiles(library):
        band = max(1, NATIVE_BAND_BYTES // row_bytes)
        return _native_conv3x3(library, x.contiguous(), filters, bias, band)
    band = max(1, BAND_BYTES // row_bytes)
    padded = F.pad(x, (1, 1 + cols * tile - width, 1, 1 + rows * tile - height))
    if band >= rows:
        out = _tiles_conv(padded, filters, tile, rows, cols)
    else:
        out = x.new_empty(batch, filters.shape[1], rows * tile, cols * tile)
        for first in range(0, rows, band):
            last = min(rows, first + band)
            part = padded[:, :, first * tile : last * tile + 2]
            out[:, :, first * tile : last * tile] = _tiles_conv(part, filters, tile, last - first, cols)
    if out.shape[-2:] != (height, width):
        out = out[:, :, :height, :width].contiguous()
    return out if bias is None else out.add_(bias.view(-1, 1, 1))  # out is this call's own tensor


def _tiles_conv(
    padded: torch.Tensor, filters: torch.Tensor, tile: TileSize, rows: int, cols: int
) -> torch.Tensor:
    batch, channels = padded.shape[:2]
    side = tile + 2
    out_channels = filters.shape[1]
    tiles = padded.unfold(2, side, tile).unfold(3, side, tile)  # (N, C, rows, cols, side, side)
    tiles = tiles.permute(4, 5, 0, 2, 3, 1).reshape(side * side, -1)  # the one gather of the input
    transformed = (_transform(tile, 0, padded) @ tiles).view(side * side, batch * rows * cols, channels)
    products = torch.bmm(transformed, filters.transpose(1, 2))  # (side^2, tiles, out)
    out = _transform(tile, 2, padded) @ products.view(side * side, -1)  # (tile^2, tiles * out)
    out = out.view(tile, tile, batch, rows, cols, out_channels)
    return out.permute(2, 5, 3, 0, 4, 1).reshape(batch, out_channels, rows * tile, cols * tile)


@functools.cache
def _native_transforms() -> native.NativeLibrary | None:
    library = native.load("winograd.c")
    if library is not None:
        sizes = [ctypes.c_int64] * 9  # ..., begin, end; shared: ..., jobs (an int64), threads (an int)
        library.cdll.winograd4_input.argtypes = [ctypes.c_void_p] * 2 + sizes
        library.cdll.winograd4_output.argtypes = [ctypes.c_void_p] * 3 + sizes
        if library.shares_pytorch_threads:
            library.cdll.winograd4_input_shared.argtypes = [ctypes.c_void_p] * 2 + sizes[1:] + [ctypes.c_int]
            library.cdll.winograd4_output_shared.argtypes = [ctypes.c_void_p] * 3 + sizes[1:] + [ctypes.c_int]
    return library


def _native_min_tiles(library: native.NativeLibrary) -> int:
    return NATIVE_MIN_TILES_SHARED if library.shares_pytorch_threads else NATIVE_MIN_TILES


def _native_conv3x3(
    library: native.NativeLibrary,
    x: torch.Tensor,
    filters: torch.Tensor,
    bias: torch.Tensor | None,
    band: int,
) -> torch.Tensor:
    """F(4x4) with the tiles taken in and out by ``library``'s one-pass transforms: (36, C, tiles)."""
    batch, channels, height, width = x.shape
    out_channels = filters.shape[1]
    rows, cols = -(-height // 4), -(-width // 4)
    bias = None if bias is None else bias.contiguous()  # kept alive while its pointer is used
    bias_pointer = None if bias is None else bias.data_ptr()
    y = x.new_empty(batch, out_channels, height, width)
    for first in range(0, rows, band):
        count = min(rows, first + band) - first
        span = (first, count, cols)
        tiles = x.new_empty(36, channels, batch * count * cols)
        jobs = batch * channels * count
        native.run_jobs(library, "winograd4_input", jobs, x.data_ptr(), tiles.data_ptr(), *x.shape, *span)
        products = torch.bmm(filters, tiles)  # (36, out, tiles)
        del tiles
        jobs = batch * out_channels * count
        pointers = (products.data_ptr(), bias_pointer, y.data_ptr())
        native.run_jobs(library, "winograd4_output", jobs, *pointers, *y.shape, *span)
    return y


class WinogradBudget:
    """Bytes the transformed filters of a model's layers may take, spent as layers make them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes


class _WinogradConv2d(nn.Conv2d):
    """Mixed in before a layer's own class (a plain or an upcasting Conv2d) by :func:`use_winograd`."""

    winograd_budget: WinogradBudget
    # (weight storage, weight version, tile), the filters made from that weight and what gives their
    # bytes back to the budget (called when they are remade, or when the layer is collected: a
    # swapped VAE or an unloaded ControlNet leaves the budget to the others), or None
    _winograd_kept: tuple[tuple[int, int, int], torch.Tensor, weakref.finalize] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self, "compute_dtype", None) or self.weight.dtype
        if not self._winograd_applies(x, dtype):
            return super().forward(x)
        tile: TileSize = 2 if min(x.shape[-2:]) < SMALL_MAP else 4
        filters = self._winograd_filters(tile, dtype)
        if filters is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return winograd_conv3x3(x.to(dtype), filters, bias, tile)

    def _winograd_applies(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (
            x.device.type == "cpu"
            and dtype == torch.float32
            and x.dim() == 4
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
            and not torch.is_inference(self.weight)  # its in-place changes could not be seen
        )

    def _winograd_filters(self, tile: TileSize, dtype: torch.dtype) -> torch.Tensor | None:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, tile)
        kept = self._winograd_kept
        if kept is not None and kept[0] == key:
            return kept[1]
        if kept is not None:
            kept[2]()  # gives the stale filters' bytes back
            self._winograd_kept = None
        nbytes = filter_bytes(weight, tile, dtype)
        if not self.winograd_budget.take(nbytes):
            return None
        with torch.no_grad():
            filters = transform_filters(weight.to(dtype), tile)
        self._winograd_kept = (key, filters, weakref.finalize(self, self.winograd_budget.give_back, nbytes))
        return filters


@functools.cache
def _winograd_class(base: type[nn.Conv2d]) -> type[nn.Conv2d]:
    return type(f"Winograd{base.__name__.lstrip('_')}", (_WinogradConv2d, base), {})


def _eligible(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and not isinstance(module, _WinogradConv2d)
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding in ((1, 1), "same")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and min(module.in_channels, module.out_channels) >= MIN_CHANNELS
    )


def use_winograd(network: nn.Module, budget: WinogradBudget) -> nn.Module:
    """Let ``network``'s 3x3 convolutions of at least :data:`MIN_CHANNELS` channels run by Winograd's
    algorithm (see the module docstring), their transformed filters kept within ``budget``. Call it
    after :func:`openldm.nn.upcast.upcast_layers`, whose layers it extends."""
    for module in network.modules():
        if _eligible(module):
            module.__class__ = _winograd_class(type(module))
            module.winograd_budget = budget
            module._winograd_kept = None
    network.winograd_budget = budget
    return network


def default_winograd_memory(network: nn.Module, device: torch.device) -> int:
    """The budget a loaded network gets unless told: half the memory free now when it computes on a
    CPU in its stored fp32 weights; 0 when its weights are kept in half precision to save memory, or
    on another device."""
    stored = next(network.parameters()).dtype
    if device.type != "cpu" or stored != torch.float32 or compute_dtype(network) != stored:
        return 0
    return (available_memory(device) or 0) // 2


def winograd_for(
    network: nn.Module,
    device: torch.device,
    memory: int | None = None,
    shared_with: tuple[nn.Module, ...] = (),
) -> nn.Module:
    """:func:`use_winograd` with ``memory`` bytes (None: :func:`default_winograd_memory`), when any,
    for ``network`` and the networks ``shared_with`` it (a UNet's VAE), one budget for all."""
    memory = default_winograd_memory(network, device) if memory is None else memory
    if memory <= 0:
        return network
    budget = WinogradBudget(memory)
    for other in shared_with:
        use_winograd(other, budget)
    return use_winograd(network, budget)


def winograd_reserve(*networks: nn.Module) -> int:
    """Bytes the Winograd layers of ``networks`` (sharing one budget) may still take for filters
    (F(4x4) sizes, within the budget): memory a generation must leave free."""
    budget = winograd_budget_of(networks[0])
    if budget is None:
        return 0
    unmade = sum(
        filter_bytes(module.weight, 4)
        for network in networks
        for module in network.modules()
        if isinstance(module, _WinogradConv2d) and module._winograd_kept is None
    )
    return max(0, min(unmade, budget.max_bytes - budget.used))


def winograd_budget_of(network: nn.Module) -> WinogradBudget | None:
    """The budget :func:`use_winograd` gave ``network``, for networks that should share it."""
    return getattr(network, "winograd_budget", None)
