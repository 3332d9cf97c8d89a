"""Worker threads in the training loop: each computes a block of the batch, and the blocks add up to
the whole batch, so a run with two workers trains what a run with one does (up to summation order)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from openldm.config import TextConfig, UNetConfig, VAEConfig
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.sampling.schedule import NoiseSchedule
from openldm.tokenizer import CLIPTokenizer
from openldm.train.autoencoder import AutoencoderRecipe, train_autoencoder
from openldm.train.cli import default_workers
from openldm.train.diffusion import DiffusionRecipe, train_diffusion
from openldm.train.embedded import embedded_recipe, with_overrides
from openldm.train.loop import LOG, LoopConfig, Part
from openldm.train.losses import diffusion_loss
from openldm.train.text_encoder import CaptionParser, TextRecipe, caption_pool, parse_loss, train_text_encoder

TEXT = TextConfig(width=32, layers=1, heads=1, mlp_width=64)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.5)
UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,), context_dim=32
)
LOOP = LoopConfig(steps=4, lr=3e-3, warmup_steps=1, checkpoint_every=1000, log_every=1)
EOS = 49407


@pytest.mark.parametrize("batch_size, count", [(5, 2), (7, 3), (4, 4), (32, 2)])
def test_parts_cover_the_batch_once(batch_size, count):
    parts = [Part(i, count) for i in range(count)]
    rows = [r for p in parts for r in range(batch_size)[p.rows(batch_size)]]
    assert rows == list(range(batch_size))
    assert sum(p.share(batch_size) for p in parts) == pytest.approx(1.0)
    assert Part().rows(batch_size) == slice(0, batch_size)


def test_a_batchs_blocks_add_up_to_its_diffusion_loss_and_gradients():
    torch.manual_seed(0)
    unet = UNetModel(UNET)
    x0, context, schedule = torch.randn(6, 4, 8, 8), torch.randn(6, 77, 32), NoiseSchedule()

    def loss_and_grads(rows: slice | None) -> tuple[float, list[torch.Tensor]]:
        unet.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(3)
        mine = context if rows is None else context[rows]
        loss = diffusion_loss(unet, schedule, x0, mine, "eps", g, min_snr_gamma=5.0, rows=rows)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in unet.parameters()]

    whole, whole_grads = loss_and_grads(None)
    blocks = [loss_and_grads(Part(i, 2).rows(6)) for i in range(2)]
    assert sum(loss for loss, _ in blocks) == pytest.approx(whole, rel=1e-6)
    for i, grad in enumerate(whole_grads):
        assert torch.allclose(blocks[0][1][i] + blocks[1][1][i], grad, atol=1e-6), i


def test_a_batchs_blocks_add_up_to_its_parse_loss():
    torch.manual_seed(0)
    parser = CaptionParser(TEXT)
    ids, targets, objects = caption_pool(0, 6, CLIPTokenizer.for_config(TEXT))
    whole, whole_parts = parse_loss(parser, ids, targets, EOS, objects)
    blocks = [parse_loss(parser, ids, targets, EOS, objects, rows=Part(i, 3).rows(6)) for i in range(3)]
    assert sum(float(loss) for loss, _ in blocks) == pytest.approx(float(whole), rel=1e-5)
    for name, value in whole_parts.items():
        assert sum(parts[name] for _, parts in blocks) == pytest.approx(value, rel=1e-5), name


def _assert_same_runs(a: torch.nn.Module, b: torch.nn.Module, out: Path) -> None:
    """Two runs that differ only in the order the batch's gradients are summed.

    Step 0 starts from the same weights: its logged loss (the blocks' sum, so a block weighed wrong
    shows) agrees to float32 rounding. After that, AdamW moves each parameter by about the learning rate
    whatever its gradient's size, so a parameter whose gradient is of the order of the summation's
    rounding (a bias that the following group norm cancels) moves by an amount set by that rounding:
    per step the runs may drift apart by up to 2 lr per element, which no tolerance on the rounding
    itself bounds and which depends on the CPU's kernels (on AVX2 the later losses differed by 1.2e-3
    relative, the weights by 1.3e-3 in norm; on AVX-512 by 1e-5). So later steps are held to what that
    drift allows: losses within 1%, weights within 2 * steps * lr of each other and 1% in norm."""
    logged = [_losses(out / run) for run in ("one", "two")]
    assert logged[0][0] == pytest.approx(logged[1][0], rel=1e-6), logged
    assert logged[0][1:] == pytest.approx(logged[1][1:], rel=1e-2), logged
    x, y = (torch.cat([v.flatten() for v in m.state_dict().values()]) for m in (a, b))
    assert float((x - y).abs().max()) <= 2 * LOOP.steps * LOOP.lr
    assert float((x - y).norm() / x.norm()) < 1e-2


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / LOG).read_text().splitlines()]


def test_two_workers_train_the_autoencoder_as_one(tmp_path):
    recipe = AutoencoderRecipe(vae=VAE, loop=LOOP, image_size=24, batch_size=4, dataset_length=8)
    one, _ = train_autoencoder(recipe, tmp_path / "one", progress=False)
    two_workers = dataclasses.replace(recipe, loop=dataclasses.replace(LOOP, workers=2))
    two, result = train_autoencoder(two_workers, tmp_path / "two", progress=False)
    assert result.finished
    _assert_same_runs(one, two, tmp_path)


def test_two_workers_train_the_text_encoder_as_one(tmp_path):
    recipe = TextRecipe(text=TEXT, loop=LOOP, batch_size=8, pool_size=40)
    one, _ = train_text_encoder(recipe, tmp_path / "one", progress=False)
    two_workers = dataclasses.replace(recipe, loop=dataclasses.replace(LOOP, workers=2))
    two, _ = train_text_encoder(two_workers, tmp_path / "two", progress=False)
    _assert_same_runs(one, two, tmp_path)


@pytest.mark.parametrize("frozen_text", [False, True])
def test_two_workers_train_the_unet_as_one(tmp_path, frozen_text):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE).eval().requires_grad_(False)
    recipe = DiffusionRecipe(
        unet=UNET, text=TEXT, loop=LOOP, image_size=24, batch_size=4, cache_size=8, frozen_text=frozen_text
    )
    text = CaptionParser(TEXT).text if frozen_text else None
    one, _, _ = train_diffusion(recipe, vae, tmp_path / "one", text=text, progress=False)
    two_workers = dataclasses.replace(recipe, loop=dataclasses.replace(LOOP, workers=2))
    two, _, _ = train_diffusion(two_workers, vae, tmp_path / "two", text=text, progress=False)
    _assert_same_runs(one, two, tmp_path)
    # and the workers did change the weights: the run is not a no-op
    assert any(
        not torch.equal(a, b)
        for a, b in zip(one.unet.state_dict().values(), UNetModel(UNET).state_dict().values(), strict=True)
    )


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers"):
        LoopConfig(steps=1, lr=1e-3, workers=0)


def test_workers_reach_every_stage_of_the_recipe():
    recipe = with_overrides(embedded_recipe(), workers=3)
    assert [s.loop.workers for s in (recipe.autoencoder, recipe.text, recipe.diffusion)] == [3, 3, 3]
    assert embedded_recipe().diffusion.loop.workers == 1  # the recipe itself says nothing of the machine


def test_default_workers_two_on_a_cpu_with_two_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_workers("cpu") == 2 and default_workers("cuda") == 1
        torch.set_num_threads(1)
        assert default_workers("cpu") == 1
    finally:
        torch.set_num_threads(threads)
