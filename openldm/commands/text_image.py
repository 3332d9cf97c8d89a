"""``openldm txt2img`` and ``openldm img2img``: the reference scripts' flags and files.

They accept the flags of the reference scripts (``scripts/txt2img.py`` and ``scripts/img2img.py`` of the
Stable Diffusion repositories) with their defaults, and write what they write: ``OUTDIR/samples/00000.png``,
... (numbered on from the files already there) and a grid ``OUTDIR/grid-0000.png``; each PNG carries its
generation parameters as the popular web UI writes them. Without ``--ckpt`` they run the embedded
default model (:mod:`openldm.embedded`).
"""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import run_generation
from openldm.commands.flags import DEFAULT_SCALES, add_generation_flags, embedded_size

DESCRIPTIONS = {
    "txt2img": "Generate images from a text prompt (the reference's scripts/txt2img.py flags).",
    "img2img": "Redraw an image after a text prompt (the reference's scripts/img2img.py flags).",
}
EXAMPLES = {
    "txt2img": """examples:
  openldm txt2img --prompt "two green squares and a yellow triangle on a black background"
  openldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --prompt "an astronaut riding a horse"
  openldm txt2img --ckpt v2-1_768-ema-pruned.safetensors --config v2-inference-v.yaml \\
      --prompt "a lighthouse at dawn" --negative-prompt "blurry" --H 768 --W 768 --n_samples 1 --n_iter 1
  openldm txt2img --ckpt model.safetensors --from-file prompts.txt --sampler dpmpp_2m --karras --ddim_steps 25
  openldm txt2img --ckpt model.safetensors --prompt "a (red:1.3) fox in [fog]" --seed 7 --skip_grid

Without --ckpt the embedded default model runs: a small model trained on simple coloured shapes
(circles, squares, triangles, rectangles; red, green, blue, yellow, pink...) that draws {size} images
in seconds on a CPU.

Every PNG carries its parameters (prompt, negative prompt, steps, sampler, CFG scale, seed, size, model)
in a "parameters" text chunk, as the popular web UI writes it. The same seed gives the same image on
every device: the noise is drawn on the CPU.""",
    "img2img": """examples:
  openldm img2img --init-img shapes.png --prompt "a blue square on a white background" --strength 0.6
  openldm img2img --ckpt v1-5-pruned-emaonly.safetensors --init-img sketch.png \\
      --prompt "a fantasy landscape, trending on artstation" --strength 0.75
  openldm img2img --ckpt model.safetensors --init-img photo.jpg --prompt "an oil painting" \\
      --strength 0.5 --sampler euler_a --ddim_steps 30 --n_samples 1

--strength 0 returns the init image (through the VAE), 1 redraws it entirely; int(strength * steps)
steps run. The init image is resized down to a multiple of 8 per side (the reference script: 64)
unless --H/--W ask for a size.""",
}


def add_parsers(subparsers: Any) -> None:
    """Add the ``txt2img`` and ``img2img`` commands to the ``openldm`` subparsers."""
    for command, description in DESCRIPTIONS.items():
        parser = subparsers.add_parser(
            command,
            help=description.split(" (")[0].lower(),
            description=description,
            epilog=EXAMPLES[command].replace("{size}", embedded_size()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_generation_flags(parser, command, embedded=True)
        parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``openldm txt2img`` or ``openldm img2img``; return the exit status."""
    from openldm.images import load_image
    from openldm.pipelines.img2img import Img2Img
    from openldm.pipelines.run import Task
    from openldm.pipelines.txt2img import Txt2Img

    def task() -> Task:
        if args.command == "txt2img":
            return Txt2Img()
        return Img2Img(load_image(args.init_img, "--init-img"), args.strength)

    low, high = DEFAULT_SCALES[args.command]  # the reference's SD 1 and SD 2 scripts' defaults
    return run_generation(args, task, lambda variant: high if variant == "sd2" else low)
