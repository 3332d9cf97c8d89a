"""The KL autoencoder against diffusers' AutoencoderKL (test-only oracle), in fp32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from openldm.checkpoints.formats.vae import (
    infer_vae_config,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from openldm.config import PRESETS, VAEConfig
from openldm.nn.vae import AutoencoderKL
from tests.helpers import assert_close_rel
from tests.tiny import TINY_VAE, TINY_X4_VAE

diffusers = pytest.importorskip("diffusers")

CONFIGS = {"sd": TINY_VAE, "x4": TINY_X4_VAE}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: every parameter random, norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name and param.ndim == 1
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.08 * noise)


def _diffusers_vae(config: VAEConfig, seed: int = 0) -> torch.nn.Module:
    widths = tuple(config.ch * m for m in config.ch_mult)
    vae = diffusers.AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=32,
        scaling_factor=config.scale_factor,
    )
    _randomize(vae, seed)
    return vae.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[VAEConfig, torch.nn.Module, AutoencoderKL]:
    config = CONFIGS[request.param]
    theirs = _diffusers_vae(config)
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ours.load_state_dict(vae_from_diffusers(theirs.state_dict(), config), assign=True, strict=True)
    return config, theirs, ours.eval()


def _image(config: VAEConfig, size: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, config.in_channels, size, size, generator=generator) * 2 - 1


def _latent(config: VAEConfig, size: int = 32, seed: int = 2) -> torch.Tensor:
    side = size // config.downsampling_factor
    return torch.randn(2, config.embed_dim, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_encoder_posterior_matches_diffusers(pair) -> None:
    config, theirs, ours = pair
    x = _image(config)
    expected = theirs.encode(x).latent_dist
    posterior = ours.encode(x)
    err_mean = assert_close_rel(posterior.mean, expected.mean)
    err_logvar = assert_close_rel(posterior.logvar, expected.logvar)
    err_std = assert_close_rel(posterior.std, expected.std)
    err_kl = assert_close_rel(posterior.kl(), expected.kl())
    print(
        f"\n{config.ch_mult}: mean {err_mean:.2e} logvar {err_logvar:.2e} std {err_std:.2e} kl {err_kl:.2e}"
    )


@torch.no_grad()
def test_decode_matches_diffusers(pair) -> None:
    config, theirs, ours = pair
    z = _latent(config)
    out = ours.decode(z)
    assert out.shape == (2, config.out_ch, 32, 32)
    err = assert_close_rel(out, theirs.decode(z).sample)
    print(f"\n{config.ch_mult}: decode {err:.2e}")


@torch.no_grad()
def test_scaled_latents_match_diffusers(pair) -> None:
    config, theirs, ours = pair
    x = _image(config)
    scale = theirs.config.scaling_factor
    err_to = assert_close_rel(ours.to_latent(x, sample=False), theirs.encode(x).latent_dist.mode() * scale)
    z = _latent(config)
    err_from = assert_close_rel(ours.from_latent(z), theirs.decode(z / scale).sample)
    print(f"\n{config.ch_mult}: to_latent {err_to:.2e} from_latent {err_from:.2e}")


@torch.no_grad()
def test_sample_is_seeded_and_matches_diffusers(pair) -> None:
    config, theirs, ours = pair
    x = _image(config)
    a = ours.to_latent(x, generator=torch.Generator().manual_seed(7))
    b = ours.to_latent(x, generator=torch.Generator().manual_seed(7))
    c = ours.to_latent(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    expected = theirs.encode(x).latent_dist.sample(torch.Generator().manual_seed(7)) * config.scale_factor
    assert_close_rel(a, expected)


def test_key_map_round_trip(pair) -> None:
    config, theirs, ours = pair
    sd = theirs.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(sd, config), config)
    assert back.keys() == sd.keys()
    for key, tensor in sd.items():
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    assert (
        vae_from_diffusers(vae_to_diffusers(ours.state_dict(), config), config).keys()
        == ours.state_dict().keys()
    )


def test_legacy_attention_names_load(pair) -> None:
    config, theirs, ours = pair
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for key, tensor in theirs.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[key] = tensor
    assert any(".query." in k for k in sd)
    converted = vae_from_diffusers(sd, config)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(converted[key], tensor), key


def test_key_map_rejects_missing_and_unexpected_keys(pair) -> None:
    config, theirs, _ = pair
    sd = dict(theirs.state_dict())
    with pytest.raises(KeyError, match="unexpected"):
        vae_from_diffusers({**sd, "encoder.extra.weight": torch.zeros(1)}, config)
    del sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    with pytest.raises(KeyError, match="upsamplers"):
        vae_from_diffusers(sd, config)


def test_config_translation(pair) -> None:
    config, theirs, _ = pair
    assert vae_config_from_diffusers(dict(theirs.config)) == config
    as_json = vae_config_to_diffusers(config)
    assert vae_config_from_diffusers(json.loads(json.dumps(as_json))) == config
    rebuilt = diffusers.AutoencoderKL.from_config(as_json)
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_config_from_diffusers({**as_json, "use_quant_conv": False})
    with pytest.raises(ValueError, match="embed_dim"):
        vae_config_to_diffusers(dataclasses.replace(config, embed_dim=3))


def test_infer_config_tiny(pair) -> None:
    config, _, ours = pair
    assert infer_vae_config(ours.state_dict(), config.scale_factor) == config
    prefixed = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="first_stage_model"):
        infer_vae_config(prefixed, config.scale_factor)


PRESET_VAES = {spec.vae: name for name, spec in PRESETS.items()}


@pytest.mark.parametrize("config", list(PRESET_VAES), ids=list(PRESET_VAES.values()))
def test_infer_config_presets(config: VAEConfig) -> None:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert infer_vae_config(model.state_dict(), config.scale_factor) == config


def test_real_sd_vae_has_the_original_parameter_count() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(PRESETS["sd15"].vae)
    # The released SD VAE: 248 tensors under first_stage_model., 83,653,863 parameters.
    assert len(model.state_dict()) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


@torch.no_grad()
def test_diffusers_single_file_loader_reads_our_keys(pair, tmp_path) -> None:
    """Diffusers' own original-checkpoint converter accepts our keys: they are the original names."""
    config, theirs, ours = pair
    path = tmp_path / "vae.safetensors"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    theirs.save_config(str(tmp_path / "vae_config"))
    loaded = diffusers.AutoencoderKL.from_single_file(
        str(path), config=str(tmp_path / "vae_config"), local_files_only=True
    )
    loaded_sd = loaded.state_dict()
    assert loaded_sd.keys() == theirs.state_dict().keys()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(loaded_sd[key], tensor), key
    z = _latent(config)
    assert torch.equal(loaded.decode(z).sample, theirs.decode(z).sample)
    assert_close_rel(ours.decode(z), loaded.decode(z).sample)


def test_bad_input_raises_clear_errors(pair) -> None:
    config, _, ours = pair
    f = config.downsampling_factor
    with pytest.raises(ValueError, match=f"multiples of {f}"):
        ours.encode(torch.zeros(1, 3, 32 + f // 2, 32))
    with pytest.raises(ValueError, match="3 channels"):
        ours.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4 channels"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="4-d"):
        ours.decode(torch.zeros(4, 4, 4))


def test_diffusers_config_refuses_a_first_level_wider_than_conv_in():
    from openldm.checkpoints.formats.vae import vae_config_to_diffusers

    assert vae_config_to_diffusers(VAEConfig(ch=64, ch_mult=(1, 1)))["block_out_channels"] == [64, 64]
    with pytest.raises(ValueError, match="ch_mult must start with 1"):
        vae_config_to_diffusers(VAEConfig(ch=32, ch_mult=(2, 2)))
