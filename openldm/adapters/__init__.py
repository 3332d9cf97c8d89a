"""What users add to a loaded model: LoRA and LyCORIS files, textual inversion embeddings, another VAE.

Each changes the networks in one place, reversibly: :mod:`~openldm.adapters.patcher` adds LoRA changes
into the weights (keeping the originals of the weights it changes), :mod:`~openldm.adapters.embeddings`
gives the tokenizer and the text encoder new words, and a swapped VAE keeps the model's own for
:func:`load_vae` ``(model, None)``. The pipelines only ask :func:`activate` for the LoRAs a generation
uses (those loaded for good plus its prompts' ``<lora:name:weight>`` tags).
"""

from openldm.adapters.state import (
    AdapterModel,
    Adapters,
    activate,
    load_embedding,
    load_lora,
    load_vae,
    unload_embedding,
    unload_lora,
)

__all__ = [
    "AdapterModel",
    "Adapters",
    "activate",
    "load_embedding",
    "load_lora",
    "load_vae",
    "unload_embedding",
    "unload_lora",
]
