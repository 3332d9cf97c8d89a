"""``openldm upscale``: the x4 upscaler from the command line, in the style of txt2img/img2img.

Writes ``OUTDIR/samples/00000.png``, ... (numbered on) and a grid ``OUTDIR/grid-0000.png``, each PNG
with its generation parameters (the web UI's format, plus ``Noise level`` and the tiling).
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = "Upscale an image four times per side with the x4 upscaler, guided by a prompt."
EXAMPLES = """examples:
  openldm upscale --ckpt x4-upscaler-ema.safetensors --config x4-upscaling.yaml \\
      --init-img low-res.png --prompt "a white cat"
  openldm upscale --ckpt stable-diffusion-x4-upscaler/ --init-img photo.png --prompt "a city street" \\
      --noise-level 40 --tile 128 --tile-overlap 32 --steps 50

The output is exactly 4x the input (a 128x128 image gives 512x512). --noise-level (0 to 350, default
20) is how much noise the low-res image gets before it conditions the model: more lets the model
invent more detail and depart further from the input. --tile N processes large images in
overlapping N x N tiles of the input (less memory; the tiles are cross-faded, and the result differs
a little from the untiled one: each tile sees only its own surroundings)."""
DEFAULT_STEPS = 75
DEFAULT_SCALE = 9.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``upscale`` command to ``subparsers`` (of :func:`openldm.cli.build_parser`)."""
    from openldm.sampling.samplers import SAMPLERS

    parser = subparsers.add_parser(
        "upscale",
        help="upscale an image 4x with the x4 upscaler",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--init-img", required=True, help="path to the low-resolution image")
    add("--prompt", default="", help="what the image shows (default: none)")
    add("--negative-prompt", default="", help="what to guide away from (default: none)")
    add("--noise-level", type=int, default=20, help="noise added to the low-res image, 0..350 (default: 20)")
    add(
        "--tile",
        type=int,
        default=None,
        help="process in tiles of this many input pixels, >= 16 (default: off)",
    )
    add(
        "--tile-overlap",
        type=int,
        default=None,
        help="input pixels neighbouring tiles share, 0..tile/2 (default: min(32, tile/4))",
    )
    add("--outdir", default="outputs/upscale-samples", help="dir to write results to (default: %(default)s)")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples")
    add(
        "--ddim_steps",
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="sampling steps (default: %(default)s)",
    )
    add("--sampler", help=f"sampler: {', '.join(SAMPLERS)} (default: ddim)")
    add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    add("--dpm", "--dpm_solver", action="store_true", help="use DPM-Solver++ (same as --sampler dpmpp_2m)")
    add("--karras", action="store_true", help="Karras et al.'s spacing of the noise levels")
    add("--ddim_eta", type=float, default=None, help="DDIM eta, or the ancestral samplers' noise")
    add("--n_iter", type=int, default=1, help="sample this often (default: %(default)s)")
    add("--n_samples", type=int, default=1, help="images per run, a.k.a. batch size (default: %(default)s)")
    add("--n_rows", type=int, default=0, help="images per row of the grid (default: n_samples)")
    add(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    add("--ckpt", help="the x4 upscaler: a .safetensors/.ckpt file or a diffusers folder")
    add("--config", help="the reference's yaml config of the checkpoint (x4-upscaling.yaml)")
    add("--seed", type=int, default=42, help="the seed (default: %(default)s)")
    add(
        "--precision",
        choices=["autocast", "full", "fp32", "fp16", "bf16"],
        default="autocast",
        help="autocast: fp16 on a GPU, fp32 on the CPU; full: fp32 (default: %(default)s)",
    )
    add("--device", help="cpu, cuda, cuda:1, mps... (default: cuda, else mps, else cpu)")
    add("--no-weighting", action="store_true", help="read (word:1.3), (word), [word] as plain text")
    parser.set_defaults(run=run)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the checkpoint is read; raises ``UsageError``."""
    from openldm.cli import UsageError, _check_outputs, _device

    for flag, value, low in (
        ("--ddim_steps", args.ddim_steps, 1),
        ("--n_samples", args.n_samples, 1),
        ("--n_iter", args.n_iter, 1),
        ("--noise-level", args.noise_level, 0),
    ):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.scale < 0:
        raise UsageError(f"--scale must be >= 0, got {args.scale}")
    if args.ddim_eta is not None and args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be >= 0, got {args.ddim_eta}")
    if args.tile is not None and args.tile < 16:
        raise UsageError(f"--tile must be >= 16 (input pixels), got {args.tile}")
    if args.tile_overlap is not None:
        if args.tile is None:
            raise UsageError("--tile-overlap needs --tile")
        if not 0 <= args.tile_overlap <= args.tile // 2:
            raise UsageError(
                f"--tile-overlap must be between 0 and --tile / 2 = {args.tile // 2}, got {args.tile_overlap}"
            )
    if args.ckpt is None:
        raise UsageError(
            "upscale needs the x4 upscaler: pass --ckpt x4-upscaler-ema.safetensors (or a diffusers folder)"
        )
    _check_outputs(args)
    _device(args.device)


def run(args: argparse.Namespace) -> int:
    from openldm.cli import _load_model, _sampler_name, _save_outputs
    from openldm.images import load_image
    from openldm.pipelines.upscale import upscale

    sampler = _sampler_name(args)
    check_args(args)
    image = load_image(args.init_img, "--init-img")
    model, precision = _load_model(args)
    result = upscale(
        model,
        args.prompt,
        image,
        args.negative_prompt,
        noise_level=args.noise_level,
        steps=args.ddim_steps,
        guidance_scale=args.scale,
        sampler=sampler,
        seed=args.seed,
        n_samples=args.n_samples,
        n_iter=args.n_iter,
        eta=args.ddim_eta,
        karras=args.karras,
        weighting=not args.no_weighting,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        precision=precision,
    )
    _save_outputs(args, result.images)
    return 0
