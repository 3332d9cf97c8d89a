"""``openldm merge``: two or three checkpoints into one original single file, LoRAs baked in on request."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from openldm.commands.common import UsageError, lora_flag

DESCRIPTION = """\
Merge checkpoints as the web UI's Checkpoint Merger does, into one original .safetensors file:

  weighted-sum    (1 - alpha) * A + alpha * B
  add-difference  A + alpha * (B - C)     (C: the model B was fine-tuned from)

Give two checkpoints for a weighted sum, three for an add-difference (the default mode follows the
count). --lora bakes a LoRA into the result at its weight (repeatable)."""
EPILOG = """\
examples:
  openldm merge a.safetensors b.safetensors --alpha 0.3 --out ab.safetensors
  openldm merge a.safetensors inpaint.safetensors base.safetensors --out a-inpaint.safetensors
  openldm merge a.safetensors b.safetensors --lora style.safetensors:0.6 --out ab-style.safetensors"""
DTYPES = ("same", "fp16", "fp32", "bf16")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge two or three checkpoints into one single file",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="A, B (and C): single-file checkpoints"
    )
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--mode", choices=["weighted-sum", "add-difference"], help="(default: by the count)")
    parser.add_argument("--alpha", type=float, default=0.5, help="the multiplier M (default: %(default)s)")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="bake this LoRA in (repeatable)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="same", help="stored dtype (default: A's)")
    parser.set_defaults(run=run)
    return parser


def _check(args: argparse.Namespace) -> str:
    from openldm.checkpoints.merge import check_readable
    from openldm.files import check_output_folder, check_outside_package

    count = len(args.checkpoints)
    if count not in (2, 3):
        raise UsageError(f"merge takes 2 checkpoints (weighted sum) or 3 (add difference), got {count}")
    mode = args.mode or ("weighted-sum" if count == 2 else "add-difference")
    if (mode == "weighted-sum") != (count == 2):
        raise UsageError(
            f"--mode {mode} merges {2 if mode == 'weighted-sum' else 3} checkpoints, got {count}"
        )
    check_readable(dict(zip("ABC", args.checkpoints, strict=False)))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out!r} must end in .safetensors")
    if any(out.resolve() == Path(p).resolve() for p in args.checkpoints):
        raise UsageError("--out must not be one of the checkpoints being merged")
    check_output_folder(out.resolve().parent, "--out's folder")
    check_outside_package(out, "--out")
    for value in args.lora:
        lora_flag(value)
    return mode


def _bake(merged: dict, loras: list[str], temporary: Path) -> dict:
    """``merged`` with the LoRAs added: it is loaded as a model (from ``temporary``), patched, and the
    changed weights written back under the single file's names."""
    import torch
    from safetensors.torch import save_file

    from openldm.checkpoints.detect import TEXT_PREFIXES, UNET_PREFIX
    from openldm.checkpoints.formats.clip import text_to_open_clip
    from openldm.model import load

    save_file(merged, str(temporary))
    model = load(temporary, dtype=torch.float32)
    for value in loras:
        path, weight = lora_flag(value)
        model.load_lora(path, weight)
    out = dict(merged)
    changed = model.adapters.patches.changed()
    for network, name in changed:
        if network == "unet":
            key = UNET_PREFIX + name
            out[key] = model.unet.get_parameter(name).detach().to(merged[key].dtype).contiguous()
    if any(network == "text_encoder" for network, _ in changed):
        text = model.text_encoder.state_dict()
        if model.spec.text.activation == "quick_gelu":  # SD 1: transformers' names
            layout = {TEXT_PREFIXES["transformers"] + k: v for k, v in text.items()}
        else:  # SD 2: OpenCLIP's (q, k, v in one tensor); the file's extra resblock stays as it is
            layout = {TEXT_PREFIXES["open_clip"] + k: v for k, v in text_to_open_clip(text).items()}
        for key, value in layout.items():
            if key in out:
                out[key] = value.detach().to(out[key].dtype).contiguous()
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from openldm.checkpoints.merge import merge_state_dicts, read_inputs
    from openldm.files import replaced_when_done

    mode = _check(args)
    dtype = {"same": None, "fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    merged = merge_state_dicts(read_inputs(args.checkpoints), mode, args.alpha, dtype)
    recipe = {
        "mode": mode,
        "alpha": args.alpha,
        "checkpoints": [os.path.basename(p) for p in args.checkpoints],
    }
    recipe["loras"] = args.lora
    with replaced_when_done(args.out) as temporary:
        if args.lora:
            merged = _bake(merged, args.lora, temporary)
        save_file(merged, str(temporary), metadata={"openldm.merge": json.dumps(recipe)})
    print(f"wrote {args.out} ({mode}, alpha {args.alpha}, {len(merged)} tensors)")
    return 0
