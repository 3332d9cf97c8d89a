"""``openldm finetune``: adapt a loaded model to the user's images: ``--method lora`` or
``textual-inversion`` (a new word whose token vectors are learnt; the networks stay as they are).

The data (:mod:`openldm.train.captioned`) is read and checked before anything else, each image
encoded once by the frozen VAE at its bucket's size (its posterior kept: a new sample each step), and
the LoRA layers (:mod:`openldm.train.lora`) trained with AdamW, a linear warm-up then a constant
learning rate, caption dropout and optional min-SNR weighting, on the model's own objective (eps or
v). Every random draw of step ``k`` comes from a generator fixed by (seed, k). The result is a kohya
LoRA file (or the web UI's ``.safetensors`` embedding) in ``--out`` beside a loss log (``loss.jsonl``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from openldm.adapters.embeddings import Embedding, install
from openldm.sampling.schedule import NoiseSchedule
from openldm.train.captioned import OnProblem, bucketed, fit, read_captioned
from openldm.train.data import (
    STREAM_BATCH,
    STREAM_DROPOUT,
    STREAM_NOISE,
    STREAM_POSTERIOR,
    dropout_mask,
    step_generator,
)
from openldm.train.lora import inject
from openldm.train.losses import diffusion_loss

Method = Literal["lora", "textual-inversion"]


@dataclass(frozen=True)
class FinetuneConfig:
    data: str
    out: str
    method: Method = "lora"
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 1e-4
    warmup: int = 0
    rank: int = 16
    alpha: float | None = None
    text_encoder: bool = False
    resolution: int = 512
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None
    seed: int = 0
    on_problem: OnProblem = "skip"
    word: str | None = None  # textual inversion: the new word, written in the captions
    init_word: str = ""  # ... and the word whose vectors it starts from
    vectors: int = 1


@dataclass
class Encoded:
    """One image's frozen VAE posterior (unscaled mean and log-variance) and caption."""

    mean: torch.Tensor
    logvar: torch.Tensor
    caption: str


def encode_data(model: Any, config: FinetuneConfig) -> dict[tuple[int, int], list[Encoded]]:
    """The data read, bucketed and encoded once (per bucket size) by the model's VAE."""
    report = read_captioned(config.data, config.on_problem)
    print(f"openldm finetune: {report.summary()}")
    vae = model.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    groups: dict[tuple[int, int], list[Encoded]] = {}
    with torch.inference_mode():
        for size, samples in bucketed(report, config.resolution).items():
            for sample in samples:
                pixels = fit(sample.image, size)[None].to(device, dtype)
                posterior = vae.encode(pixels)
                groups.setdefault(size, []).append(
                    Encoded(posterior.mean.float().cpu(), posterior.logvar.float().cpu(), sample.caption)
                )
    return groups


def _batch(groups: dict[tuple[int, int], list[Encoded]], config: FinetuneConfig, step: int) -> list[Encoded]:
    """Step ``step``'s batch: one bucket (weighted by its size), then images of it, all from (seed, step)."""
    generator = step_generator(config.seed, STREAM_BATCH, step)
    sizes = sorted(groups)
    weights = torch.tensor([len(groups[s]) for s in sizes], dtype=torch.float64)
    bucket = groups[sizes[int(torch.multinomial(weights, 1, generator=generator))]]
    picks = torch.randint(0, len(bucket), (config.batch_size,), generator=generator)
    return [bucket[int(i)] for i in picks]


def _latents(batch: list[Encoded], scale: float, step: int, seed: int) -> torch.Tensor:
    generator = step_generator(seed, STREAM_POSTERIOR, step)
    mean = torch.cat([e.mean for e in batch])
    std = torch.cat([e.logvar for e in batch]).mul(0.5).exp()
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scale


def _context(model: Any, captions: list[str], config: FinetuneConfig, step: int) -> torch.Tensor:
    keep = ~dropout_mask(
        len(captions), config.caption_dropout, step_generator(config.seed, STREAM_DROPOUT, step)
    )
    texts = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
    tokenizer = model.tokenizer
    ids = torch.tensor(
        [tokenizer.window(tokenizer.encode(t)) for t in texts],
        device=next(model.text_encoder.parameters()).device,
    )
    if config.text_encoder or config.method == "textual-inversion":
        return model.text_encoder(ids).float()
    with torch.no_grad():
        return model.text_encoder(ids).float()


def finetune(model: Any, config: FinetuneConfig, progress: bool = True) -> Path:
    """Train ``config.method`` on ``model``; returns the file written in ``config.out``."""
    groups = encode_data(model, config)  # bad data is an error before anything is written
    if config.method == "textual-inversion":
        _check_word(groups, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "lora":
        networks = {"unet": model.unet, "text_encoder": model.text_encoder}
        network = inject(
            networks, model.spec.unet, config.rank, config.alpha, config.text_encoder, config.seed
        )
        try:
            _train(model, network.parameters(), groups, config, out, progress)
            return network.save(out / "lora.safetensors", _metadata(config))
        finally:
            network.remove(networks)
    own, vectors = _start_vectors(model, config)
    embeddings = model.text_encoder.text_model.embeddings

    def table() -> None:  # the model's own added vectors, then the new word's, as they are now
        embeddings.added = torch.cat([own, vectors]) if own is not None else vectors

    try:
        _train(model, [vectors], groups, config, out, progress, table)
        return _save_embedding(vectors.detach(), out / f"{config.word}.safetensors", _metadata(config))
    finally:
        install(model.tokenizer, model.text_encoder, model.adapters.embeddings)


def _check_word(groups: dict[tuple[int, int], list[Encoded]], config: FinetuneConfig) -> None:
    if config.word is None or not config.init_word:
        raise ValueError(
            "textual inversion needs --word (the new word) and --init-word (a word to start from)"
        )
    pattern = re.compile(rf"(?<![\w-]){re.escape(config.word.lower())}(?![\w-])")
    if not any(pattern.search(e.caption.lower()) for samples in groups.values() for e in samples):
        raise ValueError(f"no caption uses the word {config.word!r}: write it where the concept is")


def _start_vectors(model: Any, config: FinetuneConfig) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The model's own added vectors (None if none) and the new word's, trainable, starting as
    ``init_word``'s token vectors (their mean, repeated); the word is given to the tokenizer."""
    assert config.word is not None
    ids = model.tokenizer.encode(config.init_word)
    if not ids:
        raise ValueError(f"--init-word {config.init_word!r} has no tokens")
    table = model.text_encoder.text_model.embeddings.token_embedding.weight.detach()
    start = table[ids].float().mean(0, keepdim=True).repeat(config.vectors, 1)
    word = Embedding(config.word.lower(), Path(config.word), start)
    install(model.tokenizer, model.text_encoder, [*model.adapters.embeddings, word])
    added = model.text_encoder.text_model.embeddings.added
    own = added[: -config.vectors].detach() if added.shape[0] > config.vectors else None
    return own, added[-config.vectors :].detach().clone().requires_grad_(True)


def _save_embedding(vectors: torch.Tensor, path: Path, metadata: dict[str, str]) -> Path:
    """The word's vectors as the web UI saves an embedding (``emb_params``); diffusers reads it too."""
    from safetensors.torch import save_file

    from openldm.files import replaced_when_done

    with replaced_when_done(path) as temporary:
        save_file({"emb_params": vectors.float().cpu().contiguous()}, str(temporary), metadata=metadata)
    return path


def _metadata(config: FinetuneConfig) -> dict[str, str]:
    return {"openldm.finetune": json.dumps(config.__dict__)}


def _train(
    model: Any,
    parameters: list[torch.Tensor],
    groups: Any,
    config: FinetuneConfig,
    out: Path,
    progress: bool,
    before_step: Callable[[], None] | None = None,
) -> None:
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=1e-2 if config.method == "lora" else 0.0
    )
    warmup = max(config.warmup, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    schedule = NoiseSchedule(model.spec.schedule)
    scale, device = model.spec.vae.scale_factor, next(model.unet.parameters()).device
    bar = tqdm(range(config.steps), desc=f"finetune {config.method}", disable=not progress)
    with open(out / "loss.jsonl", "w", encoding="utf-8") as log:
        for step in bar:
            batch = _batch(groups, config, step)
            latents = _latents(batch, scale, step, config.seed).to(device)
            if before_step is not None:
                before_step()
            context = _context(model, [e.caption for e in batch], config, step)
            noise_generator = step_generator(config.seed, STREAM_NOISE, step)
            loss = diffusion_loss(
                model.unet,
                schedule,
                latents,
                context,
                model.spec.prediction_type,
                noise_generator,
                config.min_snr_gamma,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss)
            bar.set_postfix(loss=f"{value:.4f}")
            log.write(json.dumps({"step": step, "loss": value, "lr": scheduler.get_last_lr()[0]}) + "\n")
