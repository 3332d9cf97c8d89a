"""The worker: takes the queue's jobs one at a time and runs them on the loaded model.

Each job is a request of the web UI's shape (:mod:`openldm.server.requests`), run through the same
options object and pipeline tasks as the command line. After every sampler step the job's progress is
written to the store and a preview kept (the model's VAE for small images, else the web UI's cheap
linear map from SD latents to RGB); a job cancelled meanwhile, or an interrupt, stops it at that step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from openldm.model import StableDiffusion
from openldm.pipelines.img2img import Img2Img
from openldm.pipelines.inpaint import Inpaint
from openldm.pipelines.run import Task
from openldm.pipelines.txt2img import Txt2Img
from openldm.server.requests import Img2ImgRequest, Txt2ImgRequest, decode_image, options_of
from openldm.server.store import Job, Store

log = logging.getLogger(__name__)
VAE_PREVIEW_PIXELS = 256 * 256
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
        request = (Img2ImgRequest if job.kind == "img2img" else Txt2ImgRequest).model_validate(job.request)
        options = options_of(request).replace(callback=self._callback(job, request))
        generation = self.model.generate(_task(request), options)
        files = []
        for n, image in enumerate(generation.images):
            files.append(self._save(job, n, image))
        return {"files": files, "info": _info(request, generation)}

    def _save(self, job: Job, n: int, image: Image.Image) -> str:
        from openldm.files import write_atomically
        from openldm.images import png_bytes

        name = f"{job.id}-{n}.png"
        write_atomically(png_bytes(image), self.store.images / name)
        return name

    def _callback(self, job: Job, request: Txt2ImgRequest) -> Callable[..., None]:
        total_passes = request.n_iter
        state = {"pass": 0, "last": -1, "checked": 0.0}

        def callback(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if step <= state["last"]:
                state["pass"] += 1
            state["last"] = step
            done = state["pass"] * total + step + 1
            self.store.progress(job.id, done, total * total_passes)
            self.preview = self._preview(x0, request)
            now = time.monotonic()
            if self.interrupt.is_set():
                raise Interrupted
            if now - state["checked"] > 0.25:  # a cancelled job stops at its next step
                state["checked"] = now
                current = self.store.get(job.id)
                if current is not None and current.state == "cancelled":
                    raise Interrupted

        return callback

    def _preview(self, x0: torch.Tensor, request: Txt2ImgRequest) -> Image.Image:
        from openldm.images import tensor_to_pil

        latent = x0[:1].float()
        with torch.inference_mode():
            if request.width * request.height <= VAE_PREVIEW_PIXELS:
                vae = self.model.vae
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
