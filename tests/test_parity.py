"""End to end: every tiny variant, written in every on-disk format, loads into networks equal to
independent oracles (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, transformers
``CLIPTextModel`` and ``CLIPTokenizer``) in fp32.

The same random weights are written as a diffusers folder (as published: transformers 4.x text
encoder layout; one variant also in the 5.x layout as transformers saves it today) and as an
original single file (``.safetensors`` with a reference yaml, ``.ckpt`` with ``prediction_type=``),
then ``openldm.load`` reads each. Run with ``-s`` to see the table of relative errors.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

import openldm
from openldm.config import ModelSpec
from openldm.model import StableDiffusion
from tests.helpers import assert_close_rel
from tests.oracles import (
    DIFFUSERS_EXTRAS,
    Oracles,
    diffusers_extras,
    is_sd1,
    pad_token,
    single_file_extras,
    single_file_state_dict,
    text_oracle,
    unet_oracle,
    vae_oracle,
    write_diffusers_folder,
    write_reference_yaml,
    write_single_file,
)
from tests.tiny import TINY

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

FORMATS = ("diffusers", "safetensors", "ckpt")
TEXT_5X_VARIANT = "sd1"  # also loaded from a folder whose text encoder transformers 5.x saved
CASES = [(v, f) for v in TINY for f in FORMATS + (("diffusers-5x",) if v == TEXT_5X_VARIANT else ())]
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "A watercolor painting of a lighthouse at dawn, highly detailed, trending on artstation",
    " ".join(["a very long prompt about a cat sitting on a windowsill"] * 12),  # truncated at 77
]
PAD_IDS = {"<|endoftext|>": 49407, "!": 0}
TOL = 1e-4
SEED = 1234

# (variant, format) -> network -> max relative error, printed as a table when the module ends.
ERRORS: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
COLUMNS = ("unet", "vae-encode", "vae-decode", "text")


class World:
    """Oracles (built once per config), files (written once per variant) and loaded models."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._unets: dict[Any, torch.nn.Module] = {}
        self._vaes: dict[Any, torch.nn.Module] = {}
        self._texts: dict[Any, torch.nn.Module] = {}
        self._tokenizers: dict[str, Any] = {}
        self._written: str | None = None

    def oracles(self, variant: str) -> Oracles:
        spec = TINY[variant]
        if spec.unet not in self._unets:
            self._unets[spec.unet] = unet_oracle(spec.unet)
        if spec.vae not in self._vaes:
            self._vaes[spec.vae] = vae_oracle(spec.vae)
        if spec.text not in self._texts:
            self._texts[spec.text] = text_oracle(spec.text)
        return Oracles(self._unets[spec.unet], self._vaes[spec.vae], self._texts[spec.text])

    def tokenizer_oracle(self, spec: ModelSpec, folder: Path) -> Any:
        pad = pad_token(spec)
        if pad not in self._tokenizers:
            self._tokenizers[pad] = transformers.CLIPTokenizer(
                str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad
            )
        return self._tokenizers[pad]

    def _write(self, variant: str) -> Path:
        """All formats of one variant; the previous variant's files are removed (they are large)."""
        folder = self.root / variant
        if self._written == variant:
            return folder
        if self._written is not None:
            shutil.rmtree(self.root / self._written, ignore_errors=True)
        spec, oracles = TINY[variant], self.oracles(variant)
        write_diffusers_folder(folder / "diffusers", variant, spec, oracles, text_5x=False)
        if variant == TEXT_5X_VARIANT:
            write_diffusers_folder(folder / "diffusers-5x", variant, spec, oracles, text_5x=True)
        sd = single_file_state_dict(variant, spec, oracles)
        write_single_file(folder / "model.safetensors", sd)
        write_single_file(folder / "model.ckpt", sd)
        write_reference_yaml(folder / "model.yaml", spec)
        self._written = variant
        return folder

    def load(self, variant: str, fmt: str) -> StableDiffusion:
        folder, spec = self._write(variant), TINY[variant]
        if fmt.startswith("diffusers"):
            return openldm.load(folder / fmt)
        if fmt == "safetensors":  # prediction type (and sizes, schedule, scale) from the yaml
            return openldm.load(folder / "model.safetensors", config=folder / "model.yaml")
        return openldm.load(folder / "model.ckpt", prediction_type=spec.prediction_type)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", autouse=True)
def _error_table():
    yield
    if not ERRORS:
        return
    lines = [f"{'variant':<12} {'format':<13} " + " ".join(f"{c:>11}" for c in COLUMNS)]
    for (variant, fmt), errs in ERRORS.items():
        cells = " ".join(f"{errs[c]:>11.2e}" if c in errs else f"{'-':>11}" for c in COLUMNS)
        lines.append(f"{variant:<12} {fmt:<13} {cells}")
    print("\nfp32 max relative error vs the oracles (tolerance 1e-4):\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}-{f}" for v, f in CASES])
def case(request: pytest.FixtureRequest, world: World) -> tuple[str, str, StableDiffusion, Oracles]:
    """One (variant, format) loaded; module scope with params groups the tests of a case together."""
    variant, fmt = request.param
    return variant, fmt, world.load(variant, fmt), world.oracles(variant)


def _record(variant: str, fmt: str, network: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 1e-2, f"{network}: the oracle's output is trivially small"
    ERRORS[(variant, fmt)][network] = assert_close_rel(actual, expected, TOL)


def test_spec(case) -> None:
    variant, fmt, model, _ = case
    expected = TINY[variant]
    spec = model.spec
    assert spec.variant == expected.variant
    assert spec.prediction_type == expected.prediction_type
    assert spec.vae.scale_factor == (0.08333 if variant == "x4-upscaler" else 0.18215)
    assert spec.unet == expected.unet
    assert spec.vae == expected.vae
    assert spec.text == expected.text
    assert spec.schedule == expected.schedule


@torch.no_grad()
def test_unet(case) -> None:
    variant, fmt, model, oracles = case
    cfg = TINY[variant].unet
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    context = torch.randn(2, 77, cfg.context_dim, generator=gen)
    y = None
    if isinstance(cfg.num_classes, int):  # the x4 upscaler's noise level
        y = torch.randint(0, 1000, (2,), generator=gen)
    elif cfg.num_classes == "sequential":  # unCLIP's noised image embedding
        assert cfg.adm_in_channels is not None
        y = torch.randn(2, cfg.adm_in_channels, generator=gen)
    expected = oracles.unet(x, t, encoder_hidden_states=context, class_labels=y).sample
    _record(variant, fmt, "unet", model.unet(x, t, context=context, y=y), expected)


@torch.no_grad()
def test_vae(case) -> None:
    variant, fmt, model, oracles = case
    cfg = TINY[variant].vae
    gen = torch.Generator().manual_seed(SEED + 1)
    image = torch.rand(2, cfg.in_channels, 32, 32, generator=gen) * 2 - 1
    side = 32 // cfg.downsampling_factor
    z = torch.randn(2, cfg.embed_dim, side, side, generator=gen)
    expected_mean = oracles.vae.encode(image).latent_dist.mean
    _record(variant, fmt, "vae-encode", model.vae.encode(image).mean, expected_mean)
    _record(variant, fmt, "vae-decode", model.vae.decode(z), oracles.vae.decode(z).sample)


def test_tokenizer(case, world: World) -> None:
    variant, fmt, model, _ = case
    spec = TINY[variant]
    oracle = world.tokenizer_oracle(spec, world.root / variant / "diffusers" / "tokenizer")
    expected = oracle(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = model.tokenizer(PROMPTS)
    assert model.tokenizer.pad_token_id == PAD_IDS[pad_token(spec)] == (49407 if is_sd1(spec) else 0)
    assert torch.equal(ids, expected["input_ids"])
    assert (ids[1, 2:] == model.tokenizer.pad_token_id).all()  # the empty prompt: start, end, padding


@torch.no_grad()
def test_text_encoder(case) -> None:
    variant, fmt, model, oracles = case
    ids = model.tokenizer(PROMPTS)
    expected = oracles.text(input_ids=ids).last_hidden_state
    _record(variant, fmt, "text", model.text_encoder(ids), expected)


def test_extras(case) -> None:
    """Components recognised but not built come back untouched; the safety checker is never read."""
    variant, fmt, model, _ = case
    if fmt.startswith("diffusers"):
        expected = {name: tensors for name, (_, tensors) in diffusers_extras(variant).items()}
        assert set(DIFFUSERS_EXTRAS.get(variant, {})) == set(expected)
    else:
        expected = defaultdict(dict)
        for key, value in single_file_extras(variant).items():
            prefix, rest = key.split(".", 1)
            expected[prefix][rest] = value
    assert model.extras.keys() == expected.keys()
    for name, tensors in expected.items():
        assert model.extras[name].keys() == tensors.keys()
        assert all(torch.equal(model.extras[name][k], v) for k, v in tensors.items())


def test_text_encoder_files_have_the_layouts_under_test(world: World) -> None:
    """The 4.x folder has ``text_model.`` keys, the folder transformers saved today has none."""
    from safetensors import safe_open

    world.load(TEXT_5X_VARIANT, "diffusers")  # writes the files if another variant's are on disk
    folder = world.root / TEXT_5X_VARIANT
    for name, prefixed in (("diffusers", True), ("diffusers-5x", False)):
        with safe_open(folder / name / "text_encoder" / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("text_model.") == prefixed for k in keys), name
