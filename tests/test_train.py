"""Training: each stage learns (overfit a fixed batch), resume continues bit for bit, EMA and caption
dropout do their arithmetic, and the export loads through the user's loading path."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import openldm
from openldm.config import ModelSpec, ScheduleConfig, TextConfig, UNetConfig, VAEConfig, preset
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.sampling.schedule import NoiseSchedule
from openldm.shapes.dataset import ShapesDataset
from openldm.train.autoencoder import AutoencoderRecipe, identity_init, train_autoencoder
from openldm.train.cli import add_train_parser
from openldm.train.data import (
    CAPTION_DROPOUT,
    drop_captions,
    dropout_mask,
    image_batch,
    step_generator,
)
from openldm.train.diffusion import (
    DiffusionRecipe,
    TextToImage,
    init_weights,
    load_or_build_cache,
    train_diffusion,
)
from openldm.train.ema import EMA
from openldm.train.embedded import MAX_BYTES, export_single_file, single_file_state_dict
from openldm.train.loop import LOG, LoopConfig, Part, train_loop
from openldm.train.losses import diffusion_loss, min_snr_weights

VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.5)
TEXT = TextConfig(width=64, layers=1, heads=1, mlp_width=64)
UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,), context_dim=64
)
SPEC = ModelSpec("tiny-embedded", "sd1", UNET, VAE, TEXT, prediction_type="v", image_size=24)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / LOG).read_text().splitlines()]


def _vae_recipe(steps: int) -> AutoencoderRecipe:
    # A dataset as long as a batch: every step sees the same 2 images.
    loop = LoopConfig(steps=steps, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=1000)
    return AutoencoderRecipe(vae=VAE, loop=loop, image_size=24, batch_size=2, dataset_length=2)


def test_autoencoder_overfits_a_fixed_batch(tmp_path):
    vae, result = train_autoencoder(_vae_recipe(15), tmp_path, progress=False)
    losses = _losses(tmp_path)
    assert result.finished and result.step == 15 and len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert (tmp_path / "vae.safetensors").is_file()


def _diffusion_recipe(steps: int, prediction_type: str = "eps") -> DiffusionRecipe:
    loop = LoopConfig(steps=steps, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=1000)
    return DiffusionRecipe(
        unet=UNET,
        text=TEXT,
        loop=loop,
        prediction_type=prediction_type,
        image_size=32,
        batch_size=4,
        cache_size=4,
    )


def _fixed_loss(model: TextToImage, cache, scale: float, prediction_type: str) -> float:
    """The diffusion loss on the whole (4-image) cache with fixed noise and timesteps."""
    schedule = NoiseSchedule()
    ids = cache.ids
    total = 0.0
    with torch.no_grad():
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            x0 = cache.sample(torch.arange(4), g) * scale
            total += float(diffusion_loss(model.unet, schedule, x0, model.text(ids), prediction_type, g))
    return total / 4


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_diffusion_overfits_a_fixed_batch(tmp_path, prediction_type):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE).eval().requires_grad_(False)
    vae.quant_conv.bias[4:] = -20.0  # a near-deterministic posterior, as a trained VAE's (x0 is learnable)
    recipe = _diffusion_recipe(25, prediction_type)
    model, scale, result = train_diffusion(recipe, vae, tmp_path, progress=False)
    cache = load_or_build_cache(recipe, vae, None, tmp_path)  # type: ignore[arg-type]  (cached: no tokenizer)
    torch.manual_seed(recipe.seed)
    untrained = TextToImage(UNET, TEXT)
    init_weights(untrained)
    before = _fixed_loss(untrained, cache, scale, prediction_type)
    after = _fixed_loss(model, cache, scale, prediction_type)
    assert result.finished and scale > 0
    assert after < 0.7 * before, (before, after)


def test_resume_continues_bit_for_bit(tmp_path):
    straight, _ = train_autoencoder(_vae_recipe(6), tmp_path / "a", progress=False)
    train_autoencoder(_vae_recipe(3), tmp_path / "b", progress=False)
    resumed, result = train_autoencoder(_vae_recipe(6), tmp_path / "b", resume=True, progress=False)
    assert result.step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    with pytest.raises(FileExistsError, match="--resume"):
        train_autoencoder(_vae_recipe(6), tmp_path / "b", progress=False)


def test_loop_reports_a_diverging_loss(tmp_path):
    model = torch.nn.Linear(2, 1)

    def loss_fn(step: int, part: Part):
        return model.weight.sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="learning rate"):
        train_loop(model, loss_fn, LoopConfig(steps=3, lr=1e-3), tmp_path, progress=False)


def test_lr_warmup_and_cosine():
    config = LoopConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_fraction=0.1)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(60) == pytest.approx(0.55)
    assert config.lr_at(110) == pytest.approx(0.1)
    assert LoopConfig(steps=10, lr=2.0, warmup_steps=4).lr_at(7) == 2.0


def test_ema_math():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(12.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 3.0 + 0.1 * 12.0)
    warm = EMA(model, decay=0.999)  # first update: decay (1 + 1) / (10 + 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    warm.update(model)
    assert warm.shadow["weight"].item() == pytest.approx(2 / 11 * 12.0 + 9 / 11 * 1.0)
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(3.9)


def test_caption_dropout_rate():
    mask = dropout_mask(200_000, CAPTION_DROPOUT, step_generator(0, 3, 0))
    assert CAPTION_DROPOUT == 0.1
    assert abs(mask.float().mean().item() - 0.1) < 0.003
    ids = torch.arange(2000 * 77).reshape(2000, 77)
    empty = torch.full((77,), -1)
    dropped = drop_captions(ids, empty, 0.1, step_generator(0, 3, 1))
    gone = (dropped == -1).all(dim=1)
    assert 150 < int(gone.sum()) < 250
    assert torch.equal(dropped[~gone], ids[~gone])
    assert torch.equal(
        dropout_mask(50, 0.1, step_generator(5, 3, 7)), dropout_mask(50, 0.1, step_generator(5, 3, 7))
    )


def test_batches_are_fixed_by_the_step():
    dataset = ShapesDataset(seed=3, size=32, length=100)
    assert torch.equal(image_batch(dataset, 2, 3), image_batch(dataset, 2, 3))
    assert not torch.equal(image_batch(dataset, 2, 3), image_batch(dataset, 3, 3))
    a = step_generator(1, 2, 3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=step_generator(1, 2, 3)))


def test_export_loads_through_the_loading_path(tmp_path):
    torch.manual_seed(0)
    model = TextToImage(UNET, TEXT).eval()
    vae = AutoencoderKL(VAE).eval()
    path = tmp_path / "model.safetensors"
    size = export_single_file(model, vae, SPEC, path)
    assert 0 < size == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["openldm.scale_factor"] == "0.5"
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys and "first_stage_model.quant_conv.weight" in keys
    loaded = openldm.load(path, preset=SPEC)
    assert loaded.spec.variant == "sd1" and loaded.spec.vae.scale_factor == 0.5
    assert loaded.spec.prediction_type == "v"
    expected = single_file_state_dict(model.unet, vae, model.text)
    assert torch.equal(
        loaded.unet.state_dict()["out.2.weight"], expected["model.diffusion_model.out.2.weight"]
    )
    # The head counts follow the loader's inference rules, so the sizes read from the weights agree.
    # Without a preset, the file's metadata gives what the weights cannot: scale, size, prediction type.
    inferred = openldm.load(path)
    assert inferred.spec.unet == UNET and inferred.spec.text == TEXT and inferred.spec.vae == VAE
    assert inferred.spec.image_size == 24 and inferred.spec.prediction_type == "v"
    assert openldm.load(path, prediction_type="eps").spec.prediction_type == "eps"


def test_text_heads_travel_in_the_metadata(tmp_path):
    """Heads are not in the weights: a 4-head encoder of width 64 (the loader's rule would say 1) is
    read back with its 4 heads, and gives the exporting model's outputs."""
    text = dataclasses.replace(TEXT, heads=4)
    spec = dataclasses.replace(SPEC, text=text)
    torch.manual_seed(0)
    model = TextToImage(UNET, text).eval()
    path = tmp_path / "model.safetensors"
    export_single_file(model, AutoencoderKL(VAE).eval(), spec, path)
    loaded = openldm.load(path)
    assert loaded.spec.text.heads == 4
    assert openldm.load(path, preset=SPEC).spec.text.heads == 4  # believed over a preset's 1 head
    ids = torch.tensor([[49406, 320, 736, 2866, 49407] + [49407] * 72])
    with torch.no_grad():
        expected = model.text.half().float()(ids)
        assert torch.allclose(loaded.text_encoder.float()(ids), expected, atol=1e-5)
    # heads that cannot split the width: a clear error, not a silent fallback
    from safetensors.torch import load_file, save_file

    from openldm.checkpoints.errors import CorruptCheckpointError

    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"openldm.text_heads": "3"})
    with pytest.raises(CorruptCheckpointError, match="3 text heads do not divide the width 64"):
        openldm.load(bad)


def test_embedded_preset_fits_the_budget():
    spec = preset("embedded")
    with torch.device("meta"):
        model = TextToImage(spec.unet, spec.text)
        vae = AutoencoderKL(spec.vae)
    values = sum(p.numel() for p in [*model.parameters(), *vae.parameters()])
    assert 2 * values <= MAX_BYTES
    assert spec.variant == "sd1" and spec.image_size >= 64 and spec.text.vocab_size == 49408
    assert spec.text.pad_token_id == 49407


def test_cli_parser():
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", "x", "--stage", "vae", "--steps", "5", "--resume"])
    assert (args.out, args.stage, args.steps, args.resume, args.export) == ("x", "vae", 5, True, None)
    assert parser.parse_args(["train", "--out", "y"]).stage == "all"


def test_foreground_weights_mark_what_differs_from_the_median_colour():
    from openldm.train.losses import foreground_weights

    images = torch.full((2, 3, 8, 8), -1.0)
    images[0, 0, 2:4, 2:5] = 1.0  # a red 2x3 patch on black
    images[1] = 0.5  # a flat image: no foreground
    weights = foreground_weights(images, 4.0)
    assert weights.shape == (2, 1, 8, 8)
    assert float(weights[0].sum()) == 64 + 4.0 * 6 and float(weights[0, 0, 2:4, 2:5].min()) == 5.0
    assert torch.equal(weights[1], torch.ones(1, 8, 8))


def test_foreground_weight_raises_the_loss_of_an_object_error_only():
    from openldm.nn.vae import DiagonalGaussian
    from openldm.train.losses import autoencoder_loss

    images = torch.full((1, 3, 8, 8), -1.0)
    images[0, 1, 3:5, 3:5] = 1.0
    posterior = DiagonalGaussian(torch.zeros(1, 8, 1, 1))
    dropped = images.clone()
    dropped[0, 1, 3:5, 3:5] = -1.0  # the object missing: a foreground error
    plain, _ = autoencoder_loss(images, dropped, posterior, 0.0)
    weighted, _ = autoencoder_loss(images, dropped, posterior, 0.0, foreground_weight=9.0)
    assert torch.isclose(weighted, 10 * plain)
    background_error = images.clone()
    background_error[0, 2, 0, 0] = -0.5
    plain, _ = autoencoder_loss(images, background_error, posterior, 0.0)
    weighted, _ = autoencoder_loss(images, background_error, posterior, 0.0, foreground_weight=9.0)
    assert torch.isclose(weighted, plain)


def test_crop_steps_switch_to_whole_images(tmp_path, monkeypatch):
    import openldm.train.autoencoder as autoencoder

    sizes = []
    decode = autoencoder.AutoencoderKL.decode

    def recording_decode(self, z):
        sizes.append(z.shape[-1] * 8)
        return decode(self, z)

    monkeypatch.setattr(autoencoder.AutoencoderKL, "decode", recording_decode)
    recipe = dataclasses.replace(_vae_recipe(4), crop_size=16, crop_steps=2)
    train_autoencoder(recipe, tmp_path, progress=False)
    assert sizes[:4] == [16, 16, recipe.image_size, recipe.image_size]


def test_identity_init_starts_as_a_pixelated_identity():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    identity_init(vae)
    x = torch.randn(2, 32, 16, 16)
    down, up = vae.encoder.down[0].downsample, vae.decoder.up[1].upsample
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=2.0, mode="nearest"), atol=1e-6)
    block = vae.encoder.down[0].block[0]
    assert torch.equal(block(x), x)  # the residual branch starts at zero
    assert torch.equal(vae.encoder.mid.attn_1(x), x)


def test_min_snr_weights():
    alpha_bar = torch.tensor([0.5, 0.8, 0.95])  # SNR 1, 4, 19
    eps = min_snr_weights(alpha_bar, 5.0, "eps")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 5.0 / 19.0]))
    v = min_snr_weights(alpha_bar, 5.0, "v")
    assert torch.allclose(v, torch.tensor([0.5, 0.8, 5.0 / 20.0]))


def test_min_snr_loss_equals_mse_where_snr_is_below_gamma():
    torch.manual_seed(0)
    unet = UNetModel(UNET)
    schedule = NoiseSchedule(ScheduleConfig())
    x0, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    plain = diffusion_loss(unet, schedule, x0, context, "eps", torch.Generator().manual_seed(1))
    weighted = diffusion_loss(unet, schedule, x0, context, "eps", torch.Generator().manual_seed(1), 1e9)
    assert torch.allclose(plain, weighted, rtol=1e-5)
