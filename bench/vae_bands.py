"""Large images through the VAE: openldm's banded VAE against the whole-image one and diffusers'.

For each case: seconds, the process's peak RSS (VmHWM, reset before each call) and the memory the call
added, and the largest difference from openldm's whole-image result in 1/255 of the [-1, 1] range
(where the whole-image call fits). diffusers runs on the same weights, whole and with
``enable_tiling()`` (tiles decoded apart and blended, its documented way to bound memory).

Cases (random weights in the SD and x4-upscaler VAE shapes, fixed seed):

* SD VAE decode and encode at ``--size`` (default 1024);
* the x4 upscaler's VAE decoding a 2048x2048 image (a 512x512 latent) within ``--memory`` GiB
  (default 4): its mid-block attention is windowed there (262144 latent pixels);
* the windowed attention's own error, on the embedded model's trained VAE: a mosaic of its images at
  2048 decoded with whole attention (65536 latent pixels) and windowed.

    python bench/vae_bands.py              # about 20 minutes on 2 cores
    python bench/vae_bands.py --quick      # small sizes: checks the script
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peers import diffusers_vae, peak_mb, reset_peak, rss_mb, set_threads

from openldm.config import SD_VAE, X4_VAE, VAEConfig
from openldm.nn import vae_bands
from openldm.nn.vae import AutoencoderKL

GiB = 1024**3


def measure(name: str, call: Callable[[], torch.Tensor], reference: torch.Tensor | None) -> torch.Tensor:
    gc.collect()
    reset_peak()
    before = rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        out = call().float()
    seconds = time.perf_counter() - start
    peak = peak_mb()
    if reference is not None:
        diff = (out.clamp(-1, 1) - reference.clamp(-1, 1)).abs() * 127.5
        error = f"max {diff.max().item():7.3f} mean {diff.mean().item():.4f}"
    else:
        error = "(no whole-image result)"
    memory = f"peak {peak / 1024:6.2f} GB  added {(peak - before) / 1024:6.2f} GB"
    print(f"  {name:38s} {seconds:8.1f} s  {memory}  {error}")
    return out


class _Spec:
    """The two fields of a ModelSpec that ``peers.diffusers_vae`` reads."""

    def __init__(self, vae: VAEConfig) -> None:
        self.vae = vae


def networks(config: VAEConfig) -> tuple[AutoencoderKL, torch.nn.Module]:
    torch.manual_seed(0)
    ours = AutoencoderKL(config).eval().requires_grad_(False)
    theirs = diffusers_vae(_Spec(config), {k: v.clone() for k, v in ours.state_dict().items()})
    return ours, theirs


def tiled(vae: torch.nn.Module, tile: int) -> torch.nn.Module:
    """diffusers' tiling with the tile size of the released VAE's config (its ``sample_size``)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae


def sd_cases(size: int, memory: int) -> None:
    ours, theirs = networks(SD_VAE)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    print(f"SD VAE decode {size}x{size}")
    whole = measure("openldm whole", lambda: ours.decode(latent), None)
    measure("openldm banded", lambda: vae_bands.decode_in_bands(ours, latent, memory), whole)
    measure("diffusers whole", lambda: theirs.decode(latent).sample, whole)
    measure("diffusers enable_tiling", lambda: tiled(theirs, 512).decode(latent).sample, whole)
    theirs.disable_tiling()
    image = whole.clamp(-1, 1)
    print(f"SD VAE encode {size}x{size} (latent means, difference in 1/255 of [-1, 1])")
    mean = measure("openldm whole", lambda: ours.encode(image).mean, None)
    measure("openldm banded", lambda: vae_bands.encode_in_bands(ours, image, memory).mean, mean)
    measure("diffusers whole", lambda: theirs.encode(image).latent_dist.mean, mean)
    measure("diffusers enable_tiling", lambda: tiled(theirs, 512).encode(image).latent_dist.mean, mean)


def x4_case(size: int, memory: int) -> None:
    ours, theirs = networks(X4_VAE)
    latent = torch.randn(1, 4, size // 4, size // 4, generator=torch.Generator().manual_seed(1))
    shape = tuple(latent.shape)
    plan = vae_bands.plan_for(ours, shape, "decode", memory)
    kept = vae_bands.kept_bytes(ours, shape, "decode", plan) / GiB
    whole = vae_bands.attention_is_whole(shape[-1] * shape[-2])
    print(f"x4 upscaler VAE decode {size}x{size} within {memory / GiB:.1f} GiB: {plan},")
    print(f"  maps kept {kept:.2f} GiB, attention {'whole' if whole else 'windowed'}")
    ours_out = measure("openldm banded", lambda: vae_bands.decode_in_bands(ours, latent, memory), None)
    theirs_out = measure("diffusers enable_tiling", lambda: tiled(theirs, 256).decode(latent).sample, None)
    diff = (ours_out.clamp(-1, 1) - theirs_out.clamp(-1, 1)).abs() * 127.5
    print(f"  banded vs diffusers tiled: max {diff.max().item():.3f} mean {diff.mean().item():.4f} (1/255)")


def window_case(size: int) -> None:
    import numpy as np

    import openldm

    model = openldm.load()
    prompts = ["a red circle on a blue background", "a green triangle left of a yellow square"]
    prompts += ["two purple stars", "an orange circle above a white square"]
    images = model.txt2img(prompts * 4, steps=20, seed=1, output_type="np", progress=False).images
    rows = [np.concatenate(list(images[r * 4 : (r + 1) * 4]), axis=1) for r in range(4)]
    mosaic = torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1)[None].float() * 2 - 1
    mosaic = F.interpolate(mosaic, size=(size, size), mode="bilinear")
    vae = model.vae
    with torch.no_grad():
        latent = vae.encode(mosaic).mode()
    tokens = latent.shape[-1] * latent.shape[-2]
    print(f"embedded VAE decode {size}x{size} ({tokens} latent pixels): windowed attention against whole")
    whole = measure(
        "openldm banded, whole attention", lambda: vae_bands.decode_in_bands(vae, latent, 8 * GiB), None
    )
    limit = vae_bands.GLOBAL_ATTENTION_TOKENS
    vae_bands.GLOBAL_ATTENTION_TOKENS = 0
    try:
        measure(
            "openldm banded, windowed attention",
            lambda: vae_bands.decode_in_bands(vae, latent, 8 * GiB),
            whole,
        )
    finally:
        vae_bands.GLOBAL_ATTENTION_TOKENS = limit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="SD VAE image side")
    parser.add_argument("--x4-size", type=int, default=2048, help="x4 upscaler VAE image side")
    parser.add_argument("--memory", type=float, default=4.0, help="GiB the banded calls may keep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    args = parser.parse_args()
    set_threads(args.threads)
    memory = int(args.memory * GiB)
    if args.quick:
        args.size, args.x4_size = 128, 256
    sd_cases(args.size, memory)
    x4_case(args.x4_size, memory)
    window_case(512 if args.quick else 2048)


if __name__ == "__main__":
    main()
