"""``openldm.load``: every tiny variant through every format, bit-exact, plus the decision rules."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import openldm
from openldm.checkpoints.detect import SIGNATURES, Features, diffusers_features, match
from openldm.checkpoints.errors import CheckpointError, MissingWeightsError, UnknownArchitectureError
from openldm.checkpoints.formats import clip, unet, vae
from openldm.checkpoints.load import SCHEDULE_BUFFERS, describe
from openldm.config import ModelSpec
from openldm.model import StableDiffusion
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.tokenizer import packaged_vocab
from tests.tiny import TINY

PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "depth": "StableDiffusionDepth2ImgPipeline",
    "x4-upscaler": "StableDiffusionUpscalePipeline",
    "unclip": "StableUnCLIPImg2ImgPipeline",
}
# Components the reference stores next to the networks, as dummy tensors with realistic names.
EXTRAS = {
    "depth": {
        "depth_model.model.pretrained.model.cls_token": (1, 1, 32),
        "depth_model.model.scratch.output_conv.0.weight": (8, 16, 3, 3),
    },
    "x4-upscaler": {"low_scale_model.betas": (350,), "low_scale_model.alphas_cumprod": (350,)},
    "unclip": {
        "embedder.model.visual.proj": (32, 64),
        "embedder.model.visual.conv1.weight": (32, 3, 14, 14),
        "noise_augmentor.data_mean": (1, 64),
        "noise_augmentor.data_std": (1, 64),
        "noise_augmentor.betas": (1000,),
    },
}
DEFAULT_PREDICTION = {"x4-upscaler": "v", "unclip": "v"}


def _is_sd1(spec: ModelSpec) -> bool:
    return spec.text.activation == "quick_gelu"


@dataclasses.dataclass
class Original:
    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text: CLIPTextEncoder


def _randomize(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _original(name: str) -> Original:
    spec = TINY[name]
    g = torch.Generator().manual_seed(sorted(TINY).index(name))
    return Original(
        spec,
        _randomize(UNetModel(spec.unet), g),
        _randomize(AutoencoderKL(spec.vae), g),
        _randomize(CLIPTextEncoder(spec.text), g),
    )


def _single_file_dict(orig: Original) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    sd = {f"model.diffusion_model.{k}": v for k, v in orig.unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in orig.vae.state_dict().items()}
    text = orig.text.state_dict()
    if _is_sd1(orig.spec):
        sd |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # OpenCLIP layout, with the resblock SD 2 never runs, a projection and a logit scale
        layer0 = "text_model.encoder.layers.0."
        extra = {
            k[len(layer0) :]: torch.randn(v.shape, generator=g)
            for k, v in text.items()
            if k.startswith(layer0)
        }
        width = orig.spec.text.width
        oc = clip.text_to_open_clip(text, [extra], torch.randn(width, width, generator=g), torch.tensor(4.6))
        sd |= {f"cond_stage_model.model.{k}": v for k, v in oc.items()}
    sd |= {name: torch.rand(1000, generator=g) for name in SCHEDULE_BUFFERS}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    for key, shape in EXTRAS.get(orig.spec.variant, {}).items():
        sd[key] = torch.randn(shape, generator=g)
    return {k: v.contiguous() for k, v in sd.items()}


def _write_single_file(orig: Original, path: Path, dtype: torch.dtype | None = None) -> Path:
    sd = _single_file_dict(orig)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    return path


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = packaged_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab.encoder), encoding="utf-8")
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def _write_diffusers(orig: Original, folder: Path, tokenizer_files: Path, prediction: str | None) -> Path:
    spec = orig.spec
    index = {"_class_name": PIPELINES[spec.variant], "_diffusers_version": "0.42.1"}
    for name, lib, cls in [
        ("unet", "diffusers", "UNet2DConditionModel"),
        ("vae", "diffusers", "AutoencoderKL"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("scheduler", "diffusers", "DDIMScheduler"),
    ]:
        index[name] = [lib, cls]
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps(unet.unet_config_to_diffusers(spec.unet)))
    unet_sd = unet.unet_to_diffusers(orig.unet.state_dict(), spec.unet)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in unet_sd.items()},
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    (folder / "vae" / "config.json").write_text(json.dumps(vae.vae_config_to_diffusers(spec.vae)))
    vae_sd = vae.vae_to_diffusers(orig.vae.state_dict(), spec.vae)
    torch.save(vae_sd, folder / "vae" / "diffusion_pytorch_model.bin")  # .bin, read by our reader
    (folder / "text_encoder" / "config.json").write_text(
        json.dumps(clip.text_config_to_transformers(spec.text))
    )
    safetensors.torch.save_file(
        clip.text_to_transformers(orig.text.state_dict()), folder / "text_encoder" / "model.fp16.safetensors"
    )
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, folder / "tokenizer" / name)
    pad = "<|endoftext|>" if _is_sd1(spec) else "!"
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    scheduler = {
        "_class_name": "DDIMScheduler",
        "beta_start": spec.schedule.beta_start,
        "beta_end": spec.schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": spec.schedule.num_timesteps,
    }
    if prediction is not None:
        scheduler["prediction_type"] = prediction
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def _assert_same_networks(loaded: StableDiffusion, orig: Original) -> None:
    """Every network of ``loaded`` computes exactly what the original computes."""
    g = torch.Generator().manual_seed(5)
    spec = orig.spec
    x = torch.randn(2, spec.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 7, spec.unet.context_dim, generator=g)
    y = None
    if spec.unet.num_classes == "sequential":
        y = torch.randn(2, spec.unet.adm_in_channels, generator=g)
    elif isinstance(spec.unet.num_classes, int):
        y = torch.tensor([20, 300])
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ids = torch.randint(0, spec.text.vocab_size, (2, spec.text.max_length), generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, context, y), orig.unet(x, t, context, y))
        assert torch.equal(loaded.vae.encode(image).mean, orig.vae.encode(image).mean)
        z = torch.randn(1, spec.vae.embed_dim, 4, 4, generator=g)
        assert torch.equal(loaded.vae.decode(z), orig.vae.decode(z))
        assert torch.equal(loaded.text_encoder(ids), orig.text(ids))
        assert orig.unet(x, t, context, y).abs().max() > 0  # a real comparison, not of zeros


def _assert_spec(loaded: ModelSpec, expected: ModelSpec, prediction: str) -> None:
    assert loaded.variant == expected.variant
    assert loaded.unet == expected.unet
    assert loaded.vae == expected.vae
    assert loaded.text == expected.text
    assert loaded.schedule == expected.schedule
    assert loaded.prediction_type == prediction


# --- every variant, every format ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_single_file_every_variant(tmp_path: Path, name: str, suffix: str) -> None:
    orig = _original(name)
    path = _write_single_file(orig, tmp_path / f"model{suffix}")
    model = openldm.load(path)
    _assert_spec(model.spec, orig.spec, DEFAULT_PREDICTION.get(orig.spec.variant, "eps"))
    assert model.source == str(path)
    assert model.tokenizer.pad_token_id == orig.spec.text.pad_token_id
    expected_extras = {k.split(".", 1)[0] for k in EXTRAS.get(orig.spec.variant, {})}
    assert set(model.extras) == expected_extras
    for key in EXTRAS.get(orig.spec.variant, {}):
        component, rest = key.split(".", 1)
        assert model.extras[component][rest].shape == EXTRAS[orig.spec.variant][key]
    _assert_same_networks(model, orig)
    params = [*model.unet.parameters(), *model.vae.parameters(), *model.text_encoder.parameters()]
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params)


@pytest.mark.parametrize("name", sorted(TINY))
def test_diffusers_folder_every_variant(tmp_path: Path, name: str, tokenizer_files: Path) -> None:
    orig = _original(name)
    prediction = {"eps": "epsilon", "v": "v_prediction"}[orig.spec.prediction_type]
    folder = _write_diffusers(orig, tmp_path / "pipe", tokenizer_files, prediction)
    model = openldm.load(folder)
    _assert_spec(model.spec, orig.spec, orig.spec.prediction_type)
    assert model.tokenizer.pad_token_id == orig.spec.text.pad_token_id
    assert model.tokenizer("a photo")[0, -1].item() == orig.spec.text.pad_token_id
    _assert_same_networks(model, orig)


def test_every_signature_is_unique() -> None:
    # Each row, turned into the features it describes, is matched by that row alone.
    for sig in SIGNATURES:
        for family in sorted(sig.text_families):
            features = Features(sig.in_channels, sig.class_embedding, family, None)  # type: ignore[arg-type]
            assert [s.variant for s in SIGNATURES if s.matches(features)] == [sig.variant]
    # And the tiny checkpoints of every variant, both ways.
    for spec in TINY.values():
        unet_json = unet.unet_config_to_diffusers(spec.unet)
        text_json = clip.text_config_to_transformers(spec.text)
        features = diffusers_features({"_class_name": PIPELINES[spec.variant]}, unet_json, text_json)
        assert match(features, "folder") == spec.variant


def test_pipeline_class_must_agree(tmp_path: Path) -> None:
    features = diffusers_features(
        {"_class_name": "StableDiffusionUpscalePipeline"},
        unet.unet_config_to_diffusers(TINY["sd2"].unet),
        clip.text_config_to_transformers(TINY["sd2"].text),
    )
    with pytest.raises(UnknownArchitectureError, match="StableDiffusionUpscalePipeline"):
        match(features, tmp_path)


# --- prediction type, scale factor, sizes ------------------------------------------------------


def _yaml(path: Path, params: dict) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}})
    )
    return path


def test_yaml_sets_prediction_scale_and_sizes(tmp_path: Path) -> None:
    orig = _original("sd2")
    path = _write_single_file(orig, tmp_path / "m.safetensors")
    params = {
        "parameterization": "v",
        "scale_factor": 0.5,
        "linear_start": 0.001,
        "linear_end": 0.02,
        "image_size": 96,
        "unet_config": {"params": {"num_head_channels": 32, "use_checkpoint": True}},
    }
    model = openldm.load(path, config=_yaml(tmp_path / "v.yaml", params))
    assert model.spec.prediction_type == "v"
    assert model.spec.vae.scale_factor == 0.5
    assert (model.spec.schedule.beta_start, model.spec.schedule.beta_end) == (0.001, 0.02)
    assert model.spec.image_size == 96 * 8
    assert (model.spec.unet.num_heads, model.spec.unet.num_head_channels) == (None, 32)
    # Without parameterization the reference means eps.
    eps = openldm.load(path, config=_yaml(tmp_path / "eps.yaml", {"scale_factor": 0.18215}))
    assert eps.spec.prediction_type == "eps"
    # The explicit option beats the yaml.
    assert openldm.load(path, config=tmp_path / "v.yaml", prediction_type="eps").spec.prediction_type == "eps"


def test_scheduler_config_prediction_and_override(tmp_path: Path, tokenizer_files: Path) -> None:
    orig = _original("sd2")
    folder = _write_diffusers(orig, tmp_path / "v", tokenizer_files, "v_prediction")
    assert openldm.load(folder).spec.prediction_type == "v"
    assert openldm.load(folder, prediction_type="eps").spec.prediction_type == "eps"
    eps_folder = _write_diffusers(orig, tmp_path / "eps", tokenizer_files, "epsilon")
    assert openldm.load(eps_folder).spec.prediction_type == "eps"


def test_default_prediction_is_logged_with_how_to_override(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_single_file(_original("sd2"), tmp_path / "m.safetensors")
    with caplog.at_level(logging.INFO, logger="openldm"):
        model = openldm.load(path)
    assert model.spec.prediction_type == "eps"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prediction_type=" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert any("EMA" in r.getMessage() for r in caplog.records)


def test_preset_spec_is_used_and_must_match(tmp_path: Path) -> None:
    path = _write_single_file(_original("sd2"), tmp_path / "m.safetensors")
    model = openldm.load(path, preset=TINY["sd2-v"])
    assert model.spec == TINY["sd2-v"]  # name, image size and prediction type from the preset
    with pytest.raises(UnknownArchitectureError, match="sd2 model.*sd1 model"):
        openldm.load(path, preset=TINY["sd1"])


# --- dtypes --------------------------------------------------------------------------------------


def test_half_precision_file_keeps_its_dtype_unless_cast(tmp_path: Path) -> None:
    orig = _original("sd1")
    path = _write_single_file(orig, tmp_path / "m.safetensors", dtype=torch.float16)
    model = openldm.load(path)
    for net in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in net.parameters()} == {torch.float16}
    assert "float16" in describe(model)
    cast = openldm.load(path, dtype=torch.float32)
    for net in (cast.unet, cast.vae, cast.text_encoder):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    half = dict(model.unet.state_dict())
    for key, value in cast.unet.state_dict().items():
        assert torch.equal(value, half[key].float())


def test_bf16_ckpt_keeps_bf16(tmp_path: Path) -> None:
    path = _write_single_file(_original("sd2"), tmp_path / "m.ckpt", dtype=torch.bfloat16)
    model = openldm.load(path)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}


# --- errors --------------------------------------------------------------------------------------


def test_unrelated_model_is_unknown_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10))
    path = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(net.state_dict(), path)
    with pytest.raises(UnknownArchitectureError, match="no Stable Diffusion UNet") as info:
        openldm.load(path)
    assert str(path) in str(info.value)


def test_unknown_in_channels_is_unknown_architecture(tmp_path: Path) -> None:
    orig = _original("sd1")
    sd = _single_file_dict(orig)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 6, 3, 3)
    path = tmp_path / "six.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(UnknownArchitectureError, match="in_channels=6") as info:
        openldm.load(path)
    assert str(path) in str(info.value)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    sd = _single_file_dict(_original("sd1"))
    missing = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    del sd[missing]
    path = tmp_path / "missing.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(CheckpointError, match="input_blocks.1.0.in_layers.0.weight") as info:
        openldm.load(path)
    assert str(path) in str(info.value)

    sd = _single_file_dict(_original("sd1"))
    sd["lora_unet_down.alpha"] = torch.ones(())
    path = tmp_path / "unexpected.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(UnknownArchitectureError, match="lora_unet_down.alpha"):
        openldm.load(path)


def test_diffusers_folder_without_weights(tmp_path: Path, tokenizer_files: Path) -> None:
    folder = _write_diffusers(_original("sd1"), tmp_path / "pipe", tokenizer_files, None)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="unet"):
        openldm.load(folder)
    with pytest.raises(MissingWeightsError, match="fp16"):  # an explicit variant has no fallback
        openldm.load(
            _write_diffusers(_original("sd1"), tmp_path / "b", tokenizer_files, None), variant="fp16"
        )


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="no such file"):
        openldm.load(tmp_path / "nothing.safetensors")


def test_hub_id_offline_says_where_to_put_the_files(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "import openldm\n"
        "from openldm.checkpoints.errors import MissingWeightsError\n"
        "try:\n"
        "    openldm.load('openldm-tests/not-a-real-model')\n"
        "except MissingWeightsError as e:\n"
        "    print('MISSING', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MISSING openldm-tests/not-a-real-model")
    assert "model_index.json" in result.stdout and "HF_HUB_OFFLINE" in result.stdout


def test_describe(tmp_path: Path) -> None:
    path = _write_single_file(_original("x4-upscaler"), tmp_path / "x4.safetensors")
    text = describe(openldm.load(path))
    assert "x4-upscaler" in text and "prediction v" in text and "scale factor 0.08333" in text
    assert "low_scale_model" in text and "float32" in text
