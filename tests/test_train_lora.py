"""LoRA training's layers and files: what is trained is what the saved file gives back, in openldm and
in diffusers' load_lora_weights; a few steps on one batch lower its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openldm.sampling.schedule import NoiseSchedule
from openldm.train.lora import inject
from openldm.train.losses import diffusion_loss
from tests.oracles import diffusers_pair

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return diffusers_pair(tmp_path_factory.mktemp("lora-train"), "sd1", SIZE)


def _networks(model):
    return {"unet": model.unet, "text_encoder": model.text_encoder}


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([model.tokenizer.window(model.tokenizer.encode("a red fox in the snow"))])
    with torch.no_grad():
        context = model.text_encoder(ids)
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
        return context, model.unet(x, torch.tensor([500]), context=context)


def _randomize(lora, seed: int) -> None:
    """Random factors, as training would leave them (the wrapped layer untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (lora.down.weight, lora.up.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_saved_file_gives_back_what_was_trained(pair, tmp_path) -> None:
    model = pair.model
    plain = _outputs(model)
    network = inject(_networks(model), model.spec.unet, rank=4, alpha=2, text=True, seed=1)
    assert _outputs(model)[1].equal(plain[1])  # up starts at zero: the model starts unchanged
    for lora in network.layers.values():
        _randomize(lora, len(lora.down.weight))
    trained = _outputs(model)
    path = network.save(tmp_path / "trained.safetensors")
    network.remove(_networks(model))
    assert _outputs(model)[1].equal(plain[1])
    model.load_lora(path)
    try:
        merged = _outputs(model)
        for ours, theirs in zip(merged, trained, strict=True):
            err = float((ours - theirs).abs().max() / theirs.abs().max())
            assert err < 1e-5, err
        assert float((trained[1] - plain[1]).abs().max()) > 1e-2
        ours_image = model.txt2img(
            "a red fox", steps=3, width=SIZE, height=SIZE, seed=2, output_type="np", progress=False
        ).images
    finally:
        model.unload_lora()
    pipe = pair.txt2img
    pipe.load_lora_weights(str(path), adapter_name="trained")
    try:
        noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(2))
        pipe.scheduler = diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="leading"
        )
        theirs_image = pipe(
            "a red fox", num_inference_steps=3, height=SIZE, width=SIZE, latents=noise, output_type="np"
        ).images
    finally:
        pipe.unload_lora_weights()
    assert float(np.abs(ours_image - theirs_image).max()) <= 1e-3


def test_a_few_steps_lower_the_loss_of_a_batch(pair) -> None:
    model = pair.model
    network = inject(_networks(model), model.spec.unet, rank=4, seed=0)
    try:
        colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
        pixels = colours[:, :, None, None].expand(4, 3, SIZE, SIZE).contiguous()
        with torch.no_grad():
            latents = model.vae.to_latent(pixels, generator=torch.Generator().manual_seed(0))
            ids = torch.stack(
                [
                    torch.tensor(model.tokenizer.window(model.tokenizer.encode(c)))
                    for c in ("red", "green", "blue", "yellow")
                ]
            )
            context = model.text_encoder(ids)
        schedule = NoiseSchedule(model.spec.schedule)
        optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)

        def loss() -> torch.Tensor:
            return diffusion_loss(
                model.unet, schedule, latents, context, "eps", torch.Generator().manual_seed(5)
            )

        first = float(loss())
        for _ in range(15):
            optimizer.zero_grad()
            value = loss()
            value.backward()
            optimizer.step()
        last = float(loss())
        assert last < 0.9 * first, (first, last)
        assert all(
            p.grad is None for p in model.unet.parameters() if not any(p is q for q in network.parameters())
        )
    finally:
        network.remove(_networks(model))
