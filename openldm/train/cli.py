"""``openldm train``: train the embedded default model from scratch and export it.

Wire it into ``openldm/cli.py`` with ``from openldm.train.cli import add_train_parser`` and
``add_train_parser(commands)`` next to the other subcommands (it sets ``run=run_train``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

STAGES = {
    "vae": ("vae",),
    "text": ("text",),
    "diffusion": ("diffusion",),
    "all": ("vae", "text", "diffusion"),
    # The variants, trained from a finished base model (openldm/train/variants.py).
    "inpaint": ("inpaint",),
    "depth": ("depth",),
    # The embedded model's ControlNet (openldm/train/controlnet.py).
    "controlnet": ("controlnet",),
}
DESCRIPTION = """\
Train the embedded default model (preset "embedded") from scratch on the procedural shapes dataset:
stage 1 the autoencoder (f=8, 4 latent channels, L1 + L2 + edge + KL; half the images painted in
off-palette colours), stage 2 the CLIP text encoder (pre-trained to parse captions into their scenes:
background, and colour, kind and size per grid cell; and each object phrase's colour, kind and cells
at its own tokens), stage 3 the UNet under the frozen text encoder (eps objective with min-SNR
weighting, AdamW, warm-up, 10% caption dropout, EMA, gradient clipping). Then the EMA weights are
exported in fp16 as one SD 1 single file, which `openldm txt2img --ckpt FILE` or openldm.load(FILE)
reads.

Files in --out: vae/, text/ and diffusion/ each hold checkpoint.pt (resumable) and log.jsonl (the
losses); vae/reconstructions.png (originals above reconstructions), diffusion/samples.png (previews:
Euler, 25 steps, guidance 7.5), diffusion/latents.pt (the encoded images) and report.json (times,
reconstruction errors, the text encoder's parsing accuracy).
"""
EPILOG = """\
examples:
  # the whole recipe: the three stages, then the single file (under 60 minutes on 2 CPU cores)
  openldm train --out runs/embedded --export openldm/data/embedded.safetensors
  # a quick try: 50 steps per stage
  openldm train --out /tmp/try --steps 50
  # continue an interrupted run
  openldm train --out runs/embedded --resume --export openldm/data/embedded.safetensors
  # one stage at a time (each reads the earlier stages' checkpoints in --out)
  openldm train --out runs/embedded --stage text
  # the inpainting and depth variants (UNet-only files resumed from the packaged base model;
  # about 13 minutes each, side by side on 2 cores)
  openldm train --out runs/embedded-inpaint --stage inpaint --threads 1
  openldm train --out runs/embedded-depth --stage depth --threads 1
  # the embedded model's ControlNet (shapes placed by their outlines; about 20 minutes)
  openldm train --out runs/controlnet --stage controlnet
  # ... and replace the packaged one (only an --export that names it writes into the package)
  openldm train --out runs/embedded-depth --stage depth --export openldm/data/embedded-depth.safetensors
"""


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` command to an ``add_subparsers()`` object; return its parser."""
    parser = subparsers.add_parser(
        "train",
        help="train the embedded default model from scratch",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="the run's folder (checkpoints, logs, previews)")
    parser.add_argument(
        "--stage", choices=list(STAGES), default="all", help="what to train (default: %(default)s)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="wall-time budget of this invocation, shared between the stages in the recipe's "
        "proportions; a stage that runs out stops with a checkpoint (default: the recipe's, 57 in all)",
    )
    parser.add_argument("--steps", type=int, help="steps of each stage run (default: the recipe's)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument(
        "--export",
        metavar="PATH",
        help="where to write the single-file model (default: OUT/embedded.safetensors, for --stage inpaint "
        "or depth OUT/embedded-STAGE.safetensors; 'none' to skip). Nothing is written into the installed "
        "package unless named here, e.g. --export openldm/data/embedded-inpaint.safetensors",
    )
    parser.add_argument(
        "--base",
        metavar="PATH",
        help="--stage inpaint/depth: the base model to start from (default: the packaged embedded model)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps... (default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        help="threads that each compute a block of every batch, the torch threads shared out among them "
        "(default: 2 on a CPU with 2 or more threads, else 1). On a few CPU cores the small tensors of "
        "these models leave a second torch thread mostly idle; two workers of one thread each run side "
        "by side. What is trained does not change",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_train)
    return parser


def check_run_folders(args: argparse.Namespace) -> None:
    """--device exists, --out is a writable folder outside the installed package, and the folder of an
    --export given by name is writable; before any training."""
    from openldm.devices import resolve_device
    from openldm.files import check_output_folder, check_outside_package

    resolve_device(args.device)
    check_outside_package(args.out, "--out")
    check_output_folder(args.out, "--out")
    if args.export not in (None, "none"):
        check_output_folder(Path(args.export).parent, "--export's folder")


def default_workers(device: str) -> int:
    """2 worker threads on a CPU with 2 or more torch threads (one each), else 1 (a GPU: one stream)."""
    import torch

    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def run_train(args: argparse.Namespace) -> int:
    """Run ``openldm train``; return the exit status."""
    from openldm.train.embedded import embedded_recipe, train_embedded, with_overrides

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    args.workers = default_workers(args.device) if args.workers is None else args.workers
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    check_run_folders(args)
    logging.getLogger("openldm").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    if args.stage == "controlnet":
        from openldm.train.controlnet import run_controlnet_command

        print(json.dumps(run_controlnet_command(args), indent=2))
        return 0
    if args.stage in ("inpaint", "depth"):
        from openldm.train.variants import run_variant_command

        print(json.dumps(run_variant_command(args), indent=2))
        return 0
    recipe = with_overrides(embedded_recipe(), steps=args.steps, minutes=args.minutes, workers=args.workers)
    out = Path(args.out)
    export = None if args.export == "none" else Path(args.export or out / "embedded.safetensors")
    report = train_embedded(
        recipe,
        out,
        stages=STAGES[args.stage],
        resume=args.resume,
        export_path=export,
        device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps(report, indent=2))
    return 0
