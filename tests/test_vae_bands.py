"""The VAE coded by bands of rows (openldm.nn.vae_bands): the whole-image result in bounded memory."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import openldm
from openldm.config import X4_VAE, VAEConfig
from openldm.nn import vae_bands
from openldm.nn.vae import AutoencoderKL
from openldm.nn.vae_bands import BandMemoryError, Plan, decode_in_bands, encode_in_bands, kept_bytes, plan_for
from openldm.pipelines import memory
from openldm.pipelines.memory import Request, estimate

GiB = 1024**3
# Widths that change between levels (1x1 shortcuts), two upsamplings, two residual blocks per level.
SMALL = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
PLANS = [Plan(torch.float32), Plan(torch.float32, True), Plan(torch.float16), Plan(torch.float16, True)]


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(SMALL).eval().requires_grad_(False)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("band_bytes", [vae_bands.BAND_BYTES, 1], ids=["bands", "one-row-bands"])
def test_decoding_by_bands_is_the_whole_image_decode(vae, plan, band_bytes, monkeypatch) -> None:
    monkeypatch.setattr(vae_bands, "BAND_BYTES", band_bytes)
    z = torch.randn(2, 4, 13, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z)
    banded = decode_in_bands(vae, z, 0, plan)
    # fp32 maps: the same computation in another order; fp16 maps: rounded between layers.
    assert _relative(banded, whole) < (1e-5 if plan.storage == torch.float32 else 5e-3)


@pytest.mark.parametrize("band_bytes", [vae_bands.BAND_BYTES, 1], ids=["bands", "one-row-bands"])
def test_encoding_by_bands_is_the_whole_image_encode(vae, band_bytes, monkeypatch) -> None:
    monkeypatch.setattr(vae_bands, "BAND_BYTES", band_bytes)
    pixels = torch.rand(2, 3, 52, 36, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(pixels)
    banded = encode_in_bands(vae, pixels, 8 * GiB)
    assert _relative(banded.mean, whole.mean) < 1e-5
    assert _relative(banded.logvar, whole.logvar) < 1e-5


def test_the_plan_counts_what_the_call_keeps(vae) -> None:
    z = torch.randn(1, 4, 16, 12)
    for plan in PLANS:
        _, peak = vae_bands._call(vae, z, "decode", plan, z.device)
        assert kept_bytes(vae, tuple(z.shape), "decode", plan) == peak
    # Decoding: [1, 4, 16, 12] latents -> 64x48 pixels; the largest step is the first residual block at
    # full resolution: its input (the upsampled 64 channels), its middle and its output (32 each).
    full = 64 * 48
    assert kept_bytes(vae, (1, 4, 16, 12), "decode", Plan(torch.float32)) >= 4 * (64 + 32 + 32) * full
    lean = kept_bytes(vae, (1, 4, 16, 12), "decode", Plan(torch.float16, True))
    assert lean < kept_bytes(vae, (1, 4, 16, 12), "decode", Plan(torch.float32)) / 2


def test_the_plan_is_the_most_exact_that_fits(vae) -> None:
    shape = (1, 4, 64, 64)
    need = {plan: kept_bytes(vae, shape, "decode", plan) + vae_bands.BAND_BYTES for plan in PLANS}
    for plan in PLANS:
        assert plan_for(vae, shape, "decode", need[plan]) == plan
    with pytest.raises(
        BandMemoryError, match=r"coding a 64x64 latent by bands needs about .* GiB, but .* GiB is available"
    ):
        plan_for(vae, shape, "decode", need[PLANS[-1]] - 1)


def test_a_2048_decode_of_the_x4_upscalers_vae_keeps_under_4_gib() -> None:
    # The whole-image decoder would hold about 22 GB there (pipelines.memory.vae_bytes).
    lean = vae_bands.least_bytes(X4_VAE, (1, 4, 512, 512), "decode")
    assert lean < 3 * GiB, lean / GiB
    assert memory.vae_bytes(X4_VAE, 1, (2048, 2048), False, True) > 20 * GiB


def test_float16_maps_refuse_values_beyond_their_range(vae) -> None:
    z = torch.full((1, 4, 8, 8), 1e6)
    loud = AutoencoderKL(SMALL).eval().requires_grad_(False)
    loud.load_state_dict(vae.state_dict())
    with torch.no_grad():
        loud.decoder.conv_in.weight.mul_(1e4)
    with pytest.raises(BandMemoryError, match="exceeds the float16 range"):
        decode_in_bands(loud, z, 0, Plan(torch.float16))


def test_windowed_attention_is_the_whole_one_when_windows_reach_everywhere(vae, monkeypatch) -> None:
    z = torch.randn(1, 4, 12, 9, generator=torch.Generator().manual_seed(3))
    whole = decode_in_bands(vae, z, 8 * GiB)
    monkeypatch.setattr(vae_bands, "GLOBAL_ATTENTION_TOKENS", 0)
    monkeypatch.setattr(vae_bands, "WINDOW", 4)
    monkeypatch.setattr(vae_bands, "WINDOW_MARGIN", 12)  # every window's neighbourhood is the whole map
    assert _relative(decode_in_bands(vae, z, 8 * GiB), whole) < 1e-5
    monkeypatch.setattr(vae_bands, "WINDOW_MARGIN", 1)  # a real neighbourhood: another result
    near = decode_in_bands(vae, z, 8 * GiB)
    assert torch.isfinite(near).all() and _relative(near, whole) > 1e-3


def test_pipelines_code_by_bands_with_the_same_images(monkeypatch) -> None:
    model = openldm.load()
    init = Image.new("RGB", (128, 96), (200, 40, 40))
    runs = {}
    for tiling in ("off", "on"):
        common = {"steps": 3, "seed": 5, "progress": False, "output_type": "pt", "vae_tiling": tiling}
        text = model.txt2img("a red circle", width=96, height=64, **common).images
        image = model.img2img("a blue square", init, strength=0.6, **common).images
        runs[tiling] = (text, image)
    for off, on in zip(runs["off"], runs["on"], strict=True):
        assert _relative(on, off) < 1e-5


def test_the_memory_check_counts_the_banded_vae(monkeypatch) -> None:
    model = openldm.load()
    request = Request(1, 1, (256, 256), (2048, 2048), guided=False)
    whole = estimate(model.spec, request, torch.device("cpu")).vae
    banded = estimate(model.spec, request, torch.device("cpu"), banded=True).vae
    assert banded < whole / 4, (banded / GiB, whole / GiB)
    # "auto" bands when the whole image would take more than half the free memory; "off" never does.
    monkeypatch.setattr(memory, "available_memory", lambda device: int(1.5 * whole))
    memory.check_memory(
        model.spec,
        Request(1, 1, (256, 256), (2048, 2048), guided=False, vae_tiling="auto"),
        torch.device("cpu"),
    )
    with pytest.raises(memory.InsufficientMemoryError):
        memory.check_memory(
            model.spec,
            Request(1, 1, (256, 256), (2048, 2048), guided=False, vae_tiling="off"),
            torch.device("cpu"),
            reserved=int(0.6 * whole),
        )
