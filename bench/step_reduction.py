"""Fewer network evaluations, measured: each option's speed-up and its fidelity cost on the embedded
model's evaluator (``openldm eval``'s scenes, scorer and noise), against the full computation.

Options measured (each a row): ``cfg_end`` (guidance for the first fraction of the steps only),
``feature_reuse`` (the whole UNet every N-th step, DeepCache-style), ``token_merging`` (ToMe: that
fraction of the tokens merged before each full-resolution self-attention), the full computation at fewer
steps, to compare at equal wall time, and the LCM sampler at a few steps (on this model, which is not a
consistency model: what the sampler alone costs; an LCM-LoRA would be distilled for it). For each row:
seconds for all the evaluator's images (generation only, the same for every row), the speed-up over
the first row, and the seen/held-out scores (colour, kind, position, count, scene; percent).

Run: ``python bench/step_reduction.py [--n 64] [--steps 25] [--cfg-ends 1 0.8 0.6 0.4]
[--reuse 2 3] [--tome 0.5] [--step-list 20 15] [--lcm-steps 8 4] [--threads 2]``. About 5-10 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import time

import peers  # bench/peers.py: puts the checkout on sys.path before openldm's import

import openldm
from openldm.commands.eval import SETS, Generate, Setting, score_settings, starting_noise

SEED, GUIDANCE, SAMPLER = 0, 7.5, "ddim"
METRICS = ("colour", "kind", "position", "count", "scene")


def generator(model: openldm.StableDiffusion, cfg_end: float, reuse: int, tome: float) -> Generate:
    """The evaluator's images (its captions, seeds and noise) with guidance for ``cfg_end`` of the steps,
    the whole UNet every ``reuse``-th step and ``tome`` of the tokens merged."""

    def generate(captions, scenes, start, setting):  # type: ignore[no-untyped-def]
        result = model.txt2img(
            captions, steps=setting.steps, guidance_scale=setting.guidance, sampler=setting.sampler,
            seed=SEED + start, noise=starting_noise(model, SEED, start, len(captions)), cfg_end=cfg_end,
            feature_reuse=reuse, token_merging=tome, progress=False,
        )  # fmt: skip
        return list(result.images)

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg-ends", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4])
    parser.add_argument("--step-list", type=int, nargs="+", default=[20, 15])
    parser.add_argument("--reuse", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--tome", type=float, nargs="*", default=[0.5])
    parser.add_argument("--lcm-steps", type=int, nargs="*", default=[8, 4])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    peers.set_threads(args.threads)
    model = openldm.load()
    rows = [(SAMPLER, args.steps, end, 1, 0.0) for end in args.cfg_ends]
    rows += [(SAMPLER, args.steps, 1.0, reuse, 0.0) for reuse in args.reuse]
    rows += [(SAMPLER, args.steps, 1.0, 1, tome) for tome in args.tome]
    rows += [(SAMPLER, steps, 1.0, 1, 0.0) for steps in args.step_list]
    rows += [("lcm", steps, 1.0, 1, 0.0) for steps in args.lcm_steps]
    header = " | ".join(f"{s} {m}" for s in SETS for m in METRICS)
    print(f"| sampler | steps | cfg_end | reuse | tome | seconds | speed-up | {header} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(SETS) * len(METRICS))
    first = None
    for sampler, steps, end, reuse, tome in rows:
        generate = generator(model, end, reuse, tome)
        start = time.perf_counter()
        scores = score_settings(
            generate, [Setting(sampler, steps, GUIDANCE)], args.n, SEED, args.batch_size, False
        )
        seconds = time.perf_counter() - start
        first = first or seconds
        (result,) = scores.values()
        cells = " | ".join(f"{100 * result[s][m]:.1f}" for s in SETS for m in METRICS)
        line = (
            f"| {sampler} | {steps} | {end:g} | {reuse} | {tome:g} | {seconds:.1f} | {first / seconds:.2f} | "
            f"{cells} |"
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
