"""3x3 convolutions by Winograd's algorithm (``openldm.nn.winograd``): close to a fp64 convolution
(relative to the output's largest value, F(2x2): 3e-7 found, 2e-6 allowed, closer than the direct fp32
convolution's 9e-7; F(4x4), whose interpolation points +-2 cost a few bits: 5e-6 found, 2e-5
allowed), for odd and non-square maps, with bias, a band at a time (equal within the BLAS's summation
order); layers keep transformed filters within their budget (a generation's memory check leaves room
for those not yet made), remake them when the weights change in place (a LoRA) and run directly when
the budget is spent or a gradient is wanted; a UNet of SD widths equals diffusers' within the UNet
tests' tolerance; loading gives a fp32 model a budget and a fp16-kept one none, and a ControlNet
shares its model's."""

from __future__ import annotations

import argparse
import dataclasses
import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import openldm
from openldm.checkpoints.formats.unet import unet_from_diffusers
from openldm.commands.common import UsageError, check_model_flags
from openldm.config import UNetConfig
from openldm.nn import native, winograd
from openldm.nn.unet import UNetModel
from openldm.nn.upcast import upcast_layers
from openldm.nn.winograd import (
    WinogradBudget,
    transform_filters,
    use_winograd,
    winograd_budget_of,
    winograd_conv3x3,
    winograd_reserve,
)
from tests.helpers import assert_close_rel

pytestmark = pytest.mark.usefixtures("single_thread")


def _error_to_fp64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return ((y.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(("size", "bias"), [((8, 8), True), ((13, 7), False), ((5, 16), True)])
def test_convolution_matches_fp64(tile: int, size: tuple[int, int], bias: bool) -> None:
    g = torch.Generator().manual_seed(tile)
    x = torch.randn(2, 48, *size, generator=g)
    w = torch.randn(40, 48, 3, 3, generator=g) / 20
    b = torch.randn(40, generator=g) if bias else None
    y = winograd_conv3x3(x, transform_filters(w, tile), b, tile)
    assert y.shape == (2, 40, *size) and y.is_contiguous()
    assert _error_to_fp64(y, x, w, b) <= (2e-6 if tile == 2 else 2e-5)


def test_bands_give_the_whole_result(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(1, 16, 22, 9, generator=g), torch.randn(24, 16, 3, 3, generator=g), torch.randn(24)
    filters = transform_filters(w, 4)
    whole = winograd_conv3x3(x, filters, b, 4)
    monkeypatch.setattr(winograd, "BAND_BYTES", 1)  # one row of tiles at a time: 6 bands
    # the same sums, ordered by the BLAS for other matrix sizes: 4e-7 found
    assert_close_rel(winograd_conv3x3(x, filters, b, 4), whole, tol=1e-5)


def _through_native(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every F(4x4) call through the native transforms from here on; the names of the native calls."""
    calls: list[str] = []
    run_jobs = native.run_jobs

    def counted(library: native.NativeLibrary, name: str, jobs: int, *args: int | None) -> None:
        calls.append(name)
        run_jobs(library, name, jobs, *args)

    monkeypatch.setattr(native, "run_jobs", counted)
    monkeypatch.setattr(winograd, "NATIVE_MIN_TILES", 0)
    monkeypatch.setattr(winograd, "NATIVE_MIN_TILES_SHARED", 0)
    return calls


def test_native_transforms_are_built_on_this_machine() -> None:
    assert native.compiler() is not None, "no C compiler: install gcc (.ci/run does) or set CC"
    assert winograd._native_transforms() is not None, "winograd.c did not build: see the logged reason"


@pytest.mark.parametrize(
    ("shape", "bias", "layout"),
    [
        ((2, 48, 8, 8), True, torch.contiguous_format),
        ((3, 48, 13, 7), False, torch.contiguous_format),
        ((1, 48, 5, 16), True, torch.channels_last),
        ((2, 48, 17, 23), True, torch.channels_last),
    ],
)
def test_native_transforms_match_fp64_and_pytorchs(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], bias: bool, layout: torch.memory_format
) -> None:
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(memory_format=layout)
    w = torch.randn(40, 48, 3, 3, generator=g) / 20
    b = torch.randn(40, generator=g) if bias else None
    filters = transform_filters(w, 4)
    monkeypatch.setattr(winograd, "NATIVE_MIN_TILES", 2**62)
    by_pytorch = winograd_conv3x3(x, filters, b, 4)
    calls = _through_native(monkeypatch)
    y = winograd_conv3x3(x, filters, b, 4)
    assert calls == ["winograd4_input", "winograd4_output"]
    assert y.shape == (shape[0], 40, *shape[2:]) and y.is_contiguous()
    assert _error_to_fp64(y, x, w, b) <= 2e-5  # 5e-6 found, as PyTorch's operators
    assert_close_rel(y, by_pytorch, tol=1e-5)  # the same sums in another order: 1e-6 found


def test_native_bands_and_threads_give_the_whole_result(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 16, 22, 9, generator=g), torch.randn(24, 16, 3, 3, generator=g), torch.randn(24)
    filters = transform_filters(w, 4)
    calls = _through_native(monkeypatch)
    whole = winograd_conv3x3(x, filters, b, 4)
    monkeypatch.setattr(winograd, "NATIVE_BAND_BYTES", 1)  # one row of tiles at a time: 6 bands
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # each transform's jobs shared by two threads
    try:
        banded = winograd_conv3x3(x, filters, b, 4)
    finally:
        torch.set_num_threads(threads)
    assert calls == ["winograd4_input", "winograd4_output"] * 7
    assert_close_rel(banded, whole, tol=1e-5)


def test_native_jobs_on_pytorchs_threads_and_on_a_pool_compute_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    library = winograd._native_transforms()
    assert library is not None and library.shares_pytorch_threads  # Linux, gcc, PyTorch's libgomp
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(2, 16, 21, 19, generator=g), torch.randn(24, 16, 3, 3, generator=g), torch.randn(24)
    filters = transform_filters(w, 4)
    calls = _through_native(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    pooled = dataclasses.replace(library, shares_pytorch_threads=False)
    rows, cols = 6, 5  # 4x4 tiles over 21 x 19
    tiles = {}
    try:
        for path in (library, pooled):  # the input transform alone: per-element C code, no sums to reorder
            tiles[path] = torch.full((36, 16, 2 * rows * cols), float("nan"))
            span = (0, rows, cols)
            native.run_jobs(
                path, "winograd4_input", 2 * 16 * rows, x.data_ptr(), tiles[path].data_ptr(), *x.shape, *span
            )
        calls.clear()
        shared = winograd_conv3x3(x, filters, b, 4)
        monkeypatch.setattr(winograd, "_native_transforms", lambda: pooled)
        on_a_pool = winograd_conv3x3(x, filters, b, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(tiles[library], tiles[pooled])  # every job written, by the same code whoever runs it
    assert calls == ["winograd4_input", "winograd4_output"] * 2
    assert_close_rel(shared, on_a_pool, tol=1e-6)  # the products by the BLAS: no bit-equality asked
    assert _error_to_fp64(shared, x, w, b) <= 2e-5


def test_without_the_native_library_pytorchs_operators_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(1, 16, 12, 12, generator=g), torch.randn(8, 16, 3, 3, generator=g)
    calls = _through_native(monkeypatch)
    monkeypatch.setattr(winograd, "_native_transforms", lambda: None)
    y = winograd_conv3x3(x, transform_filters(w, 4), None, 4)
    assert calls == [] and _error_to_fp64(y, x, w, None) <= 2e-5


def _layer(
    channels: int = 320, budget: int = 2**30
) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d, WinogradBudget]:
    torch.manual_seed(5)
    plain = torch.nn.Conv2d(channels, channels, 3, padding=1)
    fast = torch.nn.Conv2d(channels, channels, 3, padding=1)
    fast.load_state_dict(plain.state_dict())
    kept = WinogradBudget(budget)
    use_winograd(fast, kept)
    return plain, fast, kept


def test_layer_keeps_its_filters_and_follows_weight_changes() -> None:
    plain, fast, budget = _layer()
    x = torch.randn(2, 320, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close_rel(fast(x), plain(x), tol=2e-5)
        assert budget.used == 36 * 320 * 320 * 4  # F(4x4) on a 16x16 map: 6x6 transformed filters
        first = fast._winograd_kept
        fast(x)
        assert fast._winograd_kept is first  # made once
        for layer in (plain, fast):  # a LoRA applied in place
            layer.weight.add_(0.01)
        assert_close_rel(fast(x), plain(x), tol=2e-5)
        assert budget.used == 36 * 320 * 320 * 4  # the stale filters were given back
        fast.weight.data = plain.weight.data.clone() * 2  # a LoRA removed by swapping the tensor
        assert_close_rel(fast(x), F.conv2d(x, plain.weight * 2, plain.bias, padding=1), tol=2e-5)
        small = torch.randn(1, 320, 6, 10)  # under 16 on a side: F(2x2), 4x4 filters
        fast(small)
        assert budget.used == 16 * 320 * 320 * 4


def test_reserve_is_what_unmade_filters_may_still_take() -> None:
    network = torch.nn.Sequential(
        torch.nn.Conv2d(320, 320, 3, padding=1), torch.nn.Conv2d(320, 320, 3, padding=1)
    )
    use_winograd(network, WinogradBudget(2**30))
    assert winograd_reserve(network) == 2 * 36 * 320 * 320 * 4
    with torch.no_grad():
        network(torch.randn(1, 320, 16, 16))
    assert winograd_reserve(network) == 0
    tight = torch.nn.Sequential(torch.nn.Conv2d(320, 320, 3, padding=1))
    use_winograd(tight, WinogradBudget(1000))
    assert winograd_reserve(tight) == 1000  # no more than the budget
    assert winograd_reserve(torch.nn.Sequential(torch.nn.Conv2d(320, 320, 3, padding=1))) == 0


def test_layer_runs_directly_without_budget_or_when_training() -> None:
    plain, fast, budget = _layer(budget=1000)
    x = torch.randn(1, 320, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close_rel(fast(x), plain(x), tol=1e-6)  # the same direct convolution
        assert budget.used == 0
    plain, fast, budget = _layer()
    y = fast(x)  # gradients wanted: the direct convolution, which backpropagates as usual
    assert_close_rel(y, plain(x), tol=1e-6)
    assert budget.used == 0
    y.sum().backward()
    assert fast.weight.grad is not None


def test_narrow_layers_and_strided_ones_are_left_direct() -> None:
    network = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.Conv2d(320, 320, 3, stride=2, padding=1),
        torch.nn.Conv2d(320, 320, 1),
    )
    use_winograd(network, WinogradBudget(2**30))
    assert all(type(layer) is torch.nn.Conv2d for layer in network)


def test_upcast_layer_computes_in_fp32_from_fp16_weights() -> None:
    plain, _, _ = _layer()
    half = torch.nn.Sequential(torch.nn.Conv2d(320, 320, 3, padding=1)).half()
    half[0].load_state_dict(plain.state_dict())
    upcast_layers(half, torch.float32)
    budget = WinogradBudget(2**30)
    use_winograd(half, budget)
    x = torch.randn(2, 320, 12, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = F.conv2d(x, plain.weight.half().float(), plain.bias.half().float(), padding=1)
        y = half(x)
    assert y.dtype == torch.float32 and budget.used == 16 * 320 * 320 * 4
    assert_close_rel(y, reference, tol=2e-5)


def _with_winograd(cls: Any, config: Any, state_dict: dict[str, torch.Tensor]) -> tuple[Any, WinogradBudget]:
    """``cls(config)`` holding ``state_dict``, its convolutions by Winograd within a large budget."""
    with torch.device("meta"):
        network = cls(config)
    network.load_state_dict(state_dict, assign=True, strict=True)
    budget = WinogradBudget(2**31)
    return use_winograd(network.eval(), budget), budget


def test_unet_of_sd_widths_matches_diffusers() -> None:
    from tests.oracles import unet_oracle

    config = UNetConfig(
        model_channels=320, channel_mult=(1, 2), attention_resolutions=(), num_res_blocks=1, context_dim=64
    )
    reference = unet_oracle(config)
    ours, budget = _with_winograd(UNetModel, config, unet_from_diffusers(reference.state_dict(), config))
    g = torch.Generator().manual_seed(9)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context=context)
    assert budget.used > 0  # 16x16 and 8x8 maps: both tile sizes ran
    assert expected.abs().max() > 1e-2
    assert_close_rel(got, expected, tol=1e-4)


def test_vae_of_sd_widths_matches_diffusers() -> None:
    from openldm.checkpoints.formats.vae import vae_from_diffusers
    from openldm.config import VAEConfig
    from openldm.nn.vae import AutoencoderKL
    from tests.oracles import vae_oracle

    config = VAEConfig(ch=128, ch_mult=(1, 2), num_res_blocks=1)  # 256-channel layers run by Winograd
    reference = vae_oracle(config).eval()
    ours, budget = _with_winograd(AutoencoderKL, config, vae_from_diffusers(reference.state_dict(), config))
    g = torch.Generator().manual_seed(10)
    z, image = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        expected = (reference.decode(z).sample, reference.encode(image).latent_dist.mean)
        got = (ours.decode(z), ours.encode(image).mode())
    assert budget.used > 0
    for ours_out, theirs in zip(got, expected, strict=True):
        assert theirs.abs().max() > 1e-2
        assert_close_rel(ours_out, theirs, tol=1e-4)


def test_loading_gives_fp32_weights_a_budget_and_kept_fp16_none(tiny_checkpoint, tmp_path) -> None:
    import safetensors.torch

    model = openldm.load(tiny_checkpoint)
    budget = winograd_budget_of(model.unet)
    assert budget is not None and budget.max_bytes > 0
    assert openldm.load(tiny_checkpoint, winograd_memory=12345).unet.winograd_budget.max_bytes == 12345
    assert winograd_budget_of(openldm.load(tiny_checkpoint, winograd_memory=0).unet) is None
    half = {k: v.half() for k, v in safetensors.torch.load_file(str(tiny_checkpoint)).items()}
    safetensors.torch.save_file(half, str(tmp_path / "half.safetensors"))
    assert winograd_budget_of(openldm.load(tmp_path / "half.safetensors").unet) is None

    from openldm.checkpoints.build import computed_like
    from openldm.nn.controlnet import ControlNetModel

    control = computed_like(ControlNetModel(model.unet.config), model.unet)
    assert winograd_budget_of(control) is budget
    assert winograd_budget_of(model.vae) is budget  # the VAE's wide layers share the UNet's budget


def test_a_collected_layer_gives_its_filters_bytes_back() -> None:
    budget = WinogradBudget(2**30)
    layers = [use_winograd(torch.nn.Conv2d(256, 256, 3, padding=1), budget) for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer(torch.randn(1, 256, 16, 16))
    del layer
    assert budget.used == 2 * 36 * 256 * 256 * 4
    assert winograd_reserve(*layers) == 0
    del layers[1]  # a swapped-out VAE, an unloaded ControlNet
    gc.collect()
    assert budget.used == 36 * 256 * 256 * 4
    fresh = use_winograd(torch.nn.Conv2d(256, 256, 3, padding=1), budget)
    assert winograd_reserve(layers[0], fresh) == 36 * 256 * 256 * 4  # the unmade filters of either


def test_negative_memory_flag_is_refused_before_loading() -> None:
    args = argparse.Namespace(
        command="txt2img", ckpt=None, base=None, config=None, device="cpu", winograd_memory=-1.0
    )
    with pytest.raises(UsageError, match="--winograd-memory -1 is not a size"):
        check_model_flags(args)


def test_server_flag_gives_the_budget(tiny_checkpoint) -> None:
    from openldm.cli import build_parser
    from openldm.server.command import make_loader

    parser = build_parser()
    args = parser.parse_args(["serve", "--winograd-memory", "0.5"])
    model = make_loader(args)(str(tiny_checkpoint))
    assert model.unet.winograd_budget.max_bytes == 2**29
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--redis", "redis://x", "--winograd-memory", "-1"])
