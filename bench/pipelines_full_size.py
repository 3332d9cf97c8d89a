"""Seconds per denoising step of every pipeline of the family at full size: openldm against diffusers.

Each pipeline is built with random weights from openldm's preset (the same seeded tensors for both
tools: diffusers gets them through openldm's key maps, see ``bench/peers.py``) and run once per tool,
each run in a fresh subprocess, one after the other: fp32 (or ``--dtype bfloat16``) on the CPU,
batch 1, classifier-free guidance 7.5 (two UNet evaluations per step), DDIM in both, the same seed.

| pipeline       | preset        | size       | inputs                                        |
|----------------|---------------|------------|-----------------------------------------------|
| txt2img-sd15   | sd15          | 512        | prompt                                        |
| txt2img-sd21-v | sd2-v         | 768        | prompt                                        |
| inpaint        | sd2-inpaint   | 512        | image + mask, strength 1                      |
| depth2img      | sd2-depth     | 512        | image + depth map (no estimator), strength 1  |
| upscale-x4     | x4-upscaler   | 128 -> 512 | low-res image, noise level 20                 |
| unclip         | sd21-unclip-h | 768        | CLIP image embedding given, noise level 0     |
| controlnet-sd15| sd15 + ControlNet | 512    | prompt + control image (a ControlNet of SD 1.5's size) |

Method: a run has ``--warmup`` + ``--steps`` steps (default 1 + 3). Both tools call back after every
step; a step's time is the time from the previous step's callback to its own, so the warm-up step
(first-call costs) and everything outside the loop (prompt and image encoding, no decoding:
``output_type="latent"``) are left out. Reported: the median step time of each tool and their ratio;
the whole call's time; the RSS once the networks are loaded and the peak RSS during the call (VmHWM
reset just before the call). The final latents of the two tools are compared as a check that both did
the same work (relative max difference: about 1e-5 in fp32; about 1e-2 in bfloat16, where diffusers
keeps the latents in bfloat16 and openldm in fp32).

The UNet of unCLIP is timed with the image embedding given (both pipelines accept one): the CLIP
image tower runs once per call, not per step, and is not built.

Run: ``python bench/pipelines_full_size.py`` (``--help`` for the options); ``--tiny`` runs the tiny
test configurations (tests/tiny.py, 64 pixels), about a minute on an idle machine, to check the script.
At full size it needs about 6-8 GB of memory and, on 2 CPU cores, roughly 20 to 40 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import peers  # bench/peers.py, next to this file; it puts the checkout on sys.path before openldm's import
import torch
from PIL import Image
from torch import nn

from openldm.config import ModelSpec, preset

TOOLS = ("openldm", "diffusers")
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
SEED = 0
TINY_SIZE = 64
# The published x4 upscaler's low_res_scheduler config.
LOW_RES_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
LOW_RES_SCHEDULER |= {"num_train_timesteps": 1000, "clip_sample": True, "variance_type": "fixed_small"}


@dataclass(frozen=True)
class Case:
    preset: str
    tiny: str  # key of tests.tiny.TINY
    upscale: int = 1  # output size / input size


CASES: dict[str, Case] = {
    "txt2img-sd15": Case("sd15", "sd1"),
    "txt2img-sd21-v": Case("sd2-v", "sd2-v"),
    "inpaint": Case("sd2-inpaint", "inpaint"),
    "depth2img": Case("sd2-depth", "depth"),
    "upscale-x4": Case("x4-upscaler", "x4-upscaler", upscale=4),
    "unclip": Case("sd21-unclip-h", "unclip"),
    "controlnet-sd15": Case("sd15", "sd1"),
}


# --- the same random weights for both tools ------------------------------------------------------


def _norm_weights(net: nn.Module) -> set[str]:
    norms = (nn.GroupNorm, nn.LayerNorm)
    return {f"{n}.weight" if n else "weight" for n, m in net.named_modules() if isinstance(m, norms)}


def _embedding_weights(net: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.Embedding)}


def random_state_dict(net: nn.Module, gen: torch.Generator, dtype: torch.dtype) -> peers.StateDict:
    """Seeded random tensors for ``net`` (built on meta), scaled to keep activations O(1).

    Norm scales 1 + noise/10; other vectors noise/10; embeddings noise/2; weights noise / sqrt(fan-in).
    """
    norms, embeddings = _norm_weights(net), _embedding_weights(net)
    out: peers.StateDict = {}
    for key, meta in sorted(net.state_dict().items()):
        noise = torch.randn(meta.shape, generator=gen)
        if key in norms:
            noise = 1.0 + 0.1 * noise
        elif meta.ndim == 1:
            noise *= 0.1
        elif key in embeddings:
            noise *= 0.5
        else:
            noise *= meta[0].numel() ** -0.5
        out[key] = noise.to(dtype)
    return out


def random_weights(spec: ModelSpec, dtype: torch.dtype) -> tuple[peers.StateDict, ...]:
    """(unet, vae, text) state dicts in openldm's layout, the same on every call."""
    from openldm.nn.clip import CLIPTextEncoder
    from openldm.nn.unet import UNetModel
    from openldm.nn.vae import AutoencoderKL

    gen = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):
        nets = (UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextEncoder(spec.text))
    return tuple(random_state_dict(net, gen, dtype) for net in nets)


def controlnet_weights(spec: ModelSpec, dtype: torch.dtype) -> peers.StateDict:
    """A ControlNet of the UNet's size in openldm's (the original) layout, the same on every call."""
    from openldm.nn.controlnet import ControlNetModel

    with torch.device("meta"):
        net = ControlNetModel(spec.unet)
    return random_state_dict(net, torch.Generator().manual_seed(SEED + 1), dtype)


# --- inputs --------------------------------------------------------------------------------------


def picture(size: int) -> Image.Image:
    """A smooth image with some structure."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def mask(size: int) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 255
    return Image.fromarray(m)


def depth_map(size: int) -> np.ndarray:
    """[1, H, W]: a slanted floor with a bump."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    bump = 20.0 * np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size * size / 20))
    return (10.0 + 30.0 * y / size + bump)[None].astype(np.float32)


def embedding_parts(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embedding [1, D], mean [1, D], std [1, D]) for unCLIP, seeded."""
    assert spec.unet.adm_in_channels is not None
    dim = spec.unet.adm_in_channels // 2  # the UNet reads the embedding and its noise-level embedding
    gen = torch.Generator().manual_seed(SEED + 1)
    embeds = torch.randn(1, dim, generator=gen)
    return embeds, 0.3 * torch.randn(1, dim, generator=gen), 0.5 + torch.rand(1, dim, generator=gen)


# --- one run of each tool ------------------------------------------------------------------------


def _ours_model(spec: ModelSpec, weights: tuple[peers.StateDict, ...]) -> Any:
    from openldm.model import StableDiffusion
    from openldm.nn.clip import CLIPTextEncoder
    from openldm.nn.unet import UNetModel
    from openldm.nn.vae import AutoencoderKL
    from openldm.nn.winograd import winograd_for
    from openldm.tokenizer import CLIPTokenizer

    nets = []
    for cls, config, sd in zip(
        (UNetModel, AutoencoderKL, CLIPTextEncoder), (spec.unet, spec.vae, spec.text), weights, strict=True
    ):
        with torch.device("meta"):
            net = cls(config)
        net.load_state_dict(sd, strict=True, assign=True)
        nets.append(net.eval().requires_grad_(False))
    # As openldm.load: Winograd for the UNet and VAE within half the free memory.
    winograd_for(nets[0], torch.device("cpu"), shared_with=(nets[1],))
    return StableDiffusion(spec, *nets, tokenizer=CLIPTokenizer.for_config(spec.text))


def _ours_embedder(spec: ModelSpec) -> Any:
    """An image embedder whose tower is a stub: the embedding is given, only its noising runs."""
    from openldm.nn.clip_vision import CLIPVisionEncoder, VisionConfig
    from openldm.pipelines.image_embedding import ImageEmbedder, cosine_alphas_cumprod

    _, mean, std = embedding_parts(spec)
    stub = VisionConfig(width=32, layers=1, heads=1, mlp_width=32, patch_size=16, image_size=32)
    stub = replace(stub, embed_dim=mean.shape[1])
    return ImageEmbedder(CLIPVisionEncoder(stub).eval(), mean, std, cosine_alphas_cumprod())


def prepare_openldm(name: str, spec: ModelSpec, size: int, dtype: torch.dtype) -> Callable[..., Any]:
    """``run(steps, callback) -> latents`` for openldm's pipeline ``name``."""
    model = _ours_model(spec, random_weights(spec, dtype))
    common = {"steps": 0, "guidance_scale": GUIDANCE, "sampler": "ddim", "seed": SEED}
    common |= {"output_type": "latent", "progress": False}
    embedder = _ours_embedder(spec) if name == "unclip" else None
    if name.startswith("controlnet"):
        from openldm.checkpoints.build import computed_like
        from openldm.nn.controlnet import ControlNetModel
        from openldm.pipelines.options import Control

        with torch.device("meta"):
            net = ControlNetModel(spec.unet)
        net.load_state_dict(controlnet_weights(spec, dtype), strict=True, assign=True)
        net = computed_like(net.eval().requires_grad_(False), model.unet)  # as read_controlnet does
        common["controls"] = (Control(net, picture(size)),)

    def run(steps: int, callback: Callable[..., Any]) -> torch.Tensor:
        options = {**common, "steps": steps, "callback": callback}
        if name.startswith(("txt2img", "controlnet")):
            out = model.txt2img(PROMPT, NEGATIVE, width=size, height=size, **options)
        elif name == "inpaint":
            out = model.inpaint(PROMPT, picture(size), mask(size), NEGATIVE, strength=1.0, **options)
        elif name == "depth2img":
            depth = depth_map(size)
            out = model.depth2img(PROMPT, picture(size), NEGATIVE, depth_map=depth, strength=1.0, **options)
        elif name == "upscale-x4":
            out = model.upscale(PROMPT, picture(size // 4), NEGATIVE, noise_level=20, **options)
        else:
            embeds = embedding_parts(spec)[0]
            out = model.variations(
                None,
                PROMPT,
                NEGATIVE,
                image_embeds=embeds,
                embedder=embedder,
                noise_level=0,
                width=size,
                height=size,
                **options,
            )
        return out.latents

    return run


def _diffusers_pipeline(name: str, spec: ModelSpec, dtype: torch.dtype, folder: Path) -> Any:
    import diffusers
    import transformers

    weights = random_weights(spec, dtype)
    parts = peers.sd_components(spec, *weights, folder=folder)
    del weights
    no_safety = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if name.startswith("txt2img"):
        pipe = diffusers.StableDiffusionPipeline(**parts, **no_safety)
    elif name.startswith("controlnet"):
        from openldm.checkpoints.formats.controlnet import controlnet_to_diffusers
        from openldm.checkpoints.formats.unet import unet_config_to_diffusers

        config = unet_config_to_diffusers(spec.unet)
        keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block")
        keys += ("cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention")
        theirs = controlnet_to_diffusers(controlnet_weights(spec, dtype), spec.unet)
        controlnet = peers._assigned(
            lambda: diffusers.ControlNetModel(**{k: config[k] for k in keys if k in config}),
            theirs,
            "ControlNet",
        )
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, **no_safety)
    elif name == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**parts, **no_safety)
    elif name == "depth2img":
        pipe = diffusers.StableDiffusionDepth2ImgPipeline(
            **parts, depth_estimator=None, feature_extractor=None
        )
    elif name == "upscale-x4":
        low_res = diffusers.DDPMScheduler(**LOW_RES_SCHEDULER)
        pipe = diffusers.StableDiffusionUpscalePipeline(
            **parts, low_res_scheduler=low_res, max_noise_level=350
        )
    else:
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
            StableUnCLIPImageNormalizer,
        )

        _, mean, std = embedding_parts(spec)
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=mean.shape[1])
        with torch.no_grad():
            normalizer.mean.copy_(mean)
            normalizer.std.copy_(std)
        # A stub image tower: the pipeline reads only its dtype when the embedding is given.
        stub = transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=32,
            patch_size=16,
            projection_dim=mean.shape[1],
        )
        pipe = diffusers.StableUnCLIPImg2ImgPipeline(
            feature_extractor=None,
            image_encoder=transformers.CLIPVisionModelWithProjection(stub),
            image_normalizer=normalizer,
            image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            **parts,
        )
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prepare_diffusers(
    name: str, spec: ModelSpec, size: int, dtype: torch.dtype, folder: Path
) -> Callable[..., Any]:
    """``run(steps, callback) -> latents`` for the diffusers pipeline matching ``name``."""
    pipe = _diffusers_pipeline(name, spec, dtype, folder)
    common = {"negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE, "output_type": "latent"}

    def run(steps: int, callback: Callable[..., Any]) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(SEED)
        options = {**common, "num_inference_steps": steps, "generator": generator}
        step_end = {"callback_on_step_end": callback}
        legacy = {"callback": callback, "callback_steps": 1}  # the pipelines without callback_on_step_end
        if name.startswith("txt2img"):
            out = pipe(PROMPT, height=size, width=size, **options, **step_end)
        elif name.startswith("controlnet"):
            out = pipe(PROMPT, picture(size), height=size, width=size, **options, **step_end)
        elif name == "inpaint":
            image, m = picture(size), mask(size)
            out = pipe(
                PROMPT,
                image=image,
                mask_image=m,
                height=size,
                width=size,
                strength=1.0,
                **options,
                **step_end,
            )
        elif name == "depth2img":
            depth = torch.from_numpy(depth_map(size))
            out = pipe(PROMPT, image=picture(size), depth_map=depth, strength=1.0, **options, **step_end)
        elif name == "upscale-x4":
            out = pipe(PROMPT, image=picture(size // 4), noise_level=20, **options, **legacy)
        else:
            embeds = embedding_parts(spec)[0].to(dtype)
            out = pipe(
                prompt=PROMPT,
                image_embeds=embeds,
                noise_level=0,
                height=size,
                width=size,
                **options,
                **legacy,
            )
        return out.images

    return run


def spec_and_size(name: str, tiny: bool) -> tuple[ModelSpec, int]:
    case = CASES[name]
    if not tiny:
        spec = preset(case.preset)
        return spec, spec.image_size
    from tests.tiny import TINY

    return TINY[case.tiny], TINY_SIZE


def worker(tool: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Build, run once (warm-up + timed steps), save the latents; the measurements as a dict."""
    peers.set_threads(options["threads"])
    dtype = getattr(torch, options["dtype"])
    spec, size = spec_and_size(name, options["tiny"])
    workdir = Path(options["workdir"])
    start = time.perf_counter()
    if tool == "openldm":
        run = prepare_openldm(name, spec, size, dtype)
    else:
        run = prepare_diffusers(name, spec, size, dtype, workdir / f"tokenizer-{name}")
    setup_s = time.perf_counter() - start
    rss = peers.rss_mb()
    reset = peers.reset_peak()
    clock = peers.StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        latents = run(options["warmup"] + options["steps"], clock.tick)
    call_s = time.perf_counter() - start
    torch.save(latents.detach().float().cpu(), workdir / f"{name}-{tool}.pt")
    return {
        "step_s": clock.step_seconds(options["warmup"]),
        "call_s": call_s,
        "setup_s": setup_s,
        "rss_mb": rss,
        "peak_mb": peers.peak_mb(),
        "peak_is_call": reset,
        "size": size,
        "threads": torch.get_num_threads(),
    }


# --- the driver ----------------------------------------------------------------------------------


def run_worker(tool: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, "--case", name, "--options", json.dumps(options)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=peers.quiet_environment(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latent_difference(workdir: Path, name: str) -> float:
    ours = torch.load(workdir / f"{name}-openldm.pt")
    theirs = torch.load(workdir / f"{name}-diffusers.pt")
    if ours.shape != theirs.shape:
        return float("nan")
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))


def _size_label(name: str, size: int) -> str:
    return f"{size // 4} -> {size}" if CASES[name].upscale == 4 else str(size)


def report(results: dict[str, dict[str, dict[str, Any]]], diffs: dict[str, float], options: dict) -> str:
    r0 = next(iter(next(iter(results.values())).values()))
    lines = [
        f"{options['dtype']}, CPU, {r0['threads']} threads, batch 1, CFG {GUIDANCE}, DDIM; "
        f"median of {options['steps']} steps after {options['warmup']} warm-up step(s)"
        + (" (tiny configurations)" if options["tiny"] else ""),
        "",
        "| pipeline | size | openldm s/step | diffusers s/step | ratio | openldm call s | diffusers call s "
        "| openldm RSS / peak GB | diffusers RSS / peak GB | latents rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_tool in results.items():
        ours, theirs = by_tool["openldm"], by_tool["diffusers"]
        a, b = statistics.median(ours["step_s"]), statistics.median(theirs["step_s"])
        mem = [f"{r['rss_mb'] / 1024:.2f} / {r['peak_mb'] / 1024:.2f}" for r in (ours, theirs)]
        lines.append(
            f"| {name} | {_size_label(name, ours['size'])} | {a:.3f} | {b:.3f} | {a / b:.2f} "
            f"| {ours['call_s']:.2f} | {theirs['call_s']:.2f} | {mem[0]} | {mem[1]} | {diffs[name]:.1e} |"
        )
    lines.append("")
    lines.append(
        "ratio: openldm / diffusers (below 1: openldm is faster). RSS once loaded; peak during the call"
    )
    if not all(r["peak_is_call"] for by_tool in results.values() for r in by_tool.values()):
        lines.append("(peak: the whole process's, /proc/self/clear_refs could not reset it)")
    steps = {n: {t: [round(s, 3) for s in r["step_s"]] for t, r in bt.items()} for n, bt in results.items()}
    lines.append(f"every timed step (s): {steps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipelines",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="which pipelines (default: all)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configurations (seconds)")
    parser.add_argument("--workdir", type=Path, help="where the runs put their files (default: /tmp)")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.case, json.loads(args.options))))
        return 0
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (a warm-up step's end starts the first timed step)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="openldm-bench-pipelines-", dir=args.workdir or "/tmp"))
    options = {
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "threads": args.threads,
        "tiny": args.tiny,
        "workdir": str(workdir),
    }
    try:
        results: dict[str, dict[str, dict[str, Any]]] = {}
        diffs: dict[str, float] = {}
        for name in args.pipelines:
            results[name] = {}
            for tool in TOOLS:
                start = time.perf_counter()
                r = run_worker(tool, name, options)
                results[name][tool] = r
                steps = ", ".join(f"{s:.3f}" for s in r["step_s"])
                took = time.perf_counter() - start
                print(
                    f"{name} {tool}: steps {steps} s; setup {r['setup_s']:.1f} s ({took:.0f} s)", flush=True
                )
            diffs[name] = latent_difference(workdir, name)
        print()
        print(report(results, diffs, options))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
