"""The embedded model's ControlNet: shapes placed by their outlines (``openldm train --stage controlnet``).

Trained as the ControlNet paper trains one: the UNet, VAE and text encoder frozen; the ControlNet's
encoder starts as a copy of the UNet's (time embedding, input and middle blocks), its zero convolutions
and the hint block's last convolution at zero, so at step 0 the model computes exactly what the base
does. The control image of a training picture is :func:`openldm.control_images.canny` of it (the shapes'
outlines, white on black), so at sampling time the same preprocessor turns a user's drawing or photo
into a control image (``--control-preprocess canny``), or a drawn outline is the control image itself.
Captions: the dataset's, half of them with every position phrase left out (the outline says where),
10% dropped for guidance. The images are encoded once (posterior mean and log-variance), as the
diffusion stage does.

The export is the ControlNet alone in the original layout (``control_model.*``, fp16), which
``model.load_controlnet`` reads and ``openldm txt2img --control-image`` uses with the embedded model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openldm.control_images import canny
from openldm.files import replaced_when_done
from openldm.images import pil_to_tensor
from openldm.nn.controlnet import ControlNetModel
from openldm.sampling.schedule import NoiseSchedule
from openldm.shapes.captions import POSITION_PHRASES
from openldm.shapes.dataset import ShapesDataset
from openldm.train.data import STREAM_BATCH, STREAM_DROPOUT, STREAM_NOISE, STREAM_POSTERIOR, step_generator
from openldm.train.loop import LoopConfig, Part, load_ema_weights, train_loop
from openldm.train.losses import diffusion_loss

DROP_POSITIONS = 0.5
CAPTION_DROPOUT = 0.1


@dataclass(frozen=True)
class ControlRecipe:
    images: int = 4096
    batch_size: int = 8
    seed: int = 11
    loop: LoopConfig = LoopConfig(
        steps=6000, lr=1e-3, warmup_steps=100, ema_decay=0.995, checkpoint_every=250, log_every=25, minutes=30
    )


def outline(image) -> torch.Tensor:
    """The control image of a picture: its canny edges, ``[3, H, W]`` in [0, 1]."""
    return pil_to_tensor(canny(image))[0].add(1).div(2)


def without_positions(caption: str) -> str:
    phrases = sorted((p for ps in POSITION_PHRASES.values() for p in ps), key=len, reverse=True)
    for phrase in phrases:
        caption = caption.replace(" " + phrase, "")
    return caption


def controlnet_from_unet(unet: nn.Module) -> ControlNetModel:
    """A ControlNet whose encoder is a copy of ``unet``'s and whose outputs start at zero."""
    net = ControlNetModel(unet.config)
    own = net.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(copied, strict=False)  # the rest (hint block, zero convs) is the ControlNet's own
    with torch.no_grad():
        for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], net.input_hint_block[-1]]:
            conv.weight.zero_()
            conv.bias.zero_()
    missing = set(own) - set(copied)
    assert all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in missing)
    return net


@dataclass
class ControlCache:
    mean: torch.Tensor
    logvar: torch.Tensor
    hints: torch.Tensor  # [N, 3, H, W] in [0, 1]
    captions: list[str]


def build_cache(model, recipe: ControlRecipe) -> ControlCache:
    dataset = ShapesDataset(seed=recipe.seed, length=recipe.images, dense_fraction=0.0, recolour_fraction=0.0)
    means, logvars, hints, captions = [], [], [], []
    rng = np.random.default_rng(recipe.seed)
    with torch.inference_mode():
        for start in range(0, recipe.images, 64):
            samples = [dataset[i] for i in range(start, min(start + 64, recipe.images))]
            pixels = torch.cat([pil_to_tensor(s.image) for s in samples])
            posterior = model.vae.encode(pixels)
            means.append(posterior.mean.float())
            logvars.append(posterior.logvar.float())
            hints.append(torch.stack([outline(s.image) for s in samples]))
            for s in samples:
                captions.append(without_positions(s.caption) if rng.random() < DROP_POSITIONS else s.caption)
    return ControlCache(torch.cat(means), torch.cat(logvars), torch.cat(hints), captions)


class _Controlled(nn.Module):
    """The frozen UNet with the ControlNet's residuals, for one batch's hints."""

    def __init__(self, unet: nn.Module, controlnet: ControlNetModel) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.hint: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        assert self.hint is not None
        return self.unet(x, t, context=context, control=self.controlnet(x, t, self.hint, context))


def train_controlnet(
    model, out: Path, recipe: ControlRecipe, resume: bool, progress: bool
) -> dict[str, object]:
    """Train a ControlNet for ``model`` (frozen) in ``out``; the run's times and last loss."""
    start = time.perf_counter()
    cache = build_cache(model, recipe)
    encode_seconds = time.perf_counter() - start
    controlnet = controlnet_from_unet(model.unet).requires_grad_(True)
    controlled = _Controlled(model.unet, controlnet)
    schedule = NoiseSchedule(model.spec.schedule)
    scale = model.spec.vae.scale_factor
    tokenizer = model.tokenizer

    def loss_fn(step: int, part: Part) -> tuple[torch.Tensor, dict[str, float]]:
        batch = recipe.batch_size
        picks = torch.randint(
            0, len(cache.captions), (batch,), generator=step_generator(recipe.seed, STREAM_BATCH, step)
        )
        g = step_generator(recipe.seed, STREAM_POSTERIOR, step)
        mean, std = cache.mean[picks], (0.5 * cache.logvar[picks]).exp()
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        dropped = (
            torch.rand(batch, generator=step_generator(recipe.seed, STREAM_DROPOUT, step)) < CAPTION_DROPOUT
        )
        rows = part.rows(batch)
        texts = [
            "" if d else cache.captions[int(i)] for i, d in zip(picks.tolist(), dropped.tolist(), strict=True)
        ]
        ids = torch.tensor([tokenizer.window(tokenizer.encode(t)) for t in texts[rows]])
        with torch.no_grad():
            context = model.text_encoder(ids)
        controlled.hint = cache.hints[picks][rows]
        loss = diffusion_loss(
            controlled, schedule, x0, context, model.spec.prediction_type,
            step_generator(recipe.seed, STREAM_NOISE, step), 5.0, rows=rows,
        )  # fmt: skip
        return loss, {}

    result = train_loop(
        controlnet, loss_fn, recipe.loop, out, resume=resume, desc="controlnet", progress=progress
    )
    return {
        "encode_seconds": round(encode_seconds, 1),
        "train_seconds": round(result.seconds, 1),
        "steps": result.step,
        "finished": result.finished,
        "loss": result.loss,
    }


def export_controlnet(unet_config, out: Path, path: Path) -> int:
    """The EMA weights of the run in ``out`` as an original-layout fp16 file; returns its size."""
    from safetensors.torch import save_file

    net = ControlNetModel(unet_config)
    load_ema_weights(out, net)
    sd = {
        f"control_model.{k}": v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()
    }
    with replaced_when_done(path) as temporary:
        save_file(sd, str(temporary), metadata={"openldm.controlnet": "embedded, canny outlines"})
    return path.stat().st_size


def run_controlnet_command(args) -> dict[str, object]:
    import openldm

    recipe = ControlRecipe()
    if args.steps is not None:
        warmup = min(recipe.loop.warmup_steps, args.steps // 10)
        recipe = replace(recipe, loop=replace(recipe.loop, steps=args.steps, warmup_steps=warmup))
    if args.minutes is not None:
        recipe = replace(recipe, loop=replace(recipe.loop, minutes=args.minutes))
    out = Path(args.out)
    model = openldm.load()
    report = train_controlnet(model, out, recipe, args.resume, not args.no_progress)
    export = None if args.export == "none" else Path(args.export or out / "embedded-controlnet.safetensors")
    if export is not None:
        report["export_bytes"] = export_controlnet(model.unet.config, out, export)
        report["export"] = str(export)
        report["evaluation"] = evaluate_controlnet(model, model.load_controlnet(export))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def evaluate_controlnet(
    model, network: ControlNetModel, n: int = 64, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Evaluation scenes drawn with and without the ControlNet (its control image: the scene's outline),
    prompted with the scene's explicit caption and with that caption's positions left out; accuracies
    of :func:`openldm.shapes.evaluate.evaluate` against the control's scene."""
    from openldm.pipelines.options import Control
    from openldm.shapes.dataset import evaluation_scenes
    from openldm.shapes.evaluate import evaluate
    from openldm.shapes.render import render

    pairs = evaluation_scenes(seed, n, held_out_only=False)
    scenes = [scene for _, scene in pairs]
    hints = [outline(render(scene, 64).image) for scene in scenes]
    rows: dict[str, dict[str, float]] = {}
    for prompt_kind in ("caption", "caption without positions"):
        captions = [c if prompt_kind == "caption" else without_positions(c) for c, _ in pairs]
        for use in (False, True):
            images = []
            for i, (caption, hint) in enumerate(zip(captions, hints, strict=True)):
                controls = [Control(network, hint)] if use else []
                result = model.txt2img(caption, steps=25, seed=seed + i, progress=False, controls=controls)
                images.extend(result.images)
            name = f"{prompt_kind}, {'with' if use else 'without'} ControlNet"
            rows[name] = {k: round(100 * v, 1) for k, v in evaluate(images, scenes).items() if k != "images"}
    return rows
