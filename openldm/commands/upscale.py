"""``openldm upscale``: the x4 upscaler from the command line, in the style of txt2img/img2img.

Writes ``OUTDIR/samples/00000.png``, ... (numbered on) and a grid ``OUTDIR/grid-0000.png``, each PNG
with its generation parameters (the web UI's format, plus ``Noise level`` and the tiling).
"""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import (
    UsageError,
    check_model_flags,
    check_outputs,
    generation_options,
    load_model,
    save_outputs,
)
from openldm.commands.flags import Flags, model_flags, output_flags, prompt_flags, sampling_flags

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
    parser = subparsers.add_parser(
        "upscale",
        help="upscale an image 4x with the x4 upscaler",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flags = Flags(parser, {"prompt": ""}, {"prompt": "what the image shows (default: none)"})
    flags.add("--init-img", required=True, help="path to the low-resolution image")
    prompt_flags(flags, embedded=False)
    flags.add(
        "--noise-level", type=int, default=20, help="noise added to the low-res image, 0..350 (default: 20)"
    )
    flags.add(
        "--tile",
        type=int,
        default=None,
        help="process in tiles of this many input pixels, >= 16 (default: off)",
    )
    overlap = "input pixels neighbouring tiles share, 0..tile/2 (default: min(32, tile/4))"
    flags.add("--tile-overlap", type=int, default=None, help=overlap)
    output_flags(flags, "upscale")
    sampling_flags(flags, steps=DEFAULT_STEPS, n_iter=1, n_samples=1, scale=f"{DEFAULT_SCALE}, as diffusers")
    model_flags(
        flags, embedded=False, ckpt="the x4 upscaler: a .safetensors/.ckpt file or a diffusers folder"
    )
    flags.done()
    parser.set_defaults(run=run)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """What the upscaler's own flags say, before the checkpoint is read; raises ``UsageError``."""
    if args.noise_level < 0:
        raise UsageError(f"--noise-level must be >= 0, got {args.noise_level}")
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
    check_model_flags(args)
    check_outputs(args)


def run(args: argparse.Namespace) -> int:
    from openldm.images import load_image
    from openldm.pipelines.upscale import Upscale

    check_args(args)
    scale = args.scale if args.scale is not None else DEFAULT_SCALE
    options = generation_options(args, [args.prompt], scale)
    image = load_image(args.init_img, "--init-img")
    model = load_model(args)
    task = Upscale(image, args.noise_level, args.tile, args.tile_overlap)
    save_outputs(args, [*model.generate(task, options).images])
    return 0
