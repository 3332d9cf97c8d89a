"""Where the models shipped in the package live: the embedded default model and its variants
(:mod:`openldm.embedded` says what they are and loads them)."""

from __future__ import annotations

from pathlib import Path

from openldm.checkpoints.errors import MissingWeightsError

EMBEDDED_FILE = Path(__file__).resolve().parent.parent / "data" / "embedded.safetensors"
EMBEDDED_PRESET = "embedded"
# The UNet-only variants trained from the base (openldm train --stage inpaint|depth): kind -> preset.
VARIANT_PRESETS = {"inpaint": "embedded-inpaint", "depth": "embedded-depth"}


def variant_file(kind: str) -> Path:
    """Where the packaged ``kind`` variant ("inpaint" or "depth") lives."""
    if kind not in VARIANT_PRESETS:
        raise ValueError(f"unknown embedded variant {kind!r}; expected one of {tuple(VARIANT_PRESETS)}")
    return EMBEDDED_FILE.with_name(f"embedded-{kind}.safetensors")


def embedded_file(kind: str | None = None) -> Path:
    """The packaged weights of the base model (``kind`` None) or of a variant;
    :class:`MissingWeightsError` when the installation lacks them."""
    path = EMBEDDED_FILE if kind is None else variant_file(kind)
    if not path.is_file():
        what = "default model" if kind is None else f"{kind} variant"
        rebuild = (
            "openldm train --out runs/embedded --export openldm/data/embedded.safetensors"
            if kind is None
            else f"openldm train --stage {kind} --out runs/embedded-{kind}"
        )
        raise MissingWeightsError(
            path,
            f"the embedded {what} is missing from this installation",
            f"Reinstall openldm (the wheel ships {path.name}), rebuild it with `{rebuild}`, "
            "or pass a checkpoint of your own (load(path), --ckpt PATH)",
        )
    return path


CONTROLNET_FILE = EMBEDDED_FILE.with_name("embedded-controlnet.safetensors")


def embedded_controlnet_file() -> Path:
    """The packaged ControlNet of the embedded model (shapes placed by their outlines)."""
    if not CONTROLNET_FILE.is_file():
        raise MissingWeightsError(
            CONTROLNET_FILE,
            "the embedded model's ControlNet is missing from this installation",
            "Reinstall openldm, rebuild it with `openldm train --stage controlnet --out runs/controlnet "
            "--export openldm/data/embedded-controlnet.safetensors`, or pass --controlnet PATH",
        )
    return CONTROLNET_FILE
