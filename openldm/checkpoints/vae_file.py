"""A VAE from its own file, to swap into a loaded model (the web UI's ``--vae``, e.g. ft-MSE).

Read: an original-format VAE file (``encoder.down.0...``, as ``vae-ft-mse-840000-ema-pruned``), the
same with the single file's ``first_stage_model.`` prefix, a diffusers ``AutoencoderKL`` file
(``encoder.down_blocks.0...``) or a diffusers ``vae/`` folder. The discriminator of a training
checkpoint (``loss.``) and EMA copies (``model_ema.``) are not part of the VAE and are left out; every
other key must be the VAE's, with its shape.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openldm.checkpoints.build import build_network, computed_like
from openldm.checkpoints.detect import VAE_PREFIX
from openldm.checkpoints.errors import AdapterError, CheckpointError
from openldm.checkpoints.formats.vae import vae_from_diffusers
from openldm.checkpoints.read import read_state_dict, weights_file
from openldm.nn.vae import AutoencoderKL

StateDict = dict[str, torch.Tensor]
_TRAINING_ONLY = ("loss.", "model_ema.")


def _our_layout(path: Path, sd: StateDict, vae: AutoencoderKL) -> StateDict:
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX) :]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        try:
            return vae_from_diffusers(sd, vae.config)
        except KeyError as e:
            raise AdapterError(
                path, f"a diffusers VAE that does not fit this model ({e.args[0]})", _ADVICE
            ) from None
    return sd


_ADVICE = "Use a VAE made for this model's family (SD 1.x and 2.x share one)"


def read_vae(path: str | os.PathLike[str], like: AutoencoderKL) -> AutoencoderKL:
    """A VAE with the weights in ``path``, the configuration, dtype and device of ``like``."""
    path = Path(path)
    file = weights_file(path, "VAE weights", "Pass a VAE file")
    parameter = next(like.parameters())
    try:
        sd = _our_layout(path, read_state_dict(file), like)
        vae = build_network(
            AutoencoderKL, like.config, sd, "VAE", os.fspath(path), parameter.dtype, parameter.device
        )
        return computed_like(vae, like)
    except AdapterError:
        raise
    except CheckpointError as e:
        raise AdapterError(path, e.problem, _ADVICE if "do not fit" in e.problem else e.advice) from None
