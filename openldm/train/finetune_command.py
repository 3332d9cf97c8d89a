"""``openldm finetune``'s command line (see :mod:`openldm.train.finetune`)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Adapt a model to your own images. The data: a folder of images with same-named .txt captions, a
folder with a metadata.jsonl ({"file_name": ..., "text": ...} per line), or webdataset .tar shards.
Images that cannot be read or have no caption are reported and left out (--on-problem stop: an
error instead), before any training. Writes OUT/lora.safetensors (kohya's names: the web UI,
diffusers' load_lora_weights and openldm --lora read it) and OUT/loss.jsonl."""
EPILOG = """\
example:
  openldm finetune --method lora --data my-photos --out my-lora --steps 800 --rank 16 --resolution 512 \\
      --ckpt v1-5-pruned-emaonly.safetensors
  openldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --lora my-lora/lora.safetensors:0.8 --prompt ..."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune",
        help="adapt a model to your images (LoRA, textual inversion)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--method",
        choices=["lora", "textual-inversion"],
        default="lora",
        help="what is trained: LoRA layers, or a new word's vectors (default: %(default)s)",
    )
    add("--word", help="textual inversion: the new word, as the captions write it (e.g. my-style)")
    add("--init-word", default="", help="textual inversion: the word whose vectors it starts from")
    add(
        "--vectors", type=int, default=1, help="textual inversion: vectors of the word (default: %(default)s)"
    )
    add("--data", required=True, help="the images and captions (folder or .tar shards)")
    add("--out", required=True, help="the folder to write the result and the loss log to")
    add("--ckpt", help="the model to adapt (default: the embedded model)")
    add("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    add("--batch-size", type=int, default=1, help="images per step (default: %(default)s)")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    add("--warmup", type=int, default=0, help="steps of linear warm-up (default: %(default)s)")
    add("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    add("--alpha", type=float, help="LoRA alpha (default: the rank, a scale of 1)")
    add("--text-encoder", action="store_true", help="train LoRA layers in the text encoder too")
    add(
        "--resolution", type=int, default=512, help="bucket area is about this squared (default: %(default)s)"
    )
    add(
        "--caption-dropout", type=float, default=0.0, help="fraction of empty captions (default: %(default)s)"
    )
    add("--min-snr-gamma", type=float, help="min-SNR weighting of the loss (e.g. 5)")
    add(
        "--seed", type=int, default=0, help="every random draw of a step comes from it (default: %(default)s)"
    )
    add("--on-problem", choices=["skip", "stop"], default="skip", help="unreadable/uncaptioned images")
    add("--device", help="cpu, cuda, mps... (default: cuda, else mps, else cpu)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from openldm.devices import resolve_device
    from openldm.files import check_output_folder
    from openldm.model import load
    from openldm.train.finetune import FinetuneConfig, finetune

    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--rank", args.rank, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.resolution < 64 or args.resolution % 64:
        raise ValueError(f"--resolution must be a multiple of 64, got {args.resolution}")
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    check_output_folder(args.out, "--out")
    config = FinetuneConfig(
        data=args.data,
        out=args.out,
        method=args.method,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup=args.warmup,
        rank=args.rank,
        alpha=args.alpha,
        text_encoder=args.text_encoder,
        resolution=args.resolution,
        caption_dropout=args.caption_dropout,
        min_snr_gamma=args.min_snr_gamma,
        seed=args.seed,
        on_problem=args.on_problem,
        word=args.word,
        init_word=args.init_word,
        vectors=args.vectors,
    )
    model = load(args.ckpt, device=resolve_device(args.device), dtype=torch.float32)
    path = finetune(model, config)
    print(f"openldm: wrote {path}")
    return 0
