"""``openldm inpaint``: repaint the white part of a mask after a prompt (img2img's flags plus ``--mask``).

Works with inpainting checkpoints (9-channel UNet) and, by latent blending, with plain text-to-image
ones; see :mod:`openldm.pipelines.inpaint`. Files are written as txt2img/img2img write them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from openldm.cli import (
    UsageError,
    _add_generation_flags,
    _check_input,
    _check_model,
    _generate_batches,
    _generation_options,
    _load_model,
    _prompt_batches,
    _sampler_name,
    _save_outputs,
)

if TYPE_CHECKING:
    from openldm.pipelines.common import Generation

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
    _add_generation_flags(
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
    from openldm.pipelines.inpaint import INPAINT_VARIANTS, inpaint, load_mask

    sampler = _sampler_name(args)
    _check_input(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {args.strength}")
    batches = _prompt_batches(args)
    init_image = load_image(args.init_img, "--init-img")
    mask = load_mask(args.mask, "--mask")
    model, precision = _load_model(args)
    _check_model(args, model)
    if model.spec.variant not in INPAINT_VARIANTS:
        raise UsageError(
            f"{args.ckpt} is a {model.spec.variant} model; inpaint needs an inpainting or text-to-image model"
        )
    options: dict[str, Any] = {
        **_generation_options(args, sampler, precision),
        "strength": args.strength,
        "guidance_scale": args.scale if args.scale is not None else DEFAULT_SCALE,
        "paste_back": args.paste_back,
    }

    def generate(prompts: list[str], n_samples: int) -> Generation:
        return inpaint(model, prompts, init_image, mask, args.negative_prompt, n_samples=n_samples, **options)

    _save_outputs(args, _generate_batches(args, batches, generate))
    return 0
