"""``openldm eval``: how faithfully a model draws what the prompt asks, on the shapes task.

Images are generated for explicit captions of random shape scenes (:func:`openldm.shapes.dataset.
evaluation_scenes`), and :mod:`openldm.shapes.evaluate` detects the shapes in them and scores each
attribute against the scene the caption describes. Two sets: "seen" scenes follow the training
distribution; "held-out" scenes hold one shape whose colour-kind pair never occurs in training.

Seeds: image ``i`` of a set starts from the unit noise ``torch.randn`` draws from a CPU generator seeded
with ``seed + i`` (the web UI's convention for the images of a batch), so an image does not depend on the
batch size or on which batch it falls in. Stochastic samplers (``euler_a``, ``dpmpp_2m_sde``; DDIM with
eta > 0) also draw noise while sampling, from the generator of the batch (seed ``seed + i`` of the
batch's first image): their images do depend on the batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.commands.common import UsageError, check_adapter_flags, device_name, load_model, precision_for
from openldm.commands.flags import Flags, adapter_flags
from openldm.files import check_output_folder, write_atomically

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from openldm.model import StableDiffusion
    from openldm.shapes.render import Scene

NAME = "eval"
SETS = ("seen", "held-out")
DEFAULT_GUIDANCE_LIST = "1.5,2,3,4,5,6,7,8"
DEFAULT_STEP_LIST = "5,10,15,25,50"
# The targets of the embedded model (in percent), met at 25 steps and guidance 7.5.
TARGETS: dict[str, dict[str, float]] = {
    "seen": {"colour": 90, "kind": 85, "position": 80, "count": 80},
    "held-out": {"colour": 80, "kind": 80},
}
SWEEP_COLUMNS = (
    ("seen", "colour"),
    ("seen", "kind"),
    ("seen", "position"),
    ("seen", "count"),
    ("held-out", "colour"),
    ("held-out", "kind"),
)

DESCRIPTION = """\
Measure prompt fidelity on the shapes task: generate images for explicit captions of random scenes
("a red circle in the top left corner and two blue squares on the left and at the bottom on a white
background"), detect the shapes in each image by their palette colours and silhouettes, and score
what the caption asked for:

  colour    objects whose matched detection has the right colour
  kind      ... the right kind (circle, square, triangle, rectangle)
  position  ... the right cell of the 3x3 grid
  count     (colour, kind) groups drawn exactly as often as asked
  scene     images with everything right and nothing extra

"seen" scenes follow the training distribution (1 to 3 shapes); "held-out" scenes hold a single shape
whose colour-kind pair (red triangle, yellow circle, green rectangle, blue square, pink triangle) never
occurs in training captions: they measure compositional generalisation.

Then three hard cases the sets above do not isolate, --n images each (--no-cases skips them): one shape
whose cell the prompt leaves open, three of a kind, and a held-out pair beside another shape placed by a
relation; each scored on the shapes found and on images holding exactly the asked shapes.

Targets of the embedded model at 25 steps and guidance 7.5 (DDIM): seen colour >= 90, kind >= 85,
position >= 80, count >= 80; held-out colour >= 80, kind >= 80 (percent). --ground-truth scores the
renderer's own images of the same scenes: it checks the evaluator and gives 100 everywhere.

Results are Markdown tables on stdout (progress on stderr); --json writes every number."""
EPILOG = """\
examples:
  openldm eval                                   # the embedded model, 100 images per set
  openldm eval --n 20 --steps 10                 # a quick look
  openldm eval --sweep guidance --guidance-list 1,3,5,7.5
  openldm eval --sweep steps --samplers ddim,euler,dpmpp_2m --step-list 5,10,25
  openldm eval --ckpt runs/embedded/embedded.safetensors --json fidelity.json
  openldm eval --ground-truth --n 200            # validate the evaluator itself"""


@dataclass(frozen=True)
class Setting:
    """One way of sampling: every image set is generated and scored once per setting."""

    sampler: str
    steps: int
    guidance: float


Scores = dict[str, dict[str, float]]  # set name -> ``evaluate`` result
Generate = Callable[[list[str], list["Scene"], int, Setting], list["Image.Image"]]


# --- parser ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` command to the ``openldm`` subparsers."""
    from openldm.sampling.samplers import SAMPLERS

    parser = subparsers.add_parser(
        NAME,
        help="measure prompt fidelity on the shapes task",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--ckpt",
        help="the model: a .safetensors/.ckpt file or a diffusers folder (default: the embedded model)",
    )
    add("--config", help="the reference's yaml config of --ckpt (gives the prediction type)")
    add(
        "--task",
        choices=["txt2img", "inpaint", "depth"],
        default="txt2img",
        help="what to score: text-to-image, or an inpainting / depth model (the embedded model's variant "
        "without --ckpt; the repainted shape and the kept region, or the depth order) (default: %(default)s)",
    )
    add("--base", help="for a UNet-only variant file as --ckpt: the complete model it was trained from")
    add("--n", type=int, default=100, help="images per set, seen and held-out (default: %(default)s)")
    add("--steps", type=int, default=25, help="sampling steps (default: %(default)s)")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    add("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (default: %(default)s)")
    add("--seed", type=int, default=0, help="picks the scenes and the noise (default: %(default)s)")
    add("--batch-size", type=int, default=16, help="images generated at once (default: %(default)s)")
    add("--device", help="cpu, cuda, mps... (default: cuda, else mps, else cpu)")
    add(
        "--sweep",
        choices=["none", "guidance", "steps", "all"],
        default="none",
        help="also score each guidance scale of --guidance-list (at --steps, --sampler), each sampler of "
        "--samplers at each step count of --step-list (at --scale), or both (default: %(default)s)",
    )
    add("--guidance-list", default=DEFAULT_GUIDANCE_LIST, help="comma-separated (default: %(default)s)")
    add("--step-list", default=DEFAULT_STEP_LIST, help="comma-separated (default: %(default)s)")
    add("--samplers", default=",".join(SAMPLERS), help="comma-separated (default: all, %(default)s)")
    add(
        "--no-cases",
        action="store_true",
        help="skip the hard cases (--n images each, at the main setting): one shape with no position, "
        "three of a kind, a held-out pair beside another shape",
    )
    add("--json", metavar="PATH", help="write every result to this JSON file")
    add(
        "--ground-truth",
        action="store_true",
        help="score the renderer's images of the same scenes instead of generated ones (expect 100)",
    )
    add("--no-progress", action="store_true", help="no progress bar")
    adapter_flags(Flags(parser, None, None))
    parser.set_defaults(run=run)
    return parser


def _numbers(flag: str, text: str, kind: type[int] | type[float]) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty; give at least one value")
    return values


def _check_steps(flag: str, values: Sequence[int]) -> None:
    if any(v < 1 for v in values):
        raise UsageError(f"{flag} must be >= 1, got {', '.join(map(str, values))}")


def _check_scales(flag: str, values: Sequence[float]) -> None:
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"{flag} must be finite and >= 0, got {', '.join(map(str, values))}")


def _check_samplers(names: Sequence[str]) -> None:
    from openldm.sampling.samplers import SAMPLERS

    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise UsageError(f"unknown sampler {unknown[0]!r}; choose from {', '.join(SAMPLERS)}")


def plan(args: argparse.Namespace) -> tuple[Setting, list[Setting], list[Setting]]:
    """The main setting and the settings of the guidance and steps sweeps; a UsageError for bad flags."""
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.config is not None and args.ckpt is None:
        raise UsageError("--config describes the checkpoint of --ckpt; pass --ckpt too (or no --config)")
    if args.json is not None:
        check_output_folder(Path(args.json).resolve().parent, "--json's folder")
    if args.device is not None:
        device_name(args.device)  # a device this machine lacks: one line, before any work
    check_adapter_flags(args)
    if args.ground_truth and args.sweep != "none":
        raise UsageError("--ground-truth scores the renderer's images: sweeps need a model (--sweep none)")
    _check_steps("--steps", [args.steps])
    _check_scales("--scale", [args.scale])
    _check_samplers([args.sampler])
    main = Setting(args.sampler, args.steps, args.scale)
    guidance: list[Setting] = []
    steps: list[Setting] = []
    if args.sweep in ("guidance", "all"):
        scales = _numbers("--guidance-list", args.guidance_list, float)
        _check_scales("--guidance-list", scales)
        guidance = [Setting(args.sampler, args.steps, g) for g in scales]
    if args.sweep in ("steps", "all"):
        counts = _numbers("--step-list", args.step_list, int)
        _check_steps("--step-list", counts)
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        if not samplers:
            raise UsageError("--samplers is empty; give at least one sampler")
        _check_samplers(samplers)
        steps = [Setting(s, n, args.scale) for s in samplers for n in counts]
    return main, guidance, steps


# --- generating and scoring --------------------------------------------------------------------


def starting_noise(model: StableDiffusion, seed: int, start: int, count: int) -> torch.Tensor:
    """Unit noise [count, C, h, w] for images ``start`` .. ``start + count - 1``: image ``i`` from seed
    ``seed + i``, so it does not depend on the batching."""
    import torch

    spec = model.spec
    side = spec.image_size // spec.vae.downsampling_factor
    shape = (spec.vae.embed_dim, side, side)
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
            for i in range(start, start + count)
        ]
    )


def model_generator(model: StableDiffusion, seed: int, precision: str | None) -> Generate:
    """Images of ``captions`` under a setting, through the public txt2img pipeline."""

    def generate(captions: list[str], scenes: list[Scene], start: int, setting: Setting) -> list[Image.Image]:
        result = model.txt2img(
            captions,
            steps=setting.steps,
            guidance_scale=setting.guidance,
            sampler=setting.sampler,
            seed=seed + start,
            noise=starting_noise(model, seed, start, len(captions)),
            precision=precision,
            progress=False,
        )
        return list(result.images)

    return generate


def ground_truth_generator(size: int) -> Generate:
    """The renderer's own images of the scenes (the setting is ignored)."""
    from openldm.shapes.render import render

    def generate(captions: list[str], scenes: list[Scene], start: int, setting: Setting) -> list[Image.Image]:
        return [render(scene, size).image for scene in scenes]

    return generate


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not progress, file=sys.stderr)


def generate_set(
    generate: Generate, pairs: Sequence[tuple[str, Scene]], setting: Setting, batch_size: int, bar: Any
) -> list[Image.Image]:
    """The images of ``pairs`` (caption, scene) under ``setting``, ``batch_size`` at a time; the index
    of each batch's first image fixes its noise."""
    images: list[Image.Image] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images += generate([c for c, _ in chunk], [s for _, s in chunk], start, setting)
        bar.update()
    return images


def score_settings(
    generate: Generate,
    settings: Sequence[Setting],
    n: int,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> dict[Setting, Scores]:
    """Every set generated and scored under each setting; the same scenes and noise for all of them.

    The loop of :func:`openldm.shapes.evaluate.fidelity`, with the index of each batch's first image and
    the scenes passed on to ``generate``: the index fixes each image's noise, the scenes serve
    ``--ground-truth``.
    """
    from openldm.shapes.dataset import evaluation_scenes
    from openldm.shapes.evaluate import evaluate

    pairs = {name: evaluation_scenes(seed, n, held_out_only=name == "held-out") for name in SETS}
    bar = _bar(len(settings) * len(SETS) * math.ceil(n / batch_size), NAME, progress)
    results: dict[Setting, Scores] = {}
    for setting in settings:
        bar.set_postfix_str(f"{setting.sampler}, {setting.steps} steps, guidance {setting.guidance:g}")
        results[setting] = {
            name: evaluate(
                generate_set(generate, set_pairs, setting, batch_size, bar), [s for _, s in set_pairs]
            )
            for name, set_pairs in pairs.items()
        }
    bar.close()
    return results


def score_cases(
    generate: Generate, setting: Setting, n: int, seed: int, batch_size: int, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Each hard case of :mod:`openldm.shapes.cases`: ``n`` images generated under ``setting``, scored."""
    from openldm.shapes.cases import CASES, case_scenes
    from openldm.shapes.cases import score_cases as score

    bar = _bar(len(CASES) * math.ceil(n / batch_size), f"{NAME} cases", progress)
    results = {}
    for case in CASES:
        pairs = case_scenes(case, seed, n)
        results[case] = score(generate_set(generate, pairs, setting, batch_size, bar), [s for _, s in pairs])
    bar.close()
    return results


def cases_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of :func:`score_cases`' results, in percent."""
    lines = [
        "| case | images | objects found | exactly the asked shapes | held-out pair found |",
        "|---" * 5 + "|",
    ]
    for case, r in results.items():
        held = f"{100 * r['held-out']:.1f}" if "held-out" in r else "-"
        lines.append(
            f"| {case} | {int(r['images'])} | {100 * r['objects']:.1f} | {100 * r['exact']:.1f} | {held} |"
        )
    return "\n".join(lines)


# --- reporting ---------------------------------------------------------------------------------


def missed_targets(scores: Scores) -> list[str]:
    """The targets a result misses, as ``"seen kind 81.0 < 85"``."""
    missed = []
    for name, targets in TARGETS.items():
        for attribute, target in targets.items():
            value = 100 * scores[name][attribute]
            if value < target:
                missed.append(f"{name} {attribute} {value:.1f} < {target:g}")
    return missed


def sweep_table(first: Sequence[str], rows: Sequence[tuple[Sequence[str], Scores]]) -> str:
    """A Markdown table: the ``first`` columns, then the seen and held-out accuracies in percent."""
    header = [*first, *(f"{name} {attribute}" for name, attribute in SWEEP_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for cells, scores in rows:
        values = [f"{100 * scores[name][attribute]:.1f}" for name, attribute in SWEEP_COLUMNS]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return "\n".join(lines)


def report(
    model_name: str,
    main: Setting,
    guidance: Sequence[Setting],
    steps: Sequence[Setting],
    results: dict[Setting, Scores],
    n: int,
    seed: int,
    ground_truth: bool,
    cases: dict[str, dict[str, float]] | None = None,
) -> str:
    """The Markdown report: the main table, its targets, the hard cases and the sweeps' tables."""
    from openldm.shapes.evaluate import format_table

    if ground_truth:
        header = f"model: ground truth (the renderer's images) | n: {n} per set | seed: {seed}"
    else:
        header = (
            f"model: {model_name} | sampler: {main.sampler} | steps: {main.steps} | "
            f"guidance: {main.guidance:g} | n: {n} per set | seed: {seed}"
        )
    missed = missed_targets(results[main])
    verdict = "All targets met." if not missed else "Missed: " + "; ".join(missed) + "."
    parts = [
        "## Prompt fidelity",
        header,
        format_table(results[main]),
        f"Targets (percent, defined at 25 steps and guidance 7.5): {_targets_text()}. {verdict}",
    ]
    if cases:
        parts += ["## Hard cases (at the main setting; positions not scored)", cases_table(cases)]
    if guidance:
        parts += [
            f"## Guidance sweep ({main.sampler}, {main.steps} steps)",
            sweep_table(["guidance"], [([f"{s.guidance:g}"], results[s]) for s in guidance]),
        ]
    if steps:
        parts += [
            f"## Steps sweep (guidance {main.guidance:g})",
            sweep_table(["sampler", "steps"], [([s.sampler, str(s.steps)], results[s]) for s in steps]),
        ]
    return "\n\n".join(parts)


def _targets_text() -> str:
    return "; ".join(
        f"{name} " + ", ".join(f"{attribute} >= {value:g}" for attribute, value in targets.items())
        for name, targets in TARGETS.items()
    )


def to_json(
    model_name: str,
    main: Setting,
    guidance: Sequence[Setting],
    steps: Sequence[Setting],
    results: dict[Setting, Scores],
    args: argparse.Namespace,
    cases: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Every result, with the settings and the flags that made it."""

    def entry(setting: Setting) -> dict[str, Any]:
        return {**asdict(setting), **results[setting]}

    return {
        "model": model_name,
        "ground_truth": args.ground_truth,
        "n": args.n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "targets": TARGETS,
        "missed_targets": missed_targets(results[main]),
        "main": entry(main),
        "guidance_sweep": [entry(s) for s in guidance],
        "steps_sweep": [entry(s) for s in steps],
        "cases": cases or {},
    }


# --- the command -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``openldm eval``; return the exit status."""

    from openldm.config import preset
    from openldm.embedded import EMBEDDED_PRESET

    if args.task != "txt2img":
        from openldm.commands.eval_variants import run as run_variant_task

        return run_variant_task(args)
    main, guidance, steps = plan(args)
    settings = list(dict.fromkeys([main, *guidance, *steps]))  # each setting scored once
    if args.ground_truth and args.ckpt is None:
        name, generate = "ground truth", ground_truth_generator(preset(EMBEDDED_PRESET).image_size)
    else:
        model, precision = load_model(args), precision_for(args)
        name = args.ckpt or f"the embedded model ({model.source})"
        if args.ground_truth:
            generate = ground_truth_generator(model.spec.image_size)
        else:
            generate = model_generator(model, args.seed, precision)
    progress = not args.no_progress
    results = score_settings(generate, settings, args.n, args.seed, args.batch_size, progress)
    cases = None
    if not args.no_cases:
        cases = score_cases(generate, main, args.n, args.seed, args.batch_size, progress)
    print(report(name, main, guidance, steps, results, args.n, args.seed, args.ground_truth, cases))
    if args.json is not None:
        path = Path(args.json)
        record = to_json(name, main, guidance, steps, results, args, cases)
        write_atomically((json.dumps(record, indent=2) + "\n").encode(), path)
        print(f"openldm: wrote {path}", file=sys.stderr)
    return 0
