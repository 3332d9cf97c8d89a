"""``openldm depth2img``: redraw an image after a prompt, keeping its depth (the depth model).

The flags are ``openldm img2img``'s plus ``--depth-map``; without it the depth is estimated by the
MiDaS estimator that the original depth checkpoint carries. Output files as the other commands.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openldm.pipelines.common import Generation

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
    from openldm.cli import _add_generation_flags

    parser = subparsers.add_parser(
        NAME,
        help="redraw an image after a prompt, keeping its depth",
        description="Redraw an image after a text prompt, keeping its depth (the depth model; "
        "the reference's img2img flags plus --depth-map).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_generation_flags(
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
    from openldm.cli import (
        UsageError,
        _check_input,
        _check_model,
        _generate_batches,
        _generation_options,
        _load_model,
        _prompt_batches,
        _sampler_name,
        _save_outputs,
    )
    from openldm.images import load_image
    from openldm.pipelines.depth2img import depth2img, read_depth_map

    sampler = _sampler_name(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {args.strength}")
    _check_input(args)
    batches = _prompt_batches(args)
    init_image = load_image(args.init_img, "--init-img")
    depth_map = read_depth_map(args.depth_map) if args.depth_map is not None else None
    model, precision = _load_model(args)
    _check_model(args, model)
    if model.spec.variant != "depth":
        raise UsageError(
            f"--ckpt {args.ckpt!r} is a {model.spec.variant} model; depth2img needs a depth model "
            "(such as 512-depth-ema)"
        )
    options: dict[str, Any] = {
        **_generation_options(args, sampler, precision),
        "depth_map": depth_map,
        "strength": args.strength,
        "guidance_scale": args.scale if args.scale is not None else DEFAULT_SCALE,
    }

    def generate(prompts: list[str], n_samples: int) -> Generation:
        return depth2img(model, prompts, init_image, args.negative_prompt, n_samples=n_samples, **options)

    _save_outputs(args, _generate_batches(args, batches, generate))
    return 0
