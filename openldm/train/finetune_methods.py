"""What each ``openldm finetune --method`` trains, and what it writes at the end.

A :class:`Trained` holds the trainable parameters in one module (what the training loop optimises,
averages, checkpoints and hands to DistributedDataParallel), a hook run before every forward pass, the
writer of the result, and the undoing of whatever it changed in the model:

- ``lora``: :class:`~openldm.train.lora.LoraLayer` s beside the UNet's (and with ``text_encoder`` the
  text encoder's) attention and feed-forward layers; writes ``lora.safetensors`` in kohya's names.
- ``textual-inversion``: the vectors of a new word; writes ``<word>.safetensors`` as the web UI does.
- ``full`` and ``dreambooth``: the UNet's own weights (and the text encoder's with ``text_encoder``);
  writes ``model.safetensors`` (the reference single file) and with ``diffusers`` a diffusers folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from openldm.adapters.embeddings import Embedding, install
from openldm.checkpoints.write import write_diffusers_folder, write_single_file
from openldm.files import replaced_when_done
from openldm.train.lora import inject

Method = Literal["full", "lora", "dreambooth", "textual-inversion"]
METHODS: tuple[Method, ...] = ("full", "lora", "dreambooth", "textual-inversion")


@dataclass
class Trained:
    module: nn.Module
    write: Callable[[Path, dict[str, str]], Path]
    undo: Callable[[], None]
    before_forward: Callable[[], None] = field(default=lambda: None)
    text_trained: bool = False


class _Vectors(nn.Module):
    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(start)


def prepare(model: Any, config: Any) -> Trained:
    """Make ``config.method``'s parameters trainable in ``model``; see the module docstring."""
    if config.method == "lora":
        return _lora(model, config)
    if config.method == "textual-inversion":
        return _textual_inversion(model, config)
    return _full(model, config)


def _lora(model: Any, config: Any) -> Trained:
    networks = {"unet": model.unet, "text_encoder": model.text_encoder}
    network = inject(networks, model.spec.unet, config.rank, config.alpha, config.text_encoder, config.seed)
    module = nn.ModuleList([m for layer in network.layers.values() for m in (layer.down, layer.up)])

    def write(out: Path, metadata: dict[str, str]) -> Path:
        return network.save(out / "lora.safetensors", metadata)

    return Trained(module, write, lambda: network.remove(networks), text_trained=config.text_encoder)


def _textual_inversion(model: Any, config: Any) -> Trained:
    if config.word is None or not config.init_word:
        raise ValueError(
            "textual inversion needs --word (the new word) and --init-word (a word to start from)"
        )
    ids = model.tokenizer.encode(config.init_word)
    if not ids:
        raise ValueError(f"--init-word {config.init_word!r} has no tokens")
    table = model.text_encoder.text_model.embeddings.token_embedding.weight.detach()
    start = table[ids].float().mean(0, keepdim=True).repeat(config.vectors, 1)
    word = Embedding(config.word.lower(), Path(config.word), start)
    install(model.tokenizer, model.text_encoder, [*model.adapters.embeddings, word])
    embeddings = model.text_encoder.text_model.embeddings
    added = embeddings.added
    own = added[: -config.vectors].detach() if added.shape[0] > config.vectors else None
    module = _Vectors(added[-config.vectors :].detach().clone().float())

    def table_now() -> None:  # the model's own added vectors, then the new word's as they are now
        vectors = module.vectors.to(added.dtype)  # a plain tensor (not the Parameter) is assigned
        embeddings.added = torch.cat([own, vectors]) if own is not None else vectors.clone()

    def write(out: Path, metadata: dict[str, str]) -> Path:
        return save_embedding(module.vectors.detach(), out / f"{config.word}.safetensors", metadata)

    def undo() -> None:
        install(model.tokenizer, model.text_encoder, model.adapters.embeddings)

    return Trained(module, write, undo, table_now, text_trained=True)


def save_embedding(vectors: torch.Tensor, path: Path, metadata: dict[str, str]) -> Path:
    """A word's vectors as the web UI saves an embedding (``emb_params``); diffusers reads it too."""
    from safetensors.torch import save_file

    with replaced_when_done(path) as temporary:
        save_file({"emb_params": vectors.float().cpu().contiguous()}, str(temporary), metadata=metadata)
    return path


def _full(model: Any, config: Any) -> Trained:
    if model.adapters.patches.changed():
        raise ValueError("unload the LoRAs before a full fine-tune: their changes would be baked in")
    parts = {"unet": model.unet}
    if config.text_encoder:
        parts["text_encoder"] = model.text_encoder
    module = nn.ModuleDict(parts)
    module.requires_grad_(True)

    def write(out: Path, metadata: dict[str, str]) -> Path:
        path = write_single_file(
            out / "model.safetensors",
            model.spec,
            model.unet,
            model.vae,
            model.text_encoder,
            metadata=metadata,
        )
        if config.diffusers:
            write_diffusers_folder(
                out / "diffusers", model.spec, model.unet, model.vae, model.text_encoder, model.tokenizer
            )
        return path

    return Trained(module, write, lambda: module.requires_grad_(False), text_trained=config.text_encoder)
