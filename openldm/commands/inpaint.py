"""``openldm inpaint``: repaint the white part of a mask after a prompt (img2img's flags plus ``--mask``).

Works with inpainting checkpoints (9-channel UNet) and, by latent blending, with plain text-to-image
ones; see :mod:`openldm.pipelines.inpaint`. Files are written as txt2img/img2img write them.
"""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import run_generation
from openldm.commands.flags import add_generation_flags

DEFAULT_SCALE = 7.5  # diffusers' StableDiffusionInpaintPipeline default
DEFAULT_STRENGTH = 1.0

EXAMPLES = """examples:
  openldm inpaint --ckpt 512-inpainting-ema.safetensors --init-img photo.png --mask mask.png \\
      --prompt "a vase of sunflowers on the table" --n_samples 1
  openldm inpaint --ckpt v1-5-pruned-emaonly.safetensors --init-img photo.png --mask mask.png \\
      --prompt "a red door" --strength 0.8 --sampler euler_a --paste-back

The mask is white where the image is repainted and black where it is kept; a mask of another size
is resized with the image when it has the image's aspect ratio. Inpainting checkpoints (9 input
channels) see the mask and the masked image; plain text-to-image checkpoints inpaint by latent
blending (the kept region is held to the noised init image at every step). --paste-back copies the
kept pixels of the init image exactly into the outputs."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inpaint`` command to the ``openldm`` subparsers."""
    parser = subparsers.add_parser(
        "inpaint",
        help="repaint the masked part of an image",
        description="Repaint the white part of a mask in an image after a text prompt "
        "(img2img's flags plus --mask).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_flags(
        parser,
        "img2img",
        embedded=True,
        defaults={"strength": DEFAULT_STRENGTH, "outdir": "outputs/inpaint-samples"},
        helps={
            "strength": "how much of the masked region is redrawn, 0..1 "
            "(default: %(default)s: from pure noise)",
            "scale": f"classifier-free guidance scale (default: {DEFAULT_SCALE})",
        },
    )
    parser.add_argument("--mask", required=True, help="the mask image: white = repaint, black = keep")
    parser.add_argument(
        "--paste-back", action="store_true", help="copy the kept pixels of the init image into the outputs"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from openldm.images import load_image
    from openldm.pipelines.inpaint import Inpaint, load_mask

    def task() -> Inpaint:
        image, mask = load_image(args.init_img, "--init-img"), load_mask(args.mask, "--mask")
        return Inpaint(image, mask, args.strength, args.paste_back)

    return run_generation(args, task, lambda variant: DEFAULT_SCALE)
