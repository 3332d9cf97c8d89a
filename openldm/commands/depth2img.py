"""``openldm depth2img``: redraw an image after a prompt, keeping its depth (the depth model).

The flags are ``openldm img2img``'s plus ``--depth-map``; without it the depth is estimated by the
MiDaS estimator that the original depth checkpoint carries. Output files as the other commands.
"""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import run_generation
from openldm.commands.flags import add_generation_flags

NAME = "depth2img"
DEFAULT_STRENGTH = 0.8  # the reference's depth2img scripts and diffusers
DEFAULT_SCALE = 9.0  # the reference's depth2img scripts (an SD 2 model)
EXAMPLES = """examples:
  openldm depth2img --ckpt 512-depth-ema.safetensors --config v2-midas-inference.yaml \\
      --init-img room.jpg --prompt "a cozy cabin interior, warm light" --strength 0.8
  openldm depth2img --ckpt stable-diffusion-2-depth/ --init-img room.jpg --depth-map room-depth.png \\
      --prompt "a spaceship interior" --n_samples 1

--depth-map takes an image (grayscale, 16-bit or float) or a .npy array, any size, larger values nearer
(as MiDaS predicts); it is resized to the latent size and spread over [-1, 1]. Without it the depth is
estimated with the MiDaS DPT-hybrid estimator stored in the original checkpoint (depth_model.*).
--strength 1 redraws everything but the depth."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``depth2img`` to the ``openldm`` subcommands."""
    parser = subparsers.add_parser(
        NAME,
        help="redraw an image after a prompt, keeping its depth",
        description="Redraw an image after a text prompt, keeping its depth (the depth model; "
        "the reference's img2img flags plus --depth-map).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_flags(
        parser,
        "img2img",
        embedded=True,
        defaults={"strength": DEFAULT_STRENGTH, "outdir": f"outputs/{NAME}-samples", "n_samples": 1},
        helps={
            "strength": "how much of the init image is redrawn, 0..1 (default: %(default)s)",
            "scale": f"classifier-free guidance scale (default: {DEFAULT_SCALE}, as the reference)",
        },
    )
    parser.add_argument(
        "--depth-map",
        help="depth of the init image: an image or .npy file, larger is nearer "
        "(default: estimated with the checkpoint's MiDaS estimator)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from openldm.images import load_image
    from openldm.pipelines.depth2img import Depth2Img, read_depth_map

    def task() -> Depth2Img:
        image = load_image(args.init_img, "--init-img")
        depth_map = read_depth_map(args.depth_map) if args.depth_map is not None else None
        return Depth2Img(image, args.strength, depth_map=depth_map)

    return run_generation(args, task, lambda variant: DEFAULT_SCALE)
