"""``openldm eval --task inpaint|depth``: the fidelity of an inpainting or depth model on the shapes task.

The cases and scores are :mod:`openldm.shapes.variant_fidelity`'s; images come from the public
``inpaint`` / ``depth2img`` pipelines (case ``i`` with seed ``seed + i``), on the embedded model's variant
without ``--ckpt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.commands.common import UsageError
from openldm.files import write_atomically

if TYPE_CHECKING:
    from PIL import Image

    from openldm.model import StableDiffusion

# A plain text-to-image model inpaints too (by latent blending).
TASK_VARIANTS = {"inpaint": ("inpaint", "sd1", "sd2"), "depth": ("depth",)}
INPAINT_COLUMNS = ("repainted", "colour", "kind", "position", "kept_shapes", "kept_error")
DEPTH_COLUMNS = ("colour", "kind", "position", "count", "order", "order_found")


def _load(args: argparse.Namespace) -> tuple[StableDiffusion, str]:
    from openldm.commands.common import load_model, precision_for

    model, precision = load_model(args, args.task), precision_for(args)
    if model.spec.variant not in TASK_VARIANTS[args.task]:
        raise UsageError(
            f"--task {args.task} needs a {args.task} model; this is a {model.spec.variant} model"
        )
    return model, precision


def _options(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "guidance_scale": args.scale,
        "sampler": args.sampler,
        "precision": precision,
        "progress": False,
    }


def inpaint_fidelity(
    model: StableDiffusion, n: int, seed: int, options: dict[str, Any], on_image: Callable[[], Any] = bool
) -> dict[str, float]:
    """:func:`~openldm.shapes.variant_fidelity.score_inpaint` of ``model`` on ``n`` cases (case ``i``
    sampled with seed ``seed + i`` and the pipeline ``options``); ``on_image`` is called after each."""
    from openldm.shapes.variant_fidelity import inpaint_cases, score_inpaint

    cases = inpaint_cases(seed, n, model.spec.image_size)
    images: list[Image.Image] = []
    for i, case in enumerate(cases):
        images.append(model.inpaint(case.caption, case.init, case.mask, seed=seed + i, **options).images[0])
        on_image()
    return score_inpaint(images, cases)


def depth_fidelity(
    model: StableDiffusion, n: int, seed: int, options: dict[str, Any], on_image: Callable[[], Any] = bool
) -> dict[str, float]:
    """:func:`~openldm.shapes.variant_fidelity.score_depth` of ``model`` drawing ``n`` scenes from their
    depth maps and captions (seeds as :func:`inpaint_fidelity`)."""
    from PIL import Image

    from openldm.shapes.render import PALETTE
    from openldm.shapes.variant_fidelity import depth_cases, score_depth

    size = model.spec.image_size
    cases = depth_cases(seed, n, size)
    images: list[Image.Image] = []
    for i, (caption, scene, depth) in enumerate(cases):
        blank = Image.new("RGB", (size, size), PALETTE[scene.background])  # unused at strength 1
        drawn = model.depth2img(caption, blank, depth_map=depth, strength=1.0, seed=seed + i, **options)
        images.append(drawn.images[0])
        on_image()
    return score_depth(images, [scene for _, scene, _ in cases])


def table(task: str, scores: dict[str, float]) -> str:
    columns = INPAINT_COLUMNS if task == "inpaint" else DEPTH_COLUMNS
    cells = [f"{scores[c]:.1f}" if c == "kept_error" else f"{100 * scores[c]:.1f}" for c in columns]
    header = [f"{c} (0-255)" if c == "kept_error" else c for c in columns]
    return "\n".join(
        [
            "| images | " + " | ".join(header) + " |",
            "|---" * (len(columns) + 1) + "|",
            f"| {int(scores['images'])} | " + " | ".join(cells) + " |",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """``openldm eval --task inpaint|depth``; return the exit status."""
    from tqdm import tqdm

    if args.sweep != "none" or args.ground_truth:
        raise UsageError(f"--task {args.task} takes neither --sweep nor --ground-truth")
    model, precision = _load(args)
    bar = tqdm(
        total=args.n, desc=f"eval {args.task}", unit="image", disable=args.no_progress, file=sys.stderr
    )
    fidelity = inpaint_fidelity if args.task == "inpaint" else depth_fidelity
    scores = fidelity(model, args.n, args.seed, _options(args, precision), bar.update)
    bar.close()
    name = args.ckpt or f"the embedded {args.task} variant"
    setting = f"{args.sampler}, {args.steps} steps, guidance {args.scale:g}, seed {args.seed}"
    print(f"# {args.task} fidelity of {name} ({setting})\n\n{table(args.task, scores)}")
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": name, "task": args.task, "setting": setting, "scores": scores}
        write_atomically((json.dumps(record, indent=2) + "\n").encode(), path)
        print(f"openldm: wrote {path}", file=sys.stderr)
    return 0
