"""Full-size parity, run by hand: ``python -m pytest -m slow -s tests/test_full_size.py``.

For the real SD 1.5 and SD 2.1 (768-v) sizes with random weights, each network of openldm against its
oracle (diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers' ``CLIPTextModel``)
built from the real configs, in fp32, relative error <= 1e-4. Then the same weights are written as an
original single ``.safetensors`` file (fp32 for SD 1.5, fp16 for SD 2.1 as published) and loaded
with ``openldm.load``; the loaded networks must reproduce the oracle (for fp16 on disk: the oracle
with its weights rounded to fp16 the same way, both computing in fp32).

Each test holds one full-size model (about 5 GB for SD 2.1 in fp32, plus a copy of the weights
while the file is written) and takes a few minutes on 2 cores. The multi-GB files are deleted.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import openldm
from openldm.checkpoints.formats.clip import (
    text_config_to_transformers,
    text_from_transformers,
    text_to_open_clip,
)
from openldm.checkpoints.formats.unet import unet_config_to_diffusers, unet_from_diffusers
from openldm.checkpoints.formats.vae import vae_config_to_diffusers, vae_from_diffusers
from openldm.config import PRESETS, ModelSpec
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.tokenizer import CLIPTokenizer
from tests.helpers import relative_error

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
PROMPTS = [
    "a photograph of an astronaut riding a horse on mars",
    "a watercolor painting of a red fox in the snow, highly detailed",
]
# (latent side, batch) of the UNet forward, and the dtype of the single file on disk.
CASES = {
    "sd15": {"latent": 64, "batch": 2, "disk_dtype": torch.float32, "prediction": "eps"},
    "sd2-v": {"latent": 96, "batch": 1, "disk_dtype": torch.float16, "prediction": "v"},
}


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder on /tmp for the multi-GB files, removed whatever happens (pytest's tmp_path keeps them)."""
    folder = Path(tempfile.mkdtemp(prefix="openldm-full-size-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- random weights ----------------------------------------------------------------------------


def randomize_(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter (zero-initialised ones too) with seeded, well-scaled random values.

    Matrices and kernels get a variance of 1/fan_in, so activations keep their size through the
    full depth and the comparison is of well-conditioned numbers; norm scales sit around 1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:
                is_scale = "norm" in name and name.endswith("weight")
                param.copy_(1.0 + 0.1 * noise if is_scale else 0.05 * noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)


def round_to_fp16_(module: nn.Module) -> None:
    """Round the weights to fp16 precision in place, keeping fp32 storage (what an fp16 file holds)."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.half().float())


# --- oracles and our networks sharing their weights --------------------------------------------


@dataclass
class Networks:
    """The three oracle networks and ours built from the same tensors."""

    spec: ModelSpec
    unet_ref: nn.Module
    vae_ref: nn.Module
    text_ref: nn.Module
    unet: UNetModel
    vae: AutoencoderKL
    text: CLIPTextEncoder

    def oracles(self) -> tuple[nn.Module, ...]:
        return self.unet_ref, self.vae_ref, self.text_ref


def _ours(cls: type[nn.Module], config: object, sd: dict[str, torch.Tensor]) -> nn.Module:
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def build_networks(name: str) -> Networks:
    spec = PRESETS[name]
    unet_ref = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(spec.unet)).eval()
    randomize_(unet_ref, 1)
    vae_ref = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(spec.vae)).eval()
    randomize_(vae_ref, 2)
    text_config = transformers.CLIPTextConfig(
        **text_config_to_transformers(spec.text), attn_implementation="eager"
    )
    text_ref = transformers.CLIPTextModel(text_config).eval()
    randomize_(text_ref, 3)
    return Networks(
        spec,
        unet_ref,
        vae_ref,
        text_ref,
        _ours(UNetModel, spec.unet, unet_from_diffusers(unet_ref.state_dict(), spec.unet)),
        _ours(AutoencoderKL, spec.vae, vae_from_diffusers(vae_ref.state_dict(), spec.vae)),
        _ours(CLIPTextEncoder, spec.text, text_from_transformers(text_ref.state_dict())),
    )


# --- inputs and outputs ------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    image: torch.Tensor
    latent: torch.Tensor
    ids: torch.Tensor


def make_inputs(name: str) -> Inputs:
    spec, case = PRESETS[name], CASES[name]
    gen = torch.Generator().manual_seed(7)
    side, batch = case["latent"], case["batch"]
    return Inputs(
        x=torch.randn(batch, spec.unet.in_channels, side, side, generator=gen),
        timesteps=torch.tensor([981, 37][:batch]),
        context=torch.randn(batch, spec.text.max_length, spec.unet.context_dim, generator=gen),
        image=torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1,
        latent=torch.randn(1, spec.vae.embed_dim, 32, 32, generator=gen),
        ids=CLIPTokenizer.for_config(spec.text)(PROMPTS),
    )


Outputs = dict[str, torch.Tensor]


@torch.no_grad()
def oracle_outputs(nets: Networks, inputs: Inputs) -> Outputs:
    return {
        "unet": nets.unet_ref(inputs.x, inputs.timesteps, encoder_hidden_states=inputs.context).sample,
        "vae encode mean": nets.vae_ref.encode(inputs.image).latent_dist.mean,
        "vae decode": nets.vae_ref.decode(inputs.latent).sample,
        "text encoder": nets.text_ref(input_ids=inputs.ids).last_hidden_state,
    }


@torch.no_grad()
def our_outputs(unet: UNetModel, vae: AutoencoderKL, text: CLIPTextEncoder, inputs: Inputs) -> Outputs:
    return {
        "unet": unet(inputs.x, inputs.timesteps, context=inputs.context),
        "vae encode mean": vae.encode(inputs.image).mean,
        "vae decode": vae.decode(inputs.latent),
        "text encoder": text(inputs.ids),
    }


def compare(label: str, actual: Outputs, expected: Outputs) -> dict[str, float]:
    """Relative error per output, printed; every output must be non-trivial and within tolerance."""
    errors = {}
    for key, value in expected.items():
        assert value.abs().max() > 1e-2, f"{label} {key}: the oracle output is trivially small"
        assert torch.isfinite(value).all(), f"{label} {key}: the oracle output is not finite"
        errors[key] = relative_error(actual[key], value)
        print(f"  {label:<28} {key:<16} relative error {errors[key]:.2e}")
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"{label}: relative error above {TOLERANCE:.0e}: {bad}"
    return errors


# --- the original single file ------------------------------------------------------------------


def single_file_dict(nets: Networks, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The original layout: ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``."""
    sd = {f"model.diffusion_model.{k}": v for k, v in nets.unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in nets.vae.state_dict().items()}
    text = nets.text.state_dict()
    if nets.spec.text.activation == "quick_gelu":  # SD 1: transformers' CLIP-L below .transformer.
        sd |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # SD 2: OpenCLIP, all 24 resblocks (the last is never run), projection and logit scale
        gen = torch.Generator().manual_seed(4)
        layer0 = "text_model.encoder.layers.0."
        last = {
            k[len(layer0) :]: 0.02 * torch.randn(v.shape, generator=gen)
            for k, v in text.items()
            if k.startswith(layer0)
        }
        width = nets.spec.text.width
        projection = torch.randn(width, width, generator=gen) * width**-0.5
        oc = text_to_open_clip(text, [last], projection, torch.tensor(4.6052))
        sd |= {f"cond_stage_model.model.{k}": v for k, v in oc.items()}
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_single_file(nets: Networks, path: Path, dtype: torch.dtype) -> None:
    sd = single_file_dict(nets, dtype)
    safetensors.torch.save_file(sd, path)
    del sd
    gc.collect()


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_full_size_parity_and_single_file(name: str, scratch: Path) -> None:
    case = CASES[name]
    disk_dtype: torch.dtype = case["disk_dtype"]
    start = time.perf_counter()
    print(f"\n{name}: building the oracles (real configs, random weights) and ours")
    nets = build_networks(name)
    inputs = make_inputs(name)
    expected = oracle_outputs(nets, inputs)
    compare(f"{name} fp32", our_outputs(nets.unet, nets.vae, nets.text, inputs), expected)

    if disk_dtype != torch.float32:
        for module in nets.oracles():  # ours share these tensors: rounded too, as the file will be
            round_to_fp16_(module)
        expected = oracle_outputs(nets, inputs)
    path = scratch / f"{name}.safetensors"
    write_single_file(nets, path, disk_dtype)
    size_gb = path.stat().st_size / 1e9
    del nets
    gc.collect()

    loaded = openldm.load(path, prediction_type=case["prediction"], dtype=torch.float32)
    spec = PRESETS[name]
    assert loaded.spec.name == name
    assert (loaded.spec.unet, loaded.spec.vae, loaded.spec.text) == (spec.unet, spec.vae, spec.text)
    assert loaded.spec.prediction_type == spec.prediction_type
    assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())
    label = f"{name} via {str(disk_dtype).removeprefix('torch.')} file"
    compare(label, our_outputs(loaded.unet, loaded.vae, loaded.text_encoder, inputs), expected)
    del loaded
    gc.collect()
    path.unlink()
    print(f"  {name}: file {size_gb:.2f} GB, {time.perf_counter() - start:.0f} s in all")
