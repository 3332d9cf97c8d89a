"""The four family commands on random full-size weights, in both formats: a check run by hand.

For each of ``openldm inpaint``, ``depth2img``, ``upscale`` and ``variations`` this writes one set of
seeded random weights of the published model's sizes twice, the way users have them: an original
single file (``.safetensors``, the reference's keys and prefixes, the extra components real files
carry: the MiDaS DPT-hybrid estimator as ``depth_model.*``, the x4 upscaler's ``low_scale_model``
buffers, unCLIP's ViT-H/14 image tower as ``embedder.model.visual.*`` and its ``noise_augmentor``)
with its reference yaml, and a diffusers folder (``depth_estimator/``, ``low_res_scheduler/``,
``image_encoder/``, ``image_normalizer/``...). Then it runs the command, as a user would, on each
(``python -m openldm <command> --ckpt ...``, a fresh process each) and reports its exit code, wall
time and output size, and the largest pixel difference between the two formats' images: the
weights are the same, so the images must agree (up to float rounding).

| command    | model (preset)  | input                  | output  | extra                     |
|------------|-----------------|------------------------|---------|---------------------------|
| inpaint    | sd2-inpaint     | 512x512 image + mask   | 512x512 |                           |
| depth2img  | sd2-depth       | 512x512 image          | 512x512 | depth from its own MiDaS  |
| upscale    | x4-upscaler     | 128x128 image          | 512x512 | noise level 20            |
| variations | sd21-unclip-h   | 512x512 image          | 768x768 | ViT-H/14 image tower      |

(``--only variations-l``: the same command on SD 2.1 unCLIP-L, OpenAI's ViT-L/14 image tower.)

The yamls are openldm's rendering of each model's reference config (``tests/oracles.py``), or the
reference's own files with ``--yaml-dir`` (a checkout's ``configs/stable-diffusion``:
v2-inpainting-inference.yaml, v2-midas-inference.yaml, x4-upscaling.yaml,
v2-1-stable-unclip-h-inference.yaml). Weights are stored in float16 (``--dtype float32`` for the
published files' precision); the commands run in float32 on the CPU.

Run: ``python bench/family_commands.py --out /tmp/family`` (needs diffusers and transformers, from
``pip install -e '.[test]'``; about 8 GB of memory, up to 10 GB of disk at a time (a model's files are
deleted after its runs unless ``--keep``), and 20-30 minutes on 2 CPU cores with the default 2 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peers  # noqa: F401  bench/peers.py: puts this checkout on sys.path before openldm's import
import torch
import yaml
from PIL import Image, ImageDraw

from openldm.checkpoints.formats.clip_vision import vision_from_transformers
from openldm.checkpoints.formats.midas import midas_from_transformers
from openldm.config import ModelSpec, preset
from openldm.nn.clip_vision import VisionConfig
from openldm.nn.midas import MiDaSConfig
from openldm.pipelines.image_embedding import cosine_alphas_cumprod
from tests.oracles import (
    Oracles,
    dpt_hybrid_config,
    randomize_,
    reference_yaml,
    single_file_state_dict,
    text_oracle,
    unet_oracle,
    vae_oracle,
    vision_oracle,
    write_diffusers_folder,
    write_single_file,
    write_unclip_extras,
)
from tests.tiny import TINY  # noqa: I001  (after peers)

StateDict = dict[str, torch.Tensor]
PROMPT = "a photograph of a red brick house by a lake"


@dataclass(frozen=True)
class Case:
    command: str
    preset: str
    variant: str  # key of tests.oracles.PIPELINES
    reference_yaml: str  # its file name in the reference's configs/stable-diffusion
    input_size: int  # pixels per side of the input image
    vision: VisionConfig | None = None  # unCLIP's image tower


# OpenAI's CLIP ViT-L/14 image tower (SD 2.1 unCLIP-L); the default VisionConfig is OpenCLIP's ViT-H/14.
VIT_L = VisionConfig(
    width=1024, layers=24, heads=16, mlp_width=4096, patch_size=14, embed_dim=768, activation="quick_gelu"
)
CASES: dict[str, Case] = {
    "inpaint": Case("inpaint", "sd2-inpaint", "inpaint", "v2-inpainting-inference.yaml", 512),
    "depth2img": Case("depth2img", "sd2-depth", "depth", "v2-midas-inference.yaml", 512),
    "upscale": Case("upscale", "x4-upscaler", "x4-upscaler", "x4-upscaling.yaml", 128),
    "variations": Case(
        "variations", "sd21-unclip-h", "unclip", "v2-1-stable-unclip-h-inference.yaml", 512, VisionConfig()
    ),
    "variations-l": Case(
        "variations", "sd21-unclip-l", "unclip", "v2-1-stable-unclip-l-inference.yaml", 512, VIT_L
    ),
}
DEFAULT_CASES = ("inpaint", "depth2img", "upscale", "variations")


# --- inputs --------------------------------------------------------------------------------------


def picture(size: int) -> Image.Image:
    """A smooth gradient with a few shapes: something for the estimator and the encoders to see."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], size)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = size // 8
    draw.ellipse((s, s, 3 * s, 3 * s), fill=(200, 30, 30))
    draw.rectangle((4 * s, 5 * s, 7 * s, 7 * s), fill=(30, 60, 200))
    return image


def mask(size: int) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image


# --- the two formats -----------------------------------------------------------------------------


def _oracles(spec: ModelSpec) -> Oracles:
    return Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text))


# --tiny: the test suite's configurations (tests/tiny.py and the small towers of the pipeline tests).
TINY_MIDAS = MiDaSConfig(
    image_size=64, width=64, layers=4, heads=1, mlp_width=128, hooks=(2, 3), stem_width=32,
    stage_depths=(1, 1, 2), stage_widths=(128, 256, 512), features=32, num_classes=10,
)  # fmt: skip
TINY_VISION = VisionConfig(width=64, layers=2, heads=1, mlp_width=128, patch_size=8, image_size=32)


def _depth_extras(folder: Path, tiny: bool) -> StateDict:
    """A random DPT-hybrid in the diffusers folder; the same weights as ``depth_model.*``."""
    import transformers

    config = dpt_hybrid_config(TINY_MIDAS, 64) if tiny else dpt_hybrid_config(MiDaSConfig(), 384)
    dpt = randomize_(transformers.DPTForDepthEstimation(config), 3)
    shutil.rmtree(folder / "depth_estimator", ignore_errors=True)
    dpt.save_pretrained(folder / "depth_estimator")
    return {f"depth_model.{k}": v for k, v in midas_from_transformers(dpt.state_dict()).items()}


def _upscale_extras() -> StateDict:
    """The reference's low_scale_model buffers: betas 1e-4..0.02 linear in sqrt space, 1000 levels."""
    betas = torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    return {
        "low_scale_model.betas": betas.float(),
        "low_scale_model.alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
    }


def _unclip_extras(folder: Path, spec: ModelSpec, tiny: bool, vision: VisionConfig) -> StateDict:
    """A random image tower and embedding statistics in the folder; the same as embedder / noise_augmentor."""
    vision = dataclasses.replace(TINY_VISION if tiny else vision, embed_dim=spec.unet.adm_in_channels // 2)
    encoder = vision_oracle(vision)
    gen = torch.Generator().manual_seed(3)
    mean = 0.3 * torch.randn(1, vision.embed_dim, generator=gen)
    std = 0.5 + torch.rand(1, vision.embed_dim, generator=gen)
    for name in ("image_encoder", "image_normalizer"):
        shutil.rmtree(folder / name, ignore_errors=True)
    write_unclip_extras(folder, encoder, mean, std, vision.image_size)
    alphas = cosine_alphas_cumprod()
    sd = {f"embedder.model.visual.{k}": v for k, v in vision_from_transformers(encoder.state_dict()).items()}
    return sd | {
        "embedder.model.logit_scale": torch.tensor(4.6052),
        "noise_augmentor.data_mean": mean,
        "noise_augmentor.data_std": std,
        "noise_augmentor.alphas_cumprod": alphas.float(),
        "noise_augmentor.sqrt_alphas_cumprod": alphas.sqrt().float(),
    }


EXTRAS: dict[str, Callable[[Path, ModelSpec, bool, Case], StateDict]] = {
    "depth": lambda folder, spec, tiny, case: _depth_extras(folder, tiny),
    "x4-upscaler": lambda folder, spec, tiny, case: _upscale_extras(),
    "unclip": lambda folder, spec, tiny, case: _unclip_extras(
        folder, spec, tiny, case.vision or VisionConfig()
    ),
}
PLACEHOLDERS = ("depth_model.", "low_scale_model.", "embedder.", "noise_augmentor.")


def _cast_folder(folder: Path, dtype: torch.dtype) -> None:
    """Every network's weights file of the folder stored in ``dtype`` (floating tensors only); the
    embedding statistics (``image_normalizer``) stay float32, as the single file's do."""
    from safetensors.torch import load_file, save_file

    for path in folder.rglob("*.safetensors"):
        if path.parent.name == "image_normalizer":
            continue
        sd = load_file(path)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path)


def write_model(
    name: str, root: Path, dtype: torch.dtype, yaml_dir: Path | None, tiny: bool
) -> tuple[Path, Path, Path]:
    """(single file, yaml, diffusers folder) of ``name``'s model, the same random weights in both."""
    case = CASES[name]
    spec = TINY[case.variant] if tiny else preset(case.preset)
    oracles = _oracles(spec)
    folder = root / f"{name}-diffusers"
    write_diffusers_folder(folder, case.variant, spec, oracles, text_5x=False)
    sd = {
        k: v
        for k, v in single_file_state_dict(case.variant, spec, oracles).items()
        if not k.startswith(PLACEHOLDERS)
    }
    del oracles
    gc.collect()
    if case.variant in EXTRAS:
        sd |= EXTRAS[case.variant](folder, spec, tiny, case)
    _cast_folder(folder, dtype)
    single = root / f"{name}.safetensors"
    # Networks in ``dtype``; the noise schedules and embedding statistics stay float32 (in float16
    # alphas_cumprod near 1 rounds to 1, as the folder's schedule, computed from its config, does not).
    kept = ("low_scale_model.", "noise_augmentor.")
    cast = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(kept) else v for k, v in sd.items()}
    write_single_file(single, cast)
    config = root / case.reference_yaml
    if yaml_dir is not None:
        shutil.copyfile(yaml_dir / case.reference_yaml, config)
    else:
        config.write_text(yaml.safe_dump(reference_yaml(spec), sort_keys=False), encoding="utf-8")
    return single, config, folder


# --- the runs ------------------------------------------------------------------------------------


def command_line(
    name: str, ckpt: Path, config: Path | None, inputs: Path, out: Path, steps: int, size: int
) -> list[str]:
    argv = [sys.executable, "-m", "openldm", name, "--ckpt", str(ckpt), "--outdir", str(out)]
    argv += ["--init-img", str(inputs / "init.png"), "--steps", str(steps), "--n_samples", "1", "--seed", "0"]
    argv += ["--skip_grid", "--prompt", PROMPT]
    if config is not None:
        argv += ["--config", str(config)]
    if name == "inpaint":
        argv += ["--mask", str(inputs / "mask.png")]
    if name == "depth2img":
        argv += ["--strength", "1.0"]
    if name == "variations":  # the model's own size (a tiny diffusers folder does not state it)
        argv += ["--H", str(size), "--W", str(size)]
    return argv


def run(argv: list[str], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    images = sorted(out.rglob("*.png"))
    result: dict[str, Any] = {"exit": done.returncode, "seconds": round(seconds, 1), "images": len(images)}
    if images:
        result["size"] = "x".join(map(str, Image.open(images[0]).size))
    if done.returncode:
        result["error"] = done.stderr.strip().splitlines()[-3:]
    return result


def _pixels(folder: Path) -> np.ndarray | None:
    images = sorted(folder.rglob("*.png"))
    return np.asarray(Image.open(images[0]), dtype=np.int16) if images else None


def check(
    name: str, root: Path, steps: int, dtype: torch.dtype, yaml_dir: Path | None, tiny: bool
) -> dict[str, Any]:
    """Write ``name``'s model in both formats, run the command on each, compare the images."""
    inputs = root / "inputs" / name
    inputs.mkdir(parents=True, exist_ok=True)
    size = CASES[name].input_size // 8 if tiny else CASES[name].input_size
    picture(size).save(inputs / "init.png")
    mask(size).save(inputs / "mask.png")
    start = time.perf_counter()
    single, config, folder = write_model(name, root, dtype, yaml_dir, tiny)
    written = time.perf_counter() - start
    gb = (single.stat().st_size + sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())) / 1e9
    report: dict[str, Any] = {"write seconds": round(written, 1), "GB on disk": round(gb, 2)}
    runs = {"single file + yaml": (single, config), "diffusers folder": (folder, None)}
    for label, (ckpt, yaml_path) in runs.items():
        out = root / "outputs" / name / label.split()[0]
        shutil.rmtree(out, ignore_errors=True)
        output_size = 64 if tiny else 768
        argv = command_line(CASES[name].command, ckpt, yaml_path, inputs, out, steps, output_size)
        report[label] = run(argv, out)
        print(f"{name} / {label}: {report[label]}", flush=True)
    a, b = (_pixels(root / "outputs" / name / key) for key in ("single", "diffusers"))
    if a is not None and b is not None and a.shape == b.shape:
        report["max pixel difference (0-255)"] = int(np.abs(a - b).max())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (weights, inputs, outputs)")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_CASES),
        help=f"models to check, of {', '.join(CASES)} (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per run (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored weights")
    parser.add_argument("--yaml-dir", type=Path, help="the reference's configs/stable-diffusion folder")
    parser.add_argument("--keep", action="store_true", help="keep each model's files after its runs")
    parser.add_argument(
        "--tiny", action="store_true", help="the tests' tiny configurations: checks the script"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    results: dict[str, Any] = {}
    for name in names:
        results[name] = check(
            name, args.out, args.steps, getattr(torch, args.dtype), args.yaml_dir, args.tiny
        )
        if not args.keep:
            (args.out / f"{name}.safetensors").unlink()
            shutil.rmtree(args.out / f"{name}-diffusers")
        (args.out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0 if all(r[k]["exit"] == 0 for r in results.values() for k in r if isinstance(r[k], dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
