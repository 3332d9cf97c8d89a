"""``openldm variations``: variations of an image with an unCLIP model (Stable unCLIP 2.1, -h or -l).

The flags are ``openldm txt2img``'s plus ``--init-img`` and ``--noise-level``; the prompt is optional
(empty by default) and steers the variations. Defaults follow diffusers' ``StableUnCLIPImg2ImgPipeline``
(20 steps, guidance 10, noise level 0). Output files as the other commands.
"""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import UsageError, run_generation
from openldm.commands.flags import add_generation_flags

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
    parser = subparsers.add_parser(
        NAME,
        help="variations of an image (unCLIP models)",
        description="Draw variations of an image with an unCLIP model, optionally steered by a prompt "
        "(the reference's txt2img flags plus --init-img and --noise-level).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_flags(
        parser,
        "txt2img",
        defaults={
            "prompt": "",
            "outdir": f"outputs/{NAME}-samples",
            "ddim_steps": DEFAULT_STEPS,
            "n_samples": 1,
            "n_iter": 1,
        },
        helps={
            "prompt": "a prompt to steer the variations (default: none)",
            "scale": f"classifier-free guidance scale (default: {DEFAULT_SCALE}, as diffusers)",
        },
    )
    parser.add_argument("--init-img", required=True, help="path to the image to vary")
    parser.add_argument(
        "--noise-level",
        type=int,
        default=0,
        help="noise added to the image's CLIP embedding, 0..999 (default: %(default)s)",
    )
    parser.add_argument(
        "--embedding-stats",
        metavar="PATH",
        help="for a CLIP-L unCLIP single file without them: the image embeddings' mean and std, as the "
        "reference's ViT-L-14_stats.th (or a safetensors file with 'mean' and 'std')",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from openldm.images import load_image
    from openldm.pipelines.image_embedding import read_embedding_stats
    from openldm.pipelines.variations import Variations

    if not 0 <= args.noise_level <= 999:
        raise UsageError(f"--noise-level must be between 0 and 999, got {args.noise_level}")

    def task() -> Variations:  # its embedder, built at the first batch, serves every batch
        image = load_image(args.init_img, "--init-img")
        stats = read_embedding_stats(args.embedding_stats) if args.embedding_stats else None
        return Variations(image, args.noise_level, embedding_stats=stats)

    return run_generation(args, task, lambda variant: DEFAULT_SCALE)
