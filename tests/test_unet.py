"""The UNet against diffusers' UNet2DConditionModel, the diffusers key map, config translation
and config inference, for every tiny variant (and every real preset where it costs nothing)."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from openldm.checkpoints.formats.unet import (
    UnsupportedUNetError,
    infer_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from openldm.config import PRESETS, UNetConfig
from openldm.nn.unet import UNetModel
from tests.helpers import assert_close_rel
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

TINY_UNETS = {name: spec.unet for name, spec in TINY.items()}
PRESET_UNETS = {name: spec.unet for name, spec in PRESETS.items()}
SEED = 1234


pytestmark = pytest.mark.usefixtures("single_thread")


def diffusers_unet_config(cfg: UNetConfig) -> dict[str, Any]:
    """The config of the diffusers UNet2DConditionModel that matches ``cfg``."""
    return {**unet_config_to_diffusers(cfg), "sample_size": 16}


def normalized(cfg: UNetConfig) -> UNetConfig:
    """``cfg`` with attention_resolutions sorted (the presets list them in either order)."""
    return dataclasses.replace(cfg, attention_resolutions=tuple(sorted(cfg.attention_resolutions)))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values (zero-initialised convs included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)


@functools.cache
def random_diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """A diffusers UNet with seeded random weights (cached: tests only read it)."""
    torch.manual_seed(SEED)
    model = UNet2DConditionModel(**diffusers_unet_config(cfg)).eval()
    randomize_(model, SEED)
    return model


def random_inputs(cfg: UNetConfig, size: int = 16) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(SEED + 1)
    y: torch.Tensor | None = None
    if isinstance(cfg.num_classes, int):
        y = torch.randint(0, cfg.num_classes, (2,), generator=gen)
    elif cfg.num_classes == "sequential":
        assert cfg.adm_in_channels is not None
        y = torch.randn(2, cfg.adm_in_channels, generator=gen)
    return {
        "x": torch.randn(2, cfg.in_channels, size, size, generator=gen),
        "timesteps": torch.randint(0, 1000, (2,), generator=gen),
        "context": torch.randn(2, 7, cfg.context_dim, generator=gen),
        "y": y,
    }


def run_diffusers(model: UNet2DConditionModel, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["x"],
            inputs["timesteps"],
            encoder_hidden_states=inputs["context"],
            class_labels=inputs["y"],
        ).sample


def run_ours(model: UNetModel, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], context=inputs["context"], y=inputs["y"])


def ours_from(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        model = UNetModel(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def oracle_and_ours(cfg: UNetConfig) -> tuple[UNet2DConditionModel, UNetModel]:
    """diffusers' UNet with seeded random weights, and ours with the same weights."""
    reference = random_diffusers_unet(cfg)
    return reference, ours_from(unet_from_diffusers(reference.state_dict(), cfg), cfg)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_matches_diffusers(name: str) -> None:
    cfg = TINY_UNETS[name]
    reference, ours = oracle_and_ours(cfg)
    inputs = random_inputs(cfg)
    expected = run_diffusers(reference, inputs)
    assert expected.abs().max() > 1e-2, "reference output is trivially small"
    err = assert_close_rel(run_ours(ours, inputs), expected, tol=1e-4)
    print(f"{name}: fp32 relative error vs diffusers {err:.2e}")


@pytest.mark.parametrize("name", TINY_UNETS)
def test_key_map_round_trip(name: str) -> None:
    cfg = TINY_UNETS[name]
    sd = random_diffusers_unet(cfg).state_dict()
    ours = unet_from_diffusers(sd, cfg)
    back = unet_to_diffusers(ours, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_key_map_rejects_foreign_keys(name: str) -> None:
    cfg = TINY_UNETS[name]
    with pytest.raises(KeyError, match="does not belong"):
        unet_from_diffusers({"down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}, cfg)
    with pytest.raises(KeyError, match="does not belong"):
        unet_to_diffusers({"input_blocks.1.7.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize(
    "cfg", [*TINY_UNETS.values(), *PRESET_UNETS.values()], ids=[*TINY_UNETS, *PRESET_UNETS]
)
def test_config_round_trip_through_diffusers(cfg: UNetConfig) -> None:
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == normalized(cfg)


def reference_yaml(cfg: UNetConfig) -> dict[str, Any]:
    """A reference ``v*-inference.yaml`` model section for ``cfg`` (the fields the configs set)."""
    params: dict[str, Any] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "attention_resolutions": list(cfg.attention_resolutions),
        "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": list(cfg.channel_mult),
        "transformer_depth": cfg.transformer_depth,
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
    }
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    if cfg.disable_self_attentions is not None:
        params["disable_self_attentions"] = list(cfg.disable_self_attentions)
    if cfg.num_classes is not None:
        params["num_classes"] = cfg.num_classes
    if cfg.adm_in_channels is not None:
        params["adm_in_channels"] = cfg.adm_in_channels
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


@pytest.mark.parametrize("name", PRESET_UNETS)
def test_config_from_diffusers_agrees_with_diffusers_reading_of_reference_yaml(name: str) -> None:
    """diffusers' own yaml -> config.json translation, read back by us, gives the preset.

    This checks the head-count reading of ``attention_head_dim`` independently of our writer.
    diffusers leaves upcast_attention to the caller, so it is compared separately.
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    cfg = PRESET_UNETS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = create_unet_diffusers_config_from_ldm(reference_yaml(cfg), {}, image_size=512)
    read = unet_config_from_diffusers({**theirs, "upcast_attention": cfg.upcast_attention})
    assert read == normalized(cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"attention_head_dim": [1, 3, 5]}, "attention_head_dim"),
        ({"layers_per_block": [2, 1, 2]}, "layers_per_block"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]}, "mirror"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"mid_block_type": None}, "mid_block_type"),
    ],
)
def test_config_from_diffusers_rejects_what_it_cannot_represent(change: dict[str, Any], message: str) -> None:
    config = {**unet_config_to_diffusers(TINY_UNETS["sd2"]), **change}
    with pytest.raises(UnsupportedUNetError, match=message):
        unet_config_from_diffusers(config)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_infer_config_tiny(name: str) -> None:
    cfg = TINY_UNETS[name]
    torch.manual_seed(0)
    assert normalized(infer_unet_config(UNetModel(cfg).state_dict())) == normalized(cfg)


@pytest.mark.parametrize("name", PRESET_UNETS)
def test_infer_config_presets(name: str) -> None:
    cfg = PRESET_UNETS[name]
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    assert normalized(infer_unet_config(sd)) == normalized(cfg)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_original_keys_load_in_diffusers_from_single_file(name: str, tmp_path: Path) -> None:
    """Our state dict, saved as an original single file, is read by diffusers' own converter."""
    from safetensors.torch import save_file

    cfg = TINY_UNETS[name]
    torch.manual_seed(SEED)
    ours = UNetModel(cfg).eval()
    randomize_(ours, SEED + 2)
    sd = ours.state_dict()
    path = tmp_path / "model.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    (tmp_path / "repo" / "unet").mkdir(parents=True)
    (tmp_path / "repo" / "unet" / "config.json").write_text(json.dumps(diffusers_unet_config(cfg)))

    theirs = UNet2DConditionModel.from_single_file(
        str(path), config=str(tmp_path / "repo"), subfolder="unet", local_files_only=True
    )
    expected = unet_to_diffusers(sd, cfg)
    loaded = theirs.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    inputs = random_inputs(cfg)
    assert_close_rel(run_ours(ours, inputs), run_diffusers(theirs, inputs), tol=1e-4)


def test_meta_build_and_assign_load() -> None:
    with torch.device("meta"):
        big = UNetModel(PRESETS["sd15"].unet)
    assert all(p.is_meta for p in big.parameters())

    cfg = TINY_UNETS["unclip"]
    torch.manual_seed(0)
    source = UNetModel(cfg).eval()
    randomize_(source, 0)
    loaded = ours_from(source.state_dict(), cfg)
    assert not any(p.is_meta for p in loaded.parameters())
    inputs = random_inputs(cfg)
    assert torch.equal(run_ours(loaded, inputs), run_ours(source, inputs))


def test_class_input_errors() -> None:
    x4 = UNetModel(TINY_UNETS["x4-upscaler"])
    inputs = random_inputs(TINY_UNETS["x4-upscaler"])
    with pytest.raises(ValueError, match="class-conditioned"):
        x4(inputs["x"], inputs["timesteps"], context=inputs["context"])
    sd1 = UNetModel(TINY_UNETS["sd1"])
    inputs = random_inputs(TINY_UNETS["sd1"])
    with pytest.raises(ValueError, match="no class conditioning"):
        sd1(inputs["x"], inputs["timesteps"], context=inputs["context"], y=torch.zeros(2, dtype=torch.long))


def test_upcast_attention_keeps_dtype() -> None:
    cfg = TINY_UNETS["sd2"]
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    randomize_(model, 0)
    inputs = random_inputs(cfg, size=8)
    reference = run_ours(model, inputs)
    out = run_ours(model.to(torch.bfloat16), inputs)
    assert out.dtype == torch.float32  # the output follows the input's dtype
    assert_close_rel(out, reference, tol=0.1)


def test_latents_not_multiple_of_8_line_up_with_their_skips() -> None:
    """Sides that the fixed 2x upsampling of the reference cannot handle (9 -> 5 -> 3 -> 5 != 6)."""
    torch.manual_seed(0)
    unet = UNetModel(TINY["sd1"].unet).eval()
    x = torch.randn(1, 4, 9, 13)
    context = torch.randn(1, 77, TINY["sd1"].unet.context_dim)
    with torch.no_grad():
        out = unet(x, torch.tensor([10]), context=context)
    assert out.shape == x.shape and torch.isfinite(out).all()


def twin_inputs(cfg: UNetConfig) -> dict[str, torch.Tensor | None]:
    """Classifier-free guidance's call: latents, timesteps and class input doubled, two contexts."""
    inputs = random_inputs(cfg)
    for key in ("x", "timesteps", "y"):
        value = inputs[key]
        if value is not None:
            inputs[key] = torch.cat([value[:1], value[:1]])
    return inputs


def first_attention_batches(model: UNetModel, inputs: dict[str, torch.Tensor | None]) -> list[int]:
    """The batch each first attention (attn1) of the UNet's transformer blocks receives, in order."""
    seen: list[int] = []
    hooks = [
        module.attn1.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
        for module in model.modules()
        if hasattr(module, "attn1")
    ]
    try:
        run_ours(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("name", TINY_UNETS)
def test_twin_halves_run_once_up_to_the_context_and_match_diffusers(name: str) -> None:
    cfg = TINY_UNETS[name]
    reference, ours = oracle_and_ours(cfg)
    inputs = twin_inputs(cfg)
    assert_close_rel(run_ours(ours, inputs), run_diffusers(reference, inputs), tol=1e-4)
    batches = first_attention_batches(ours, inputs)
    # The first transformer's self-attention runs on one half; with self-attention turned off at
    # level 0 (the x4 upscaler) its first attention reads the context, so the whole batch.
    first_is_self = not (cfg.disable_self_attentions or (False,))[0]
    assert batches[0] == (1 if first_is_self else 2)
    assert batches[1:] == [2] * (len(batches) - 1)


def tiny_ours(name: str) -> UNetModel:
    return oracle_and_ours(TINY_UNETS[name])[1]


def test_halves_that_differ_run_as_a_whole() -> None:
    inputs = twin_inputs(TINY_UNETS["unclip"])
    assert inputs["y"] is not None
    inputs["y"] = torch.cat([torch.zeros_like(inputs["y"][:1]), inputs["y"][:1]])  # unCLIP's guidance
    assert set(first_attention_batches(tiny_ours("unclip"), inputs)) == {2}


def test_twin_halves_run_as_a_whole_when_computing_gradients() -> None:
    with torch.enable_grad():  # training: one path for the backward pass
        model, inputs = tiny_ours("sd1"), twin_inputs(TINY_UNETS["sd1"])
        seen: list[int] = []
        first = next(module for module in model.modules() if hasattr(module, "attn1"))
        first.attn1.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
        model(inputs["x"], inputs["timesteps"], context=inputs["context"])
    assert seen == [2]
