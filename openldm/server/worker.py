"""The worker: takes the queue's jobs one at a time and runs them on the loaded model.

Each job is a request of the web UI's shape (:mod:`openldm.server.requests`), run through the same
options object and pipeline tasks as the command line. After every sampler step the job's progress is
written to the store and a preview kept (the model's VAE for small images, else the web UI's cheap
linear map from SD latents to RGB); a job cancelled meanwhile, or an interrupt, stops it at that step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from openldm.adapters.controlnet_files import controlnet_files
from openldm.model import StableDiffusion
from openldm.pipelines.img2img import Img2Img
from openldm.pipelines.inpaint import Inpaint
from openldm.pipelines.run import Task
from openldm.pipelines.txt2img import Txt2Img
from openldm.server.controlnet_units import controls_of
from openldm.server.requests import Img2ImgRequest, Txt2ImgRequest, decode_image, options_of
from openldm.server.store import Job, Store

log = logging.getLogger(__name__)
VAE_PREVIEW_PIXELS = 256 * 256
REPORT_SECONDS = 0.2  # progress, preview and the cancel check, at most this often
# The web UI's "Approx cheap" preview: SD latents (4 channels) to RGB.
LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


class Interrupted(Exception):
    """A running job stopped at a step (cancelled, or interrupted through the API)."""


class Worker:
    """Runs the store's jobs on a model, in a thread of its own."""

    def __init__(
        self, store: Store, load: Callable[[str | None], StableDiffusion], checkpoint: str | None
    ) -> None:
        self.store = store
        self.load = load
        self.checkpoint = checkpoint
        self.model = load(checkpoint)
        self.current: Job | None = None
        self.preview: Image.Image | None = None
        self.interrupt = threading.Event()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="openldm-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            job = self.store.claim()
            if job is None:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            self.current, self.preview = job, None
            self.interrupt.clear()
            try:
                self._run(job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        try:
            result = self._perform(job)
        except Interrupted:
            self.store.fail(job.id, "interrupted", "cancelled")
        except Exception as e:  # the job fails; the worker goes on with the next one
            log.exception("job %s failed", job.id)
            self.store.fail(job.id, f"{type(e).__name__}: {e}")
        else:
            self.store.finish(job.id, result)

    def _perform(self, job: Job) -> dict[str, Any]:
        if job.kind == "load":
            self.model = self.load(job.request["checkpoint"])
            self.checkpoint = job.request["checkpoint"]
            return {"files": [], "info": {"sd_model_checkpoint": self.checkpoint}}

        def on_step(done: int, total: int, preview: Image.Image) -> None:
            self.store.progress(job.id, done, total)
            self.preview = preview
            if self.interrupt.is_set() or self._cancelled(job):
                raise Interrupted

        images, info = generate_images(self.model, job.kind, job.request, on_step)
        return {"files": [self._save(job, n, image) for n, image in enumerate(images)], "info": info}

    def _cancelled(self, job: Job) -> bool:
        current = self.store.get(job.id)
        return current is not None and current.state == "cancelled"

    # What the server's routes read, the same for a Redis dispatcher.
    def factor(self) -> int:
        return self.model.spec.vae.downsampling_factor

    def lora_dirs(self) -> list[Any]:
        return list(self.model.adapters.lora_dirs)

    def embedding_shapes(self) -> dict[str, tuple[int, int]]:
        return {e.word: tuple(e.vectors.shape) for e in self.model.adapters.embeddings}

    def controlnet_files(self) -> list[Path]:
        return controlnet_files(self.model)

    def _save(self, job: Job, n: int, image: Image.Image) -> str:
        from openldm.files import write_atomically
        from openldm.images import png_bytes

        name = f"{job.id}-{n}.png"
        write_atomically(png_bytes(image), self.store.images / name)
        return name


Step = Callable[[int, int, Image.Image], None]


def generate_images(
    model: StableDiffusion, kind: str, fields: dict[str, Any], on_step: Step
) -> tuple[list[Image.Image], dict[str, Any]]:
    """Run a job's request on ``model``: its images and the web UI's ``info``. After every step,
    ``on_step(done, total, preview)`` (steps over all repeats); it may raise to stop the job."""
    request = (Img2ImgRequest if kind == "img2img" else Txt2ImgRequest).model_validate(fields)
    options = options_of(request).replace(
        callback=_progress(model, request, on_step),
        controls=controls_of(request, model),
    )
    generation = model.generate(_task(request), options)
    return list(generation.images), _info(request, generation)


def _progress(model: StableDiffusion, request: Txt2ImgRequest, on_step: Step) -> Callable[..., None]:
    """The sampler's callback: ``on_step`` with a preview at most every :data:`REPORT_SECONDS` and at
    the last step (a progress write and a decode per step would cost more than a small model's step)."""
    state = {"pass": 0, "last": -1, "reported": -math.inf}

    def callback(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if step <= state["last"]:  # a new repeat (--n_iter) starts
            state["pass"] += 1
        state["last"] = step
        done, steps = state["pass"] * total + step + 1, total * request.n_iter
        now = time.monotonic()
        if now - state["reported"] >= REPORT_SECONDS or done == steps:
            state["reported"] = now
            on_step(done, steps, preview(model, x0, request))

    return callback


def preview(model: StableDiffusion, x0: torch.Tensor, request: Txt2ImgRequest) -> Image.Image:
    """The first image of a step's denoised latents: through the model's VAE when small, else the web
    UI's cheap linear map from SD latents to RGB."""
    from openldm.images import tensor_to_pil

    latent = x0[:1].float()
    with torch.inference_mode():
        if request.width * request.height <= VAE_PREVIEW_PIXELS:
            vae = model.vae
            pixels = vae.from_latent(latent.to(next(vae.parameters())))
            return tensor_to_pil(pixels.float().clamp(-1, 1))[0]
        rgb = torch.einsum("bchw,cr->brhw", latent.cpu()[:, :4], LATENT_RGB)
        return tensor_to_pil(rgb.clamp(-1, 1))[0]


def _task(request: Txt2ImgRequest) -> Task:
    if not isinstance(request, Img2ImgRequest):
        return Txt2Img()
    image = decode_image(request.init_images[0], "init_images").convert("RGB")
    if request.mask is not None:
        mask = decode_image(request.mask, "mask").convert("L")
        return Inpaint(image, mask, request.denoising_strength)
    return Img2Img(image, request.denoising_strength)


def _info(request: Txt2ImgRequest, generation: Any) -> dict[str, Any]:
    """The web UI's ``info``: the request's values and each image's seed and parameters text."""
    from openldm.images import parse_parameters

    parameters = list(generation.parameters)
    seeds = [int(parse_parameters(p).get("Seed", generation.seed)) for p in parameters]
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(parameters),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(parameters),
        "seed": seeds[0] if seeds else generation.seed,
        "all_seeds": seeds,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler_name or request.sampler_index,
        "batch_size": request.batch_size,
        "infotexts": parameters,
    }
