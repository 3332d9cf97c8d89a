"""LoRA training: trainable low-rank changes beside a loaded model's layers, saved as kohya's files.

:func:`inject` puts a :class:`LoraLayer` in place of each target layer — the transformer blocks'
attention, projection and feed-forward layers of the UNet, and optionally the text encoder's attention
and MLP layers: ``base(x) + up(down(x)) * alpha / rank``, ``up`` starting at zero so the model starts
unchanged, the base frozen. :meth:`LoraNetwork.save` writes the changes under the names the web UI,
kohya's scripts and diffusers' ``load_lora_weights`` read (``lora_unet_down_blocks_0_attentions_0_
proj_in.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), which :mod:`openldm.adapters` reads back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from openldm.adapters.names import Layer, Network
from openldm.checkpoints.formats.unet import unet_key_to_diffusers
from openldm.config import UNetConfig
from openldm.files import replaced_when_done

UNET_TARGETS = (
    ".attn1.to_q",
    ".attn1.to_k",
    ".attn1.to_v",
    ".attn1.to_out.0",
    ".attn2.to_q",
    ".attn2.to_k",
    ".attn2.to_v",
    ".attn2.to_out.0",
    ".proj_in",
    ".proj_out",
    ".ff.net.0.proj",
    ".ff.net.2",
)
TEXT_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


class LoraLayer(nn.Module):
    """A frozen linear layer (or 1x1 convolution) plus a trainable low-rank change."""

    def __init__(
        self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        conv = isinstance(base, nn.Conv2d)
        if conv and base.kernel_size != (1, 1):
            raise ValueError(
                f"LoRA layers wrap linear layers and 1x1 convolutions, not {base.kernel_size} ones"
            )
        width_in = base.in_channels if conv else base.in_features
        width_out = base.out_channels if conv else base.out_features
        rank = min(rank, width_in, width_out)
        make = (
            (lambda i, o: nn.Conv2d(i, o, 1, bias=False))
            if conv
            else (lambda i, o: nn.Linear(i, o, bias=False))
        )
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.down = make(width_in, rank).to(weight.device, torch.float32)
        self.up = make(rank, width_out).to(weight.device, torch.float32)
        bound = 1 / math.sqrt(width_in)  # kaiming-uniform with a = sqrt(5), as nn.Linear starts
        with torch.no_grad():
            self.down.weight.copy_(
                torch.empty(self.down.weight.shape).uniform_(-bound, bound, generator=generator)
            )
            self.up.weight.zero_()
        self.rank, self.alpha = rank, float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = self.up(self.down(x.to(self.down.weight.dtype))) * self.scale
        return self.base(x) + change.to(x.dtype)


@dataclass
class LoraNetwork:
    """The injected layers of one training run, by the layer they wrap."""

    layers: dict[Layer, LoraLayer]
    unet_config: UNetConfig

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down.weight, layer.up.weight)]

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The changes under kohya's names (diffusers' module paths for the UNet), float32."""
        out: dict[str, torch.Tensor] = {}
        for layer, lora in self.layers.items():
            if layer.network == "unet":
                path = unet_key_to_diffusers(layer.path + ".weight", self.unet_config)[: -len(".weight")]
                name = "lora_unet_" + path.replace(".", "_")
            else:
                name = "lora_te_" + layer.path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = lora.down.weight.detach().float().contiguous().cpu()
            out[f"{name}.lora_up.weight"] = lora.up.weight.detach().float().contiguous().cpu()
            out[f"{name}.alpha"] = torch.tensor(lora.alpha)
        return out

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA as a ``.safetensors`` file, whole or not at all."""
        from safetensors.torch import save_file

        path = Path(path)
        with replaced_when_done(path) as temporary:
            save_file(
                self.kohya_state_dict(),
                str(temporary),
                metadata={"ss_network_module": "networks.lora", **(metadata or {})},
            )
        return path

    def remove(self, networks: dict[Network, nn.Module]) -> None:
        """Put the wrapped layers back (the model is as it was before :func:`inject`)."""
        for layer, lora in self.layers.items():
            _replace(networks[layer.network], layer.path, lora.base)
        self.layers = {}


def _replace(network: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(network.get_submodule(parent_path) if parent_path else network, name, module)


def inject(
    networks: dict[Network, nn.Module],
    unet_config: UNetConfig,
    rank: int = 16,
    alpha: float | None = None,
    text: bool = False,
    seed: int = 0,
) -> LoraNetwork:
    """Wrap the target layers of the UNet (and with ``text`` the text encoder's) in :class:`LoraLayer`
    s of ``rank`` and ``alpha`` (default: the rank, a scale of 1); the networks themselves are frozen."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    targets: dict[Network, tuple[str, ...]] = {
        "unet": UNET_TARGETS,
        "text_encoder": TEXT_TARGETS if text else (),
    }
    layers: dict[Layer, LoraLayer] = {}
    for network_name, suffixes in targets.items():
        network = networks[network_name].requires_grad_(False)
        found = [
            (path, module)
            for path, module in network.named_modules()
            if path.endswith(suffixes) and isinstance(module, nn.Linear | nn.Conv2d)
        ]
        for path, module in found:
            lora = LoraLayer(module, rank, alpha if alpha is not None else rank, generator)
            _replace(network, path, lora)
            layers[Layer(network_name, path)] = lora
    if not layers:
        raise ValueError("no layer of this model is a LoRA target (attention, projection, feed-forward)")
    return LoraNetwork(layers, unet_config)
