"""Teach the embedded model what it has never seen, with ``openldm finetune``, and measure it.

* A new shape kind: the **pillar**, an upright bar (``openldm.shapes.render.NEW_KINDS``; the dataset's
  rectangles all lie flat). 12 rendered pictures of single pillars, captioned as the dataset captions
  ("a red pillar in the top left corner on a white background"), taught by LoRA (UNet and text
  encoder) and by DreamBooth (the UNet's and the text encoder's own weights) with prior preservation
  off and on. The prior's
  class images are made by the base model from 32 captions of the dataset's kind (varied scenes).
* A new word for an existing colour: **zorp** for red, by textual inversion (starting from the vector
  of "shape"), from 12 pictures of red shapes captioned with "zorp" for "red".

Measured with the shapes evaluator (``openldm.shapes.evaluate``) on images of fixed seeds, 25 DDIM
steps, guidance 7.5: the pillar scenes' kind accuracy (kinds told among the dataset's four and the
pillar), the zorp scenes' colour accuracy, and the seen and held-out scores of ``openldm eval``
(seen: mean of colour, kind, position and count accuracy; held-out: of colour and kind), before
training, after N steps and after 2N steps (the run resumed: a concept learned at N must still be
there at 2N), for each seed.

Run: ``python bench/finetune_concepts.py [--seeds 0 1 2] [--steps 100] [--eval 32]`` (about 20
minutes on 2 cores with the defaults); it prints the commands it runs and a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import peers  # noqa: F401  (bench/peers.py: puts this checkout on sys.path)
import torch

import openldm
from openldm.cli import main as openldm_main
from openldm.shapes.captions import explicit_caption
from openldm.shapes.dataset import HELD_OUT, ShapesDataset, evaluation_scenes
from openldm.shapes.evaluate import evaluate
from openldm.shapes.render import ALL_KINDS, BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, Scene, ShapeObject
from openldm.shapes.render import render as render_scene

STEPS, GUIDANCE = 25, 7.5
METHODS = {
    "lora": ["--method", "lora", "--rank", "8", "--text-encoder", "--lr", "1e-3"],
    "dreambooth, prior off": [
        "--method",
        "dreambooth",
        "--text-encoder",
        "--lr",
        "1e-4",
        "--prior-weight",
        "0",
    ],
    "dreambooth, prior on": [
        "--method",
        "dreambooth",
        "--text-encoder",
        "--lr",
        "1e-4",
        "--class-prompt",
        "a shape",
    ],
    "textual inversion": ["--method", "textual-inversion", "--word", "zorp", "--init-word", "shape"],
}


def _scene(rng: np.random.Generator, kind: str, colour: str | None = None) -> Scene:
    colour = colour or str(rng.choice(COLOURS))
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    obj = ShapeObject(kind, colour, str(rng.choice(list(SIZES))), str(rng.choice(POSITIONS)))
    return Scene(background, (obj,))


def pillar_scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [_scene(rng, "pillar") for _ in range(n)]


def zorp_scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS if ("red", k) not in HELD_OUT]
    return [_scene(rng, str(rng.choice(kinds)), "red") for _ in range(n)]


def zorp_caption(scene: Scene) -> str:
    return explicit_caption(scene).replace("red ", "zorp ")


def write_folder(folder: Path, scenes: list[Scene], caption) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        render_scene(scene, 64).image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(caption(scene) + "\n")
    return folder


def generate(model, captions: list[str], seed: int) -> list:
    images = []
    for start in range(0, len(captions), 16):
        batch = captions[start : start + 16]
        result = model.txt2img(
            batch, steps=STEPS, guidance_scale=GUIDANCE, sampler="ddim", seed=seed + start, progress=False
        )
        images.extend(result.images)
    return images


def measure(model, n: int) -> dict[str, float]:
    """The four scores of one model, in percent."""
    pillars = pillar_scenes(2000, n)
    zorps = zorp_scenes(3000, n)
    out = {
        "pillar kind": evaluate(
            generate(model, [explicit_caption(s) for s in pillars], 1), pillars, ALL_KINDS
        )["kind"],
        "zorp colour": evaluate(generate(model, [zorp_caption(s) for s in zorps], 2), zorps)["colour"],
    }
    for name, held_out, attributes in (
        ("seen", False, ("colour", "kind", "position", "count")),
        ("held-out", True, ("colour", "kind")),
    ):
        pairs = evaluation_scenes(0, n, held_out_only=held_out)
        result = evaluate(generate(model, [c for c, _ in pairs], 3), [s for _, s in pairs])
        out[name] = statistics.mean(result[a] for a in attributes)
    return {k: 100 * v for k, v in out.items()}


def class_images(model, folder: Path, n: int) -> Path:
    """The prior's class images: what the base model makes of ``n`` dataset captions."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(seed=7)
    captions = [dataset[i].caption for i in range(n)]
    for index, image in enumerate(generate(model, captions, 5)):
        image.save(folder / f"class-{index:04d}.png")
        (folder / f"class-{index:04d}.txt").write_text(captions[index] + "\n")
    return folder


def adapted(method: str, out: Path):
    model = openldm.load()
    if method == "lora":
        model.load_lora(out / "lora.safetensors")
    elif method == "textual inversion":
        model.load_embedding(out / "zorp.safetensors")
    else:
        model = openldm.load(out / "model.safetensors")
    return model


def run(argv: list[str]) -> float:
    print("  openldm " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if openldm_main(argv) != 0:
        raise RuntimeError("openldm finetune failed")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/openldm-concepts", help="folder for data and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="N: measured after N and 2N steps")
    parser.add_argument("--eval", type=int, default=32, help="images per evaluation set")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.work)
    pillars = write_folder(work / "pillar", pillar_scenes(1000, 12), explicit_caption)
    zorps = write_folder(work / "zorp", zorp_scenes(1001, 12), zorp_caption)
    base = openldm.load()
    classes = work / "class-images"
    if not classes.is_dir():
        class_images(base, classes, 32)
    rows: dict[str, dict[str, float]] = {"base model": measure(base, args.eval)}
    print("base model", rows["base model"], flush=True)
    del base
    times: dict[str, list[float]] = {}
    for method in args.methods:
        for seed in args.seeds:
            out = work / f"{method.replace(', ', '-').replace(' ', '-')}-{seed}"
            data = zorps if method == "textual inversion" else pillars
            common = [
                "finetune",
                *METHODS[method],
                "--data",
                str(data),
                "--out",
                str(out),
                "--resolution",
                "64",
            ]
            common += ["--batch-size", "4", "--seed", str(seed), "--checkpoint-every", str(args.steps)]
            if "--class-prompt" in METHODS[method]:
                common += ["--class-data", str(classes), "--class-images", "32"]
            for steps in (args.steps, 2 * args.steps):
                resume = ["--resume"] if steps > args.steps else []
                seconds = run([*common, "--steps", str(steps), *resume])
                times.setdefault(method, []).append(seconds)
                name = f"{method}, seed {seed}, step {steps}"
                rows[name] = measure(adapted(method, out), args.eval)
                print(name, rows[name], flush=True)
    columns = list(rows["base model"])
    print("\n| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    print()
    for method, seconds in times.items():
        print(f"{method}: {statistics.mean(seconds[::2]):.0f} s for {args.steps} steps (mean over seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
