"""The embedded model's inpainting and depth variants: the zero-initialised UNet equals the base at step 0,
masks are deterministic LaMa-style masks, the training conditioning is the pipelines' own, training learns
and resumes bit for bit, and the UNet-only export stays in budget and merges with its base."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import openldm
import openldm.cli
from openldm.checkpoints.errors import CorruptCheckpointError, MissingWeightsError
from openldm.checkpoints.variant_files import file_metadata, read_variant
from openldm.config import ModelSpec, TextConfig, UNetConfig, VAEConfig, preset
from openldm.images import pil_to_tensor
from openldm.model import StableDiffusion
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.pipelines.depth2img import depth2img
from openldm.pipelines.inpaint import inpaint
from openldm.sampling.schedule import NoiseSchedule
from openldm.shapes.dataset import ShapesDataset
from openldm.tokenizer import CLIPTokenizer
from openldm.train import variants
from openldm.train.cli import add_train_parser
from openldm.train.diffusion import TextToImage, init_weights
from openldm.train.embedded import export_single_file
from openldm.train.loop import LOG, LoopConfig
from openldm.train.losses import diffusion_loss
from openldm.train.variants import (
    CONV_IN,
    INHERITED,
    MAX_BYTES,
    UNET_PREFIX,
    Base,
    ConcatInput,
    MaskMix,
    VariantCache,
    VariantRecipe,
    build_variant_cache,
    expand_unet,
    export_variant,
    inpaint_concat,
    lama_mask,
    load_base,
    mask_rng,
    train_variant,
    training_mask,
    variant_spec,
)
from tests.helpers import assert_close_rel

VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.5)
TEXT = TextConfig(width=64, layers=1, heads=1, mlp_width=64)
UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,), context_dim=64
)
BASE = ModelSpec("tiny-embedded", "sd1", UNET, VAE, TEXT, image_size=32)
KINDS = ("inpaint", "depth")


pytestmark = pytest.mark.usefixtures("single_thread")


def _base_file(path: Path, seed: int = 0) -> Path:
    """A tiny base model written as the embedded model is (SD 1 single file, fp16)."""
    torch.manual_seed(seed)
    model = TextToImage(UNET, TEXT)
    init_weights(model)
    vae = AutoencoderKL(VAE)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -20.0  # a near-deterministic posterior, as a trained VAE's
    export_single_file(model, vae, BASE, path)
    return path


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    return _base_file(tmp_path_factory.mktemp("base") / "base.safetensors")


def _recipe(kind: str, steps: int, **changes: object) -> VariantRecipe:
    loop = LoopConfig(steps=steps, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=1000)
    options = {"batch_size": 4, "cache_size": 4, "masks_per_image": 2, **changes}
    return VariantRecipe(kind, BASE, loop, **options)  # type: ignore[arg-type]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / LOG).read_text().splitlines()]


# --- the widened UNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_variant_equals_the_base(kind):
    torch.manual_seed(0)
    base = UNetModel(UNET).eval()
    with torch.no_grad():  # every weight non-zero (a fresh UNet's output layer is zero)
        for p in base.parameters():
            p.add_(0.2 * torch.randn_like(p))
    variant = expand_unet(base, variant_spec(BASE, kind).unet).eval()
    extra = 5 if kind == "inpaint" else 1
    assert variant.config.in_channels == 4 + extra
    weight = variant.state_dict()[CONV_IN]
    assert torch.equal(weight[:, :4], base.state_dict()[CONV_IN]) and not weight[:, 4:].any()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = base(x, t, context=context)
        assert expected.abs().mean() > 0.1
        for scale in (1.0, 100.0):
            out = variant(torch.cat([x, scale * torch.randn(2, extra, 8, 8)], 1), t, context=context)
            assert_close_rel(out, expected, 1e-5)
        variant.input_blocks[0][0].weight[:, 4:] = 0.1  # once the extra channels are trained, they matter
        out = variant(torch.cat([x, torch.randn(2, extra, 8, 8)], 1), t, context=context)
    assert (out - expected).abs().max() > 1e-2


def test_variant_presets_are_the_embedded_model_widened():
    embedded = preset("embedded")
    for kind, channels in (("inpaint", 9), ("depth", 5)):
        spec = preset(f"embedded-{kind}")
        assert spec == variant_spec(embedded, kind)
        assert spec.variant == kind and spec.unet.in_channels == channels
        assert (spec.vae, spec.text, spec.image_size) == (embedded.vae, embedded.text, embedded.image_size)
        with torch.device("meta"):
            named = UNetModel(spec.unet).named_parameters()
            # A variant file stores the UNet but the timestep embedding it inherits from its base.
            params = sum(p.numel() for name, p in named if not any(f in name for f in variants.INHERITED))
        assert 2 * params < MAX_BYTES - 100_000, params  # fp16, with room for the header


# --- masks --------------------------------------------------------------------------------------


def test_masks_are_deterministic_and_binary():
    objects = ShapesDataset(0, 64, 10)[3].masks
    first = [training_mask(mask_rng(0, i, k), 64, objects) for i in range(20) for k in range(2)]
    again = [training_mask(mask_rng(0, i, k), 64, objects) for i in range(20) for k in range(2)]
    other = [training_mask(mask_rng(1, i, k), 64, objects) for i in range(20) for k in range(2)]
    assert all(m.dtype == np.bool_ and m.shape == (64, 64) for m in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(not np.array_equal(a, b) for a, b in zip(first, other, strict=True)) > 25
    assert len({m.tobytes() for m in first}) > 25


def test_lama_masks_cover_a_broad_range_of_areas():
    mix = MaskMix()
    fractions = np.array([lama_mask(np.random.default_rng([5, i]), 64).mean() for i in range(200)])
    assert fractions.min() >= mix.min_fraction and fractions.max() <= mix.max_fraction
    assert np.quantile(fractions, 0.1) < 0.15 and np.quantile(fractions, 0.9) > 0.4, fractions


def test_mask_mix_full_and_object_masks():
    dataset = ShapesDataset(0, 64, 300)
    full = np.mean([training_mask(mask_rng(2, i, 0), 64, dataset[i].masks).all() for i in range(300)])
    assert 0.18 < full < 0.32, full  # MaskMix.full = 0.25
    only_objects = MaskMix(full=0.0, objects=1.0, max_dilation=2)
    for i in range(30):
        objects = dataset[i].masks
        mask = training_mask(mask_rng(3, i, 0), 64, objects, only_objects)
        grown = F.max_pool2d(torch.from_numpy(objects).float()[:, None], 5, stride=1, padding=2)[:, 0] > 0
        # One whole object, dilated by at most 2 pixels.
        assert any(
            (mask >= o).all() and (mask <= g.numpy()).all() for o, g in zip(objects, grown, strict=True)
        )


# --- the conditioning is the pipelines' ---------------------------------------------------------


def _model(kind: str) -> StableDiffusion:
    torch.manual_seed(1)
    spec = variant_spec(BASE, kind)
    return StableDiffusion(
        spec=spec,
        unet=UNetModel(spec.unet).eval(),
        vae=AutoencoderKL(VAE).eval(),
        text_encoder=CLIPTextEncoder(TEXT).eval(),
        tokenizer=CLIPTokenizer.for_config(TEXT),
    )


def _unet_input(
    model: StableDiffusion, pipeline: Callable[..., Any], *args: Any, **options: Any
) -> torch.Tensor:
    """The first input the UNet sees while ``pipeline(model, *args, **options)`` samples one latent."""
    seen: list[torch.Tensor] = []
    handle = model.unet.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    try:
        pipeline(model, *args, guidance_scale=1.0, output_type="latent", progress=False, **options)
    finally:
        handle.remove()
    return seen[0]


def test_inpaint_conditioning_is_the_pipelines():
    model = _model("inpaint")
    recipe = _recipe("inpaint", 1, cache_size=3)
    dataset = ShapesDataset(0, BASE.image_size, 3)
    cache = build_variant_cache(recipe, model, dataset)
    scale, seed = VAE.scale_factor, 7
    checked_partial = checked_full = 0
    for i in range(3):
        sample = dataset[i]
        for k in range(2):
            mask = training_mask(mask_rng(recipe.seed, i, k), BASE.image_size, sample.masks, recipe.mask_mix)
            pixel_mask = torch.from_numpy(mask).float()[None, None]
            seen = _unet_input(model, inpaint, sample.caption, sample.image, pixel_mask, steps=1, seed=seed)
            # The pipeline draws the starting noise, then the masked image's posterior sample.
            generator = torch.Generator().manual_seed(seed)
            torch.randn(seen[:, :4].shape, generator=generator)
            ours = cache.channels(torch.tensor([i]), torch.tensor([k]), generator, scale)
            assert torch.equal(seen[:, 4:5], ours[:, :1])  # the mask at latent size
            # The masked image's latent: exact for a full mask (a grey image, encoded as the pipeline does),
            # else up to the rounding of channels-last convolutions, which the cache uses for speed.
            if mask.all():
                assert torch.equal(ours[:, 1:], seen[:, 5:])
                checked_full += 1
            else:
                assert_close_rel(ours[:, 1:], seen[:, 5:], 1e-4)
                checked_partial += 1
            # The direct form (what the cache stores, encoded per call) is exactly the pipeline's.
            generator = torch.Generator().manual_seed(seed)
            torch.randn(seen[:, :4].shape, generator=generator)
            direct = inpaint_concat(model.vae, pil_to_tensor(sample.image), pixel_mask, generator)
            assert torch.equal(direct, seen[:, 4:])
    assert checked_partial >= 2 and checked_full >= 1


def test_depth_conditioning_is_the_pipelines():
    model = _model("depth")
    recipe = _recipe("depth", 1, cache_size=3)
    dataset = ShapesDataset(0, BASE.image_size, 3)
    cache = build_variant_cache(recipe, model, dataset)
    assert cache.mean is None and cache.fixed.shape == (3, 1, 1, 4, 4)
    for i in range(3):
        sample = dataset[i]
        seen = _unet_input(
            model,
            depth2img,
            sample.caption,
            sample.image,
            depth_map=sample.depth,
            strength=1.0,
            steps=2,
            seed=3,
        )
        ours = cache.channels(torch.tensor([i]), torch.tensor([0]), torch.Generator(), VAE.scale_factor)
        assert torch.equal(seen[:, 4:], ours)
        assert ours.amin() == -1.0 and ours.amax() == 1.0


# --- training -----------------------------------------------------------------------------------


def _fixed_loss(unet: torch.nn.Module, base: Base, cache: VariantCache) -> float:
    """The variant's loss on the whole (4-image) cache with fixed noise, timesteps and extra channels."""
    model, indices = base.model, torch.arange(4)
    scale = model.spec.vae.scale_factor
    total = 0.0
    with torch.no_grad():
        context = model.text_encoder(cache.latents.ids[indices])
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            x0 = cache.latents.sample(indices, g) * scale
            extra = cache.concat(indices, g, g, scale)
            loss = diffusion_loss(ConcatInput(unet, extra), NoiseSchedule(), x0, context, "eps", g)
            total += float(loss)
    return total / 4


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss(tmp_path, base_path, kind):
    base = load_base(base_path, BASE)
    untrained = expand_unet(base.model.unet, variant_spec(BASE, kind).unet)
    unet, result = train_variant(_recipe(kind, 30), base, tmp_path, progress=False)
    cache = VariantCache.from_state_dict(torch.load(tmp_path / variants.CACHE, weights_only=True))
    before, after = _fixed_loss(untrained, base, cache), _fixed_loss(unet, base, cache)
    assert result.finished and result.step == 30 and len(_losses(tmp_path)) == 30
    assert after < 0.7 * before, (before, after)
    assert unet.input_blocks[0][0].weight[:, 4:].abs().max() > 1e-4  # the new channels learned


def test_resume_continues_bit_for_bit(tmp_path, base_path):
    straight, _ = train_variant(
        _recipe("inpaint", 6), load_base(base_path, BASE), tmp_path / "a", progress=False
    )
    train_variant(_recipe("inpaint", 3), load_base(base_path, BASE), tmp_path / "b", progress=False)
    resumed, result = train_variant(
        _recipe("inpaint", 6), load_base(base_path, BASE), tmp_path / "b", resume=True, progress=False
    )
    assert result.step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    with pytest.raises(FileExistsError, match="--resume"):
        train_variant(_recipe("inpaint", 6), load_base(base_path, BASE), tmp_path / "b", progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_two_workers_train_a_variant_as_one(tmp_path, base_path, kind):
    recipe = _recipe(kind, 4)
    one, _ = train_variant(recipe, load_base(base_path, BASE), tmp_path / "one", progress=False)
    two_workers = dataclasses.replace(recipe, loop=dataclasses.replace(recipe.loop, workers=2))
    two, _ = train_variant(two_workers, load_base(base_path, BASE), tmp_path / "two", progress=False)
    # each step's loss is the blocks' sum: a block weighed wrong, or given other rows' inputs, shows
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    x, y = (torch.cat([v.flatten() for v in m.state_dict().values()]) for m in (one, two))
    assert float((x - y).norm() / x.norm()) < 1e-3  # AdamW: summation order only (test_train_workers.py)


# --- export and merge ---------------------------------------------------------------------------


def _trained_variant(base: Base, kind: str) -> UNetModel:
    unet = expand_unet(base.model.unet, variant_spec(BASE, kind).unet)
    with torch.no_grad():
        unet.input_blocks[0][0].weight[:, 4:] = 0.25  # as if trained
    return unet


def test_export_holds_the_unet_alone_in_fp16(tmp_path, base_path):
    base = load_base(base_path, BASE)
    unet, spec = _trained_variant(base, "inpaint"), variant_spec(BASE, "inpaint")
    path = tmp_path / "inpaint.safetensors"
    size = export_variant(unet, spec, base, path)
    assert size == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert keys and all(k.startswith(UNET_PREFIX) for k in keys)
    assert {k[len(UNET_PREFIX) :] for k in keys} == set(unet.state_dict())
    assert (
        metadata["openldm.preset"] == "tiny-embedded-inpaint" and metadata["openldm.base"] == "tiny-embedded"
    )
    assert (
        metadata["openldm.base_fingerprint"] == base.fingerprint
        and metadata["openldm.base_file"] == "base.safetensors"
    )
    with pytest.raises(ValueError, match="over the"):
        export_variant(unet, spec, base, tmp_path / "too-big.safetensors", max_bytes=size - 1)
    assert not (tmp_path / "too-big.safetensors").exists()


def _variant_file(tmp_path: Path, base_path: Path, kind: str) -> tuple[Path, UNetModel, Base]:
    base = load_base(base_path, BASE)
    unet = _trained_variant(base, kind)
    variant_path = tmp_path / f"{kind}.safetensors"
    export_variant(unet, variant_spec(BASE, kind), base, variant_path)
    return variant_path, unet, base


def _check_loaded(loaded: StableDiffusion, unet: UNetModel, base: Base) -> None:
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value.half()), key
    for key, value in base.model.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[key].float(), value), key


def test_inpaint_variant_loads_with_its_base(tmp_path, base_path):
    path, unet, base = _variant_file(tmp_path, base_path, "inpaint")
    loaded = openldm.load(path, preset=variant_spec(BASE, "inpaint"), base=base_path)
    assert loaded.spec.variant == "inpaint" and loaded.unet.config.in_channels == 9
    _check_loaded(loaded, unet, base)


def test_depth_variant_loads_with_its_base(tmp_path, base_path):
    path, unet, base = _variant_file(tmp_path, base_path, "depth")
    loaded = openldm.load(path, preset=variant_spec(BASE, "depth"), base=base_path)
    assert loaded.spec.variant == "depth" and loaded.unet.config.in_channels == 5
    _check_loaded(loaded, unet, base)


def test_variant_file_without_its_base_is_one_clear_error(tmp_path, base_path):
    path, _, _ = _variant_file(tmp_path, base_path, "inpaint")
    with pytest.raises(MissingWeightsError, match="holds only a UNet.*base.safetensors"):
        openldm.load(path, preset=variant_spec(BASE, "inpaint"))
    with pytest.raises(ValueError, match="base= is for UNet-only variant files"):
        openldm.load(base_path, preset=BASE, base=base_path)


def test_merged_variant_is_a_complete_single_file(tmp_path, base_path):
    path, unet, base = _variant_file(tmp_path, base_path, "inpaint")
    merged = tmp_path / "merged.safetensors"
    save_file(read_variant(path, base_path), str(merged))
    loaded = openldm.load(merged, preset=variant_spec(BASE, "inpaint"))
    _check_loaded(loaded, unet, base)


def test_a_variant_inherits_the_timestep_embedding_of_its_base(tmp_path, base_path):
    base = load_base(base_path, BASE, inherited=INHERITED)
    with pytest.raises(ValueError, match="inherits"):
        train_variant(_recipe("inpaint", 3, inherited=INHERITED), load_base(base_path, BASE), tmp_path)
    recipe = _recipe("inpaint", 3, inherited=INHERITED)
    unet, _ = train_variant(recipe, base, tmp_path / "run", progress=False)
    before = base.model.unet.state_dict()
    inherited = {k for k in before if "time_embed." in k or "emb_layers." in k}
    assert inherited and all(torch.equal(unet.state_dict()[k], before[k]) for k in inherited)
    changed = [k for k in before if k not in inherited and not torch.equal(unet.state_dict()[k], before[k])]
    assert len(changed) > len(before) // 2  # the rest trained
    path = tmp_path / "inpaint.safetensors"
    export_variant(unet, variant_spec(BASE, "inpaint"), base, path)
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = {k[len(UNET_PREFIX) :] for k in f.keys()}, f.metadata()
    assert keys == set(unet.state_dict()) - inherited
    assert metadata["openldm.inherits"] == "time_embed.,emb_layers."
    loaded = openldm.load(path, preset=variant_spec(BASE, "inpaint"), base=base_path)
    _check_loaded(loaded, unet, base)
    # The fingerprint covers the inherited tensors: a base with another timestep embedding is refused.
    other = load_file(base_path)
    other[UNET_PREFIX + "time_embed.0.bias"] = other[UNET_PREFIX + "time_embed.0.bias"] + 1
    save_file(other, str(tmp_path / "other.safetensors"), metadata=file_metadata(base_path))
    with pytest.raises(CorruptCheckpointError, match="trained on the base"):
        read_variant(path, tmp_path / "other.safetensors")


def test_merge_refuses_another_base(tmp_path, base_path):
    base = load_base(base_path, BASE)
    path = tmp_path / "inpaint.safetensors"
    export_variant(_trained_variant(base, "inpaint"), variant_spec(BASE, "inpaint"), base, path)
    other = _base_file(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(CorruptCheckpointError, match="trained on the base 'base.safetensors'"):
        read_variant(path, other)
    with pytest.raises(CorruptCheckpointError, match="holds only"):
        read_variant(base_path, base_path)  # a complete model is not a variant file


# --- openldm train --stage inpaint|depth ---------------------------------------------------------


def test_cli_runs_a_variant_stage(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    calls = []
    monkeypatch.setattr(variants, "run_variant", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    packaged = tmp_path / "data" / "embedded.safetensors"  # the packaged base, wherever it is installed
    packaged.parent.mkdir()
    packaged.touch()
    monkeypatch.setattr("openldm.checkpoints.packaged.EMBEDDED_FILE", packaged)
    args = parser.parse_args(["train", "--out", str(tmp_path), "--stage", "depth", "--steps", "7"])
    assert args.run(args) == 0
    (recipe, base, out), options = calls[0]
    assert recipe.kind == "depth" and recipe.loop.steps == 7 and recipe.base == preset("embedded")
    assert base == packaged and Path(out) == tmp_path
    # The export goes to the run's folder, never over the packaged variant unless named.
    assert options["export_path"] == tmp_path / "embedded-depth.safetensors"
    out = str(tmp_path / "x")
    args = parser.parse_args(
        ["train", "--out", out, "--stage", "inpaint", "--base", "b.safetensors", "--export", "none"]
    )
    args.run(args)
    (recipe, base, _), options = calls[1]
    assert recipe.kind == "inpaint" and base == Path("b.safetensors") and options["export_path"] is None
    args = parser.parse_args(["train", "--out", out, "--stage", "inpaint", "--workers", "3"])
    args.run(args)
    assert calls[2][0][0].loop.workers == 3


# --- openldm eval --task inpaint|depth -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["inpaint", "depth"])
def test_eval_task_scores_a_variant_file_with_its_base(kind, tmp_path, base_path, capsys):
    path, _, _ = _variant_file(tmp_path, base_path, kind)
    report = tmp_path / "eval.json"
    argv = ["eval", "--task", kind, "--ckpt", path, "--base", base_path, "--n", "3", "--steps", "2"]
    assert openldm.cli.main([str(a) for a in [*argv, "--no-progress", "--json", report]]) == 0
    out = capsys.readouterr().out
    assert f"# {kind} fidelity of {path}" in out and "| images |" in out
    scores = json.loads(report.read_text())["scores"]
    assert scores["images"] == 3
    # Random weights draw no shapes: nothing repainted, no depth order; the kept region is the VAE's.
    assert scores["colour"] == 0.0 and 0.0 <= scores.get("order", 0.0) <= 1.0
    if kind == "inpaint":
        assert scores["repainted"] == 0.0 and scores["kept_error"] > 0.0


def test_eval_task_refuses_a_model_of_another_kind(tmp_path, base_path, capsys):
    argv = ["eval", "--task", "depth", "--ckpt", str(base_path), "--n", "1", "--no-progress"]
    assert openldm.cli.main(argv) == 2
    assert "--task depth needs a depth model; this is a sd1 model" in capsys.readouterr().err
