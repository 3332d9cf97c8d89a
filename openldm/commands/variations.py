"""``openldm variations``: variations of an image with an unCLIP model (Stable unCLIP 2.1, -h or -l).

The flags are ``openldm txt2img``'s plus ``--init-img`` and ``--noise-level``; the prompt is optional
(empty by default) and steers the variations. Defaults follow diffusers' ``StableUnCLIPImg2ImgPipeline``
(20 steps, guidance 10, noise level 0). Output files as the other commands.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

NAME = "variations"
DEFAULT_SCALE = 10.0
DEFAULT_STEPS = 20
EXAMPLES = """examples:
  openldm variations --ckpt sd21-unclip-h.ckpt --config v2-1-stable-unclip-h-inference.yaml \\
      --init-img photo.jpg --n_samples 2
  openldm variations --ckpt stable-diffusion-2-1-unclip/ --init-img photo.jpg \\
      --prompt "as a watercolor" --noise-level 200 --seed 7

--noise-level (0 to 999) noises the CLIP image embedding: higher gives freer variations. The image is
seen only through its CLIP embedding (resized to 224 on its shortest side and centre-cropped), not
through the VAE; --H/--W choose the output size (default: the model's, 768)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``variations`` to the ``openldm`` subcommands."""
    from openldm.cli import _add_generation_flags

    parser = subparsers.add_parser(
        NAME,
        help="variations of an image (unCLIP models)",
        description="Draw variations of an image with an unCLIP model, optionally steered by a prompt "
        "(the reference's txt2img flags plus --init-img and --noise-level).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_generation_flags(parser, "txt2img")
    parser.add_argument("--init-img", required=True, help="path to the image to vary")
    parser.add_argument(
        "--noise-level",
        type=int,
        default=0,
        help="noise added to the image's CLIP embedding, 0..999 (default: %(default)s)",
    )
    parser.set_defaults(
        run=run,
        prompt="",
        outdir=f"outputs/{NAME}-samples",
        ddim_steps=DEFAULT_STEPS,
        n_samples=1,
        n_iter=1,
        scale=None,
    )
    helps = {
        "prompt": "a prompt to steer the variations (default: none)",
        "ddim_steps": "number of sampling steps (default: %(default)s)",
        "n_samples": "images per prompt, a.k.a. batch size (default: %(default)s)",
        "n_iter": "sample this often (default: %(default)s)",
        "scale": f"classifier-free guidance scale (default: {DEFAULT_SCALE}, as diffusers)",
        "W": "image width in pixels, a multiple of 8 (default: the model's image size)",
    }
    for action in parser._actions:  # the help text of the shared flags, with this command's defaults
        if action.dest in helps:
            action.help = helps[action.dest]
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from openldm.checkpoints.load import load
    from openldm.cli import (
        UsageError,
        _check_input,
        _check_model,
        _device,
        _precision,
        _prompt_batches,
        _sampler_name,
        _save_outputs,
    )
    from openldm.images import load_image
    from openldm.pipelines.image_embedding import image_embedder
    from openldm.pipelines.variations import variations

    sampler = _sampler_name(args)
    if not 0 <= args.noise_level <= 999:
        raise UsageError(f"--noise-level must be between 0 and 999, got {args.noise_level}")
    _check_input(args)
    batches = _prompt_batches(args)
    init_image = load_image(args.init_img)
    device = _device(args.device)
    precision = _precision(args.precision, device)
    model = load(
        args.ckpt, config=args.config, device=device, dtype=torch.float32 if precision == "fp32" else None
    )
    _check_model(args, model)
    if model.spec.variant != "unclip":
        raise UsageError(
            f"--ckpt {args.ckpt!r} is a {model.spec.variant} model; variations need an unCLIP model "
            "(such as sd21-unclip-h)"
        )
    options: dict[str, Any] = {
        "noise_level": args.noise_level,
        "steps": args.ddim_steps,
        "guidance_scale": args.scale if args.scale is not None else DEFAULT_SCALE,
        "width": args.W,
        "height": args.H,
        "sampler": sampler,
        "seed": args.seed,
        "n_iter": args.n_iter,
        "eta": args.ddim_eta,
        "karras": args.karras,
        "weighting": not args.no_weighting,
        "precision": precision,
        "fixed_code": args.fixed_code,
        "embedder": image_embedder(model),  # built once for every batch
    }
    images: list[Image.Image] = []
    for prompts in batches:
        n_samples = args.n_samples if args.from_file is None else 1
        result = variations(model, init_image, prompts, args.negative_prompt, n_samples=n_samples, **options)
        images += result.images
    _save_outputs(args, images)
    return 0
