"""Fewer network evaluations at full size: each step-reduction option's seconds and its distance to the
full computation's image, SD 1.5 at 512 (random weights, fp32, the CPU).

The full computation is openldm's txt2img with DDIM, ``--steps`` steps (default 20), guidance 7.5, one
seed; every option runs the same prompt, seed and starting noise: ``cfg_end`` 0.8, ``feature_reuse``
2 and 3, ``token_merging`` 0.5, the full computation at fewer steps, and the LCM sampler at 4 steps.
Printed per row: seconds for the call (sampling and decoding), the speed-up over the full computation,
and the distance of its result to the full computation's: the latents' relative L2 distance, and the
decoded images' mean and max absolute difference in 1/255 (images in [0, 255]).

The weights are random (no checkpoint can be downloaded here), so the distances say how far each option
moves this computation, not how an image of a trained model looks; ``bench/step_reduction.py`` scores
the options' images on the embedded model, which is trained.

Run: ``python bench/step_reduction_full_size.py [--steps 20] [--size 512] [--threads 2]``. About 15
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import peers  # bench/peers.py: puts the checkout on sys.path before openldm's import
import torch
from pipelines_full_size import NEGATIVE, PROMPT, SEED, _ours_model, random_weights

from openldm.config import preset

GUIDANCE = 7.5


def rows(steps: int) -> list[tuple[str, dict[str, Any]]]:
    fewer = max(1, steps * 7 // 10)
    return [
        (f"full computation, {steps} steps", {}),
        ("cfg_end 0.8", {"cfg_end": 0.8}),
        ("feature_reuse 2", {"feature_reuse": 2}),
        ("feature_reuse 3", {"feature_reuse": 3}),
        ("token_merging 0.5", {"token_merging": 0.5}),
        (f"{fewer} steps", {"steps": fewer}),
        ("lcm, 4 steps", {"sampler": "lcm", "steps": 4}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    peers.set_threads(args.threads)
    spec = preset("sd15")
    model = _ours_model(spec, random_weights(spec, torch.float32))
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(SEED))
    common = {"width": args.size, "height": args.size, "seed": SEED, "noise": noise, "progress": False}
    common |= {"guidance_scale": GUIDANCE, "sampler": "ddim", "steps": args.steps, "output_type": "pt"}
    model.txt2img(PROMPT, NEGATIVE, **{**common, "steps": 1})  # warm-up: the Winograd filters are made

    print("| option | seconds | speed-up | latents' relative L2 distance | image mean / max difference |")
    print("|---|---|---|---|---|")
    full: Any = None
    for name, options in rows(args.steps):
        start = time.perf_counter()
        out = model.txt2img(PROMPT, NEGATIVE, **{**common, **options})
        seconds = time.perf_counter() - start
        image = out.images.float() * 255  # [0, 1] -> [0, 255]
        if full is None:
            full = (seconds, out.latents, image)
        distance = ((out.latents - full[1]).norm() / full[1].norm()).item()
        difference = (image - full[2]).abs()
        print(
            f"| {name} | {seconds:.1f} | {full[0] / seconds:.2f} | {distance:.4f} "
            f"| {difference.mean():.2f} / {difference.max():.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
