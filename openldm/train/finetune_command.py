"""``openldm finetune``'s command line (see :mod:`openldm.train.finetune`)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Adapt a model to your own images. The data: a folder of images with same-named .txt captions, a
folder with a metadata.jsonl ({"file_name": ..., "text": ...} per line), or webdataset .tar shards.
Images that cannot be read or have no caption are reported and left out (--on-problem stop: an
error instead), before any training.

Methods and what they write in OUT:
  lora               LoRA layers beside the attention and feed-forward layers: lora.safetensors in
                     kohya's names (the web UI, diffusers' load_lora_weights and openldm --lora read it)
  textual-inversion  the vectors of a new --word: WORD.safetensors (the web UI's embedding format;
                     diffusers' load_textual_inversion and openldm --embedding read it)
  full               the UNet's own weights (--text-encoder: the text encoder's too): model.safetensors,
                     the original single file (--diffusers: a diffusers folder as well)
  dreambooth         full, plus prior preservation: images of --class-prompt made by the model before
                     training (kept in --class-data) are trained on beside yours

OUT also gets log.jsonl (the loss of every step) and checkpoint.pt (every --checkpoint-every steps):
--resume continues a stopped or killed run and ends with the weights the whole run would have had.
Under torchrun (torchrun --nproc_per_node N -m openldm finetune ...) the processes share every batch
(DistributedDataParallel; gloo on the CPU, nccl on CUDA) and rank 0 writes."""
EPILOG = """\
examples:
  openldm finetune --method lora --data my-photos --out my-lora --steps 800 --rank 16 --resolution 512 \\
      --ckpt v1-5-pruned-emaonly.safetensors --gradient-checkpointing
  openldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --lora my-lora/lora.safetensors:0.8 --prompt ...
  openldm finetune --method dreambooth --data my-dog --class-prompt "a photo of a dog" --out dog \\
      --steps 400 --lr 5e-6 --ckpt v1-5-pruned-emaonly.safetensors
  torchrun --standalone --nproc_per_node 2 -m openldm finetune --method lora --data my-photos --out run \\
      --batch-size 4"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune",
        help="adapt a model to your images (LoRA, DreamBooth, textual inversion, full)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--method",
        choices=["lora", "textual-inversion", "full", "dreambooth"],
        default="lora",
        help="what is trained (default: %(default)s)",
    )
    add("--data", required=True, help="the images and captions (folder or .tar shards)")
    add("--out", required=True, help="the folder to write the result, the loss log and checkpoints to")
    add("--ckpt", help="the model to adapt (default: the embedded model)")
    add("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    run_group = parser.add_argument_group("the run")
    add = run_group.add_argument
    add("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    add(
        "--batch-size", type=int, default=1, help="images per step, over all processes (default: %(default)s)"
    )
    add("--accumulate", type=int, default=1, help="compute each batch in N rounds: less memory (default: 1)")
    add(
        "--lr",
        type=float,
        help="AdamW learning rate (default: lora 1e-4, textual-inversion 5e-3, full and dreambooth 5e-6)",
    )
    add("--warmup", type=int, default=0, help="steps of linear warm-up (default: %(default)s)")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)")
    add("--ema-decay", type=float, help="keep an EMA of the trained weights and write it (e.g. 0.999)")
    add(
        "--resolution", type=int, default=512, help="bucket area is about this squared (default: %(default)s)"
    )
    add(
        "--caption-dropout", type=float, default=0.0, help="fraction of empty captions (default: %(default)s)"
    )
    add("--min-snr-gamma", type=float, help="min-SNR weighting of the loss (e.g. 5)")
    add("--offset-noise", type=float, default=0.0, help="offset noise strength (e.g. 0.05; default: off)")
    add("--gradient-checkpointing", action="store_true", help="recompute UNet activations: less memory")
    add(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        default="no",
        help="forward passes in bf16 (CPU, CUDA) or fp16 (CUDA, MPS) (default: %(default)s)",
    )
    add(
        "--seed", type=int, default=0, help="every random draw of a step comes from it (default: %(default)s)"
    )
    add("--on-problem", choices=["skip", "stop"], default="skip", help="unreadable/uncaptioned images")
    add("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: %(default)s)")
    add("--sample-every", type=int, default=0, help="write sample images every N steps (OUT/samples)")
    add("--sample-prompt", action="append", default=[], help="a sample prompt (repeatable; seeds 0, 1, ...)")
    add("--sample-steps", type=int, default=25, help="sampling steps of samples and class images")
    add("--device", help="cpu, cuda, mps... (default: cuda, else mps, else cpu)")
    method_group = parser.add_argument_group("method settings")
    add = method_group.add_argument
    add("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    add("--alpha", type=float, help="LoRA alpha (default: the rank, a scale of 1)")
    add("--text-encoder", action="store_true", help="train the text encoder too (LoRA layers or weights)")
    add("--word", help="textual inversion: the new word, as the captions write it (e.g. my-style)")
    add("--init-word", default="", help="textual inversion: the word whose vectors it starts from")
    add(
        "--vectors", type=int, default=1, help="textual inversion: vectors of the word (default: %(default)s)"
    )
    add(
        "--class-prompt", help="prior preservation (dreambooth; lora too): the class, e.g. 'a photo of a dog'"
    )
    add("--class-data", help="folder of the class images, made when missing (default: OUT/class-images)")
    add("--class-images", type=int, default=100, help="class images to use (default: %(default)s)")
    add("--prior-weight", type=float, default=1.0, help="weight of the prior loss; 0: off (default: 1)")
    add(
        "--diffusers",
        action="store_true",
        help="full/dreambooth: write OUT/diffusers, a diffusers folder, too",
    )
    parser.set_defaults(run=run)
    return parser


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--accumulate", args.accumulate, 1),
        ("--rank", args.rank, 1),
        ("--vectors", args.vectors, 1),
        ("--checkpoint-every", args.checkpoint_every, 1),
        ("--sample-every", args.sample_every, 0),
        ("--sample-steps", args.sample_steps, 1),
        ("--class-images", args.class_images, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.resolution < 64 or args.resolution % 64:
        raise ValueError(f"--resolution must be a multiple of 64, got {args.resolution}")
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.offset_noise < 0 or args.prior_weight < 0 or args.max_grad_norm <= 0:
        raise ValueError("--offset-noise and --prior-weight must be >= 0, --max-grad-norm > 0")
    if args.diffusers and args.method not in ("full", "dreambooth"):
        raise ValueError("--diffusers writes a whole model: it goes with --method full or dreambooth")


def _check_precision(precision: str, device: Any) -> None:
    import torch

    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise ValueError(f"--mixed-precision fp16 needs a CUDA or MPS device, not {device.type}; use bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16; use --mixed-precision fp16")


def run(args: argparse.Namespace) -> int:
    import torch

    from openldm.devices import resolve_device
    from openldm.files import check_output_folder
    from openldm.model import load
    from openldm.train.distributed import device_for, join, leave
    from openldm.train.finetune import FinetuneConfig, check, finetune

    _check(args)
    check_output_folder(args.out, "--out")
    device = device_for(resolve_device(args.device))
    _check_precision(args.mixed_precision, device)
    config = FinetuneConfig(
        data=args.data,
        out=args.out,
        method=args.method,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        learning_rate=args.lr,
        warmup=args.warmup,
        max_grad_norm=args.max_grad_norm,
        ema_decay=args.ema_decay,
        rank=args.rank,
        alpha=args.alpha,
        text_encoder=args.text_encoder,
        resolution=args.resolution,
        caption_dropout=args.caption_dropout,
        min_snr_gamma=args.min_snr_gamma,
        offset_noise=args.offset_noise,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        on_problem=args.on_problem,
        word=args.word,
        init_word=args.init_word,
        vectors=args.vectors,
        class_prompt=args.class_prompt,
        class_data=args.class_data,
        class_images=args.class_images,
        prior_weight=args.prior_weight,
        diffusers=args.diffusers,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt),
        sample_steps=args.sample_steps,
    )
    ranks = join(device)
    try:
        check(config, ranks)
        # direct convolutions: the weights change every step, Winograd's kept filters would go stale
        model = load(args.ckpt, device=device, dtype=torch.float32, winograd_memory=0)
        path = finetune(model, config, ranks, progress=True, resume=args.resume)
    finally:
        leave(ranks)
    if path is not None:
        print(f"openldm: wrote {path}")
    return 0
