"""``openldm finetune``: adapt a loaded model to the user's images (``--method full``, ``lora``,
``dreambooth`` or ``textual-inversion``; what each trains and writes: :mod:`openldm.train.finetune_methods`).

The data (:mod:`openldm.train.captioned`) is read and checked before anything else, each image
encoded once by the frozen VAE at its bucket's size (its posterior kept: a new sample each step).
Training runs in :func:`openldm.train.loop.train_loop` (AdamW, linear warm-up then a constant learning
rate, gradient clipping, optional EMA, gradient accumulation, mixed precision, checkpoints and
``resume``, several processes under torchrun) on the model's own objective (eps or v), with caption
dropout, optional min-SNR weighting and offset noise. Every random draw of step ``k`` comes from a
generator fixed by (seed, k), so a resumed run ends with the weights of an uninterrupted one.
DreamBooth adds the prior-preservation loss on class images the base model made (:mod:`openldm.train.prior`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openldm.images import save_png
from openldm.sampling.schedule import NoiseSchedule
from openldm.train.captioned import OnProblem, bucketed, fit, read_captioned
from openldm.train.data import (
    STREAM_BATCH,
    STREAM_DROPOUT,
    STREAM_NOISE,
    STREAM_POSTERIOR,
    STREAM_PRIOR_BATCH,
    STREAM_PRIOR_NOISE,
    STREAM_PRIOR_POSTERIOR,
    dropout_mask,
    step_generator,
)
from openldm.train.distributed import ALONE, Ranks
from openldm.train.ema import EMA
from openldm.train.finetune_methods import Method, Trained, prepare
from openldm.train.loop import LoopConfig, MixedPrecision, Part, train_loop
from openldm.train.losses import diffusion_loss
from openldm.train.prior import make_class_images

# What the usual recipes start from: kohya's LoRA 1e-4, the web UI's textual inversion 5e-3, and
# DreamBooth's and fine-tuning's 5e-6 (all the weights move, so much more slowly).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-4,
    "textual-inversion": 5e-3,
    "full": 5e-6,
    "dreambooth": 5e-6,
}


@dataclass(frozen=True)
class FinetuneConfig:
    data: str
    out: str
    method: Method = "lora"
    steps: int = 500
    batch_size: int = 1  # images per optimizer step, over all processes and accumulation rounds
    accumulate: int = 1
    learning_rate: float | None = None  # None: the method's (DEFAULT_LEARNING_RATES)
    warmup: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float | None = None
    rank: int = 16
    alpha: float | None = None
    text_encoder: bool = False
    resolution: int = 512
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "no"
    seed: int = 0
    on_problem: OnProblem = "skip"
    word: str | None = None  # textual inversion: the new word, written in the captions
    init_word: str = ""  # ... and the word whose vectors it starts from
    vectors: int = 1
    class_prompt: str | None = None  # dreambooth: prior preservation on images of this prompt
    class_data: str | None = None  # ... kept in this folder (default: OUT/class-images)
    class_images: int = 100
    prior_weight: float = 1.0
    diffusers: bool = False  # full / dreambooth: a diffusers folder too
    checkpoint_every: int = 100
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 25

    def run_identity(self) -> dict[str, object]:
        """What a resumed run must share with the one it continues (not its length, outputs or samples)."""
        free = {
            "steps",
            "out",
            "checkpoint_every",
            "sample_every",
            "sample_prompts",
            "sample_steps",
            "diffusers",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free}


@dataclass
class Encoded:
    """One image's frozen VAE posterior (unscaled mean and log-variance) and caption."""

    mean: torch.Tensor
    logvar: torch.Tensor
    caption: str


Groups = dict[tuple[int, int], list[Encoded]]


def encode_folder(model: Any, source: str, config: FinetuneConfig, what: str = "") -> Groups:
    """The data read, bucketed and encoded once (per bucket size) by the model's VAE."""
    report = read_captioned(source, config.on_problem)
    print(f"openldm finetune: {what}{report.summary()}")
    vae = model.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    groups: Groups = {}
    with torch.inference_mode():
        for size, samples in bucketed(report, config.resolution).items():
            for sample in samples:
                pixels = fit(sample.image, size)[None].to(device, dtype)
                posterior = vae.encode(pixels)
                groups.setdefault(size, []).append(
                    Encoded(posterior.mean.float().cpu(), posterior.logvar.float().cpu(), sample.caption)
                )
    return groups


def _batch(groups: Groups, config: FinetuneConfig, step: int, stream: int = STREAM_BATCH) -> list[Encoded]:
    """Step ``step``'s batch: one bucket (weighted by its size), then images of it, all from (seed, step)."""
    generator = step_generator(config.seed, stream, step)
    sizes = sorted(groups)
    weights = torch.tensor([len(groups[s]) for s in sizes], dtype=torch.float64)
    bucket = groups[sizes[int(torch.multinomial(weights, 1, generator=generator))]]
    picks = torch.randint(0, len(bucket), (config.batch_size,), generator=generator)
    return [bucket[int(i)] for i in picks]


def _latents(batch: list[Encoded], scale: float, generator: torch.Generator) -> torch.Tensor:
    mean = torch.cat([e.mean for e in batch])
    std = torch.cat([e.logvar for e in batch]).mul(0.5).exp()
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scale


def _context(model: Any, texts: list[str], grad: bool) -> torch.Tensor:
    tokenizer = model.tokenizer
    ids = torch.tensor(
        [tokenizer.window(tokenizer.encode(t)) for t in texts],
        device=next(model.text_encoder.parameters()).device,
    )
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return model.text_encoder(ids).float()


def check(config: FinetuneConfig, ranks: Ranks = ALONE) -> None:
    """The settings that cannot work, refused before any data is read."""
    if config.batch_size < ranks.world * config.accumulate:
        raise ValueError(
            f"--batch-size {config.batch_size} is fewer images than {ranks.world} processes x "
            f"{config.accumulate} accumulation rounds: every round needs at least one image"
        )
    if config.method == "dreambooth" and config.prior_weight > 0 and not config.class_prompt:
        raise ValueError("dreambooth needs --class-prompt (e.g. 'a photo of a dog'), or --prior-weight 0")
    if config.sample_every and not config.sample_prompts:
        raise ValueError("--sample-every needs at least one --sample-prompt")


def finetune(
    model: Any, config: FinetuneConfig, ranks: Ranks = ALONE, progress: bool = True, resume: bool = False
) -> Path | None:
    """Train ``config.method`` on ``model``; returns the file written in ``config.out`` (None on the ranks
    other than 0, which write nothing). With ``resume`` a run stopped in ``config.out`` continues."""
    check(config, ranks)
    if model.spec.variant not in ("sd1", "sd2"):
        raise ValueError(
            f"openldm finetune adapts text-to-image models; this is a {model.spec.variant} model"
        )
    groups = encode_folder(model, config.data, config)  # bad data is an error before anything is written
    if config.method == "textual-inversion":
        _check_word(groups, config)
    out = Path(config.out)
    prior = _prior(model, config, ranks, progress) if _uses_prior(config) else None
    trained = prepare(model, config)
    unet = model.unet
    unet.gradient_checkpointing = config.gradient_checkpointing
    try:
        loop = LoopConfig(
            steps=config.steps,
            lr=learning_rate(config),
            warmup_steps=config.warmup,
            weight_decay=1e-2 if config.method != "textual-inversion" else 0.0,
            grad_clip=config.max_grad_norm,
            ema_decay=config.ema_decay,
            checkpoint_every=config.checkpoint_every,
            log_every=1,
            accumulate=config.accumulate,
            mixed_precision=config.mixed_precision,
        )
        ema = EMA(trained.module, config.ema_decay) if config.ema_decay is not None else None
        train_loop(
            trained.module,
            _loss_fn(model, trained, groups, prior, config),
            loop,
            out,
            resume=resume,
            ema=ema,
            desc=f"finetune {config.method}",
            progress=progress,
            ranks=ranks,
            after_step=_sampler(model, trained, config, ranks),
            meta=config.run_identity(),
        )
        if ema is not None:
            ema.copy_to(trained.module)
            trained.before_forward()
        path = trained.write(out, _metadata(config)) if ranks.is_main else None
        ranks.barrier()
        return path
    finally:
        unet.gradient_checkpointing = False
        trained.undo()


def learning_rate(config: FinetuneConfig) -> float:
    if config.learning_rate is not None:
        return config.learning_rate
    return DEFAULT_LEARNING_RATES[config.method]


def _uses_prior(config: FinetuneConfig) -> bool:
    return config.method in ("dreambooth", "lora") and bool(config.class_prompt) and config.prior_weight > 0


def _prior(model: Any, config: FinetuneConfig, ranks: Ranks, progress: bool) -> Groups:
    """The class images (made by the untouched model on rank 0 when missing), encoded."""
    assert config.class_prompt is not None
    folder = Path(config.class_data) if config.class_data else Path(config.out) / "class-images"
    ranks.main_first(
        lambda: make_class_images(
            model,
            folder,
            config.class_prompt or "",
            config.class_images,
            config.resolution,
            config.seed,
            config.sample_steps,
            progress,
        )
    )
    return encode_folder(model, str(folder), config, "class images: ")


def _loss_fn(model: Any, trained: Trained, groups: Groups, prior: Groups | None, config: FinetuneConfig):
    schedule = NoiseSchedule(model.spec.schedule)
    scale = model.spec.vae.scale_factor
    device = next(model.unet.parameters()).device
    prediction = model.spec.prediction_type

    def one(
        data: Groups, streams: tuple[int, int, int], step: int, rows: slice, dropout: float
    ) -> torch.Tensor:
        batch_stream, posterior_stream, noise_stream = streams
        batch = _batch(data, config, step, batch_stream)
        latents = _latents(batch, scale, step_generator(config.seed, posterior_stream, step)).to(device)
        keep = ~dropout_mask(len(batch), dropout, step_generator(config.seed, STREAM_DROPOUT, step))
        texts = [e.caption if k else "" for e, k in zip(batch, keep.tolist(), strict=True)][rows]
        context = _context(model, texts, trained.text_trained)
        return diffusion_loss(
            model.unet,
            schedule,
            latents,
            context,
            prediction,
            step_generator(config.seed, noise_stream, step),
            config.min_snr_gamma,
            rows=rows,
            offset_noise=config.offset_noise,
        )

    def loss_fn(step: int, part: Part) -> tuple[torch.Tensor, dict[str, float]]:
        trained.before_forward()
        rows = part.rows(config.batch_size)
        loss = one(groups, (STREAM_BATCH, STREAM_POSTERIOR, STREAM_NOISE), step, rows, config.caption_dropout)
        parts = {"instance": float(loss.detach())}
        if prior is not None:
            streams = (STREAM_PRIOR_BATCH, STREAM_PRIOR_POSTERIOR, STREAM_PRIOR_NOISE)
            prior_loss = one(prior, streams, step, rows, 0.0)
            parts["prior"] = float(prior_loss.detach())
            loss = loss + config.prior_weight * prior_loss
        return loss, parts

    return loss_fn


def _sampler(model: Any, trained: Trained, config: FinetuneConfig, ranks: Ranks):
    """Images of the sample prompts every ``sample_every`` steps (seeds 0, 1, ...), on rank 0."""
    if not config.sample_every:
        return None
    folder = Path(config.out) / "samples"

    def after_step(step: int) -> None:
        if step % config.sample_every or not ranks.is_main:
            return
        trained.before_forward()
        trained.module.eval()
        try:
            for index, prompt in enumerate(config.sample_prompts):
                result = model.txt2img(
                    prompt,
                    seed=index,
                    steps=config.sample_steps,
                    height=config.resolution,
                    width=config.resolution,
                    progress=False,
                )
                save_png(result.images[0], folder / f"step-{step:06d}-{index}.png", result.parameters[0])
        finally:
            trained.module.train()

    return after_step


def _check_word(groups: Groups, config: FinetuneConfig) -> None:
    if config.word is None or not config.init_word:
        raise ValueError(
            "textual inversion needs --word (the new word) and --init-word (a word to start from)"
        )
    pattern = re.compile(rf"(?<![\w-]){re.escape(config.word.lower())}(?![\w-])")
    if not any(pattern.search(e.caption.lower()) for samples in groups.values() for e in samples):
        raise ValueError(f"no caption uses the word {config.word!r}: write it where the concept is")


def _metadata(config: FinetuneConfig) -> dict[str, str]:
    return {"openldm.finetune": json.dumps(dataclasses.asdict(config))}
