"""The FastAPI application: the web UI's ``/sdapi/v1`` routes and the job queue's ``/jobs`` routes.

Every generation goes through the queue: ``POST /jobs`` answers at once with the job's id;
``/sdapi/v1/txt2img`` and ``img2img`` queue their job the same way and answer when it is done, in the
web UI's shape (base64 PNGs, ``info`` as a JSON string). A request is checked before it is queued:
a bad field is a 422 naming it, a body over the cap a 413.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ValidationError

from openldm.adapters.lora_files import find_lora
from openldm.control_images import PREPROCESSORS
from openldm.images import parse_parameters
from openldm.prompts import lora_tags
from openldm.sampling.samplers import SAMPLERS
from openldm.server.controlnet_units import check_units, detect
from openldm.server.requests import (
    BadRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    decode_image,
    encode_png,
    options_of,
)
from openldm.server.store import FINISHED, Job, Store
from openldm.server.worker import Worker

if TYPE_CHECKING:
    from openldm.server.remote import Dispatcher

MAX_BODY_BYTES = 64 * 1024 * 1024
POLL_SECONDS = 0.05


@dataclass
class Settings:
    api_key: str | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)  # title -> file, for switching
    max_body: int = MAX_BODY_BYTES


class _BodyLimit:
    """An ASGI middleware: bodies over ``limit`` bytes get a 413 before they are read whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(self.limit)(scope, receive, send)


class PngInfo(BaseModel):
    image: str


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"the request body is over {limit // 2**20} MB"}, status_code=413)


def _unprocessable(field_name: str, message: str) -> JSONResponse:
    detail = [{"loc": ["body", field_name], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(store: Store, worker: Worker | Dispatcher, settings: Settings) -> FastAPI:
    app = FastAPI(title="openldm", version="1")
    app.add_middleware(_BodyLimit, limit=settings.max_body)

    @app.middleware("http")
    async def api_key(request: Request, call_next: Any) -> Response:
        public = request.url.path == "/" or request.url.path.startswith("/static/")
        if settings.api_key and not public and not _authorized(request, settings.api_key):
            return JSONResponse(
                {"detail": "an API key is needed"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return await call_next(request)

    static = Path(__file__).parent / "static"

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response((static / "index.html").read_bytes(), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css"}
        path = static / name
        if name not in {p.name for p in static.iterdir()} or path.suffix not in types:
            raise HTTPException(status_code=404, detail=f"no file {name!r}")
        return Response(path.read_bytes(), media_type=types[path.suffix])

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return _unprocessable(error.field, str(error))

    def check(request: Txt2ImgRequest) -> None:
        options_of(request)
        try:  # a <lora:NAME> names a file of the LoRA folders, never a path
            for name, _, _ in lora_tags(request.prompt)[1]:
                find_lora(name, worker.lora_dirs())
        except (ValueError, FileNotFoundError) as e:
            raise BadRequest("prompt", str(e)) from None
        check_units(request, worker.controlnet_files)
        factor = worker.factor()
        for name in ("width", "height"):
            if getattr(request, name) % factor:
                raise BadRequest(name, f"{name} {getattr(request, name)} is not a multiple of {factor}")
        if isinstance(request, Img2ImgRequest):
            decode_image(request.init_images[0], "init_images")
            if request.mask is not None:
                decode_image(request.mask, "mask")

    async def finished(job: Job) -> Job:
        while True:
            current = store.get(job.id)
            if current is None or current.state in FINISHED:
                return current or job
            await asyncio.sleep(POLL_SECONDS)

    async def queue_and_wait(kind: str, request: Txt2ImgRequest, client: str) -> dict[str, Any]:
        check(request)
        job = store.add(kind, request.model_dump(), client)
        worker.wake.set()
        done = await finished(job)
        if done.state != "done":
            raise HTTPException(status_code=500, detail=done.error or done.state)
        images = [
            encode_png(Image.open(store.images / name)) for name in (done.result or {}).get("files", [])
        ]
        info = (done.result or {}).get("info", {})
        return {
            "images": images if request.send_images else [],
            "parameters": request.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps(info),
        }

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Txt2ImgRequest, http: Request) -> dict[str, Any]:
        return await queue_and_wait("txt2img", request, http.headers.get("x-client", ""))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Img2ImgRequest, http: Request) -> dict[str, Any]:
        return await queue_and_wait("img2img", request, http.headers.get("x-client", ""))

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [
            {"name": info.display_name, "aliases": [key], "options": {}} for key, info in SAMPLERS.items()
        ]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [
            {
                "name": "automatic",
                "label": "Automatic",
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            },
            {
                "name": "karras",
                "label": "Karras",
                "aliases": None,
                "default_rho": 7.0,
                "need_inner_model": False,
            },
        ]

    def model_entries() -> list[dict[str, Any]]:
        entries = [
            {
                "title": "embedded",
                "model_name": "embedded",
                "hash": None,
                "sha256": None,
                "filename": "",
                "config": None,
            }
        ]
        for title, path in sorted(settings.checkpoints.items()):
            entries.append(
                {
                    "title": title,
                    "model_name": path.stem,
                    "hash": None,
                    "sha256": None,
                    "filename": str(path),
                    "config": None,
                }
            )
        return entries

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return model_entries()

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        from openldm.adapters.lora_files import is_lora_file

        found = []
        for folder in worker.lora_dirs():
            for path in sorted(folder.rglob("*")):
                if is_lora_file(path):
                    found.append({"name": path.stem, "alias": path.stem, "path": str(path), "metadata": {}})
        return found

    @app.get("/controlnet/version")
    def controlnet_version() -> dict[str, Any]:
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict[str, Any]:
        from openldm.adapters.controlnet_files import title

        return {"model_list": [title(path) for path in worker.controlnet_files()]}

    @app.get("/controlnet/module_list")
    def controlnet_modules() -> dict[str, Any]:
        return {"module_list": list(PREPROCESSORS), "module_detail": {}}

    @app.post("/controlnet/detect")
    def controlnet_detect(body: dict[str, Any]) -> dict[str, Any]:
        return detect(body)

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        loaded = {
            word: {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": width,
                "vectors": n,
            }
            for word, (n, width) in worker.embedding_shapes().items()
        }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": worker.checkpoint or "embedded", "CLIP_stop_at_last_layers": 1}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]) -> Any:
        wanted = body.get("sd_model_checkpoint")
        if wanted is None or wanted == (worker.checkpoint or "embedded"):
            return None
        titles = {e["title"] for e in model_entries()} | {e["model_name"] for e in model_entries()}
        if not isinstance(wanted, str) or wanted not in titles:
            return _unprocessable(
                "sd_model_checkpoint", f"unknown checkpoint {wanted!r}; see /sdapi/v1/sd-models"
            )
        job = store.add(
            "load", {"checkpoint": None if wanted == "embedded" else _title_of(wanted, settings)}, "options"
        )
        worker.wake.set()
        done = await finished(job)
        if done.state != "done":
            raise HTTPException(status_code=500, detail=done.error or done.state)
        return None

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = worker.current
        running = store.get(job.id) if job is not None else None
        fraction = running.step / running.steps if running and running.steps else 0.0
        eta = 0.0
        if running and running.started and fraction > 0:
            elapsed = time.time() - running.started
            eta = elapsed / fraction - elapsed
        preview = worker.preview if (running and not skip_current_image) else None
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": worker.interrupt.is_set(),
                "job": running.id if running else "",
                "job_count": len(store.jobs(("queued", "running"))),
                "job_timestamp": str(int(running.created)) if running else "0",
                "job_no": 0,
                "sampling_step": running.step if running else 0,
                "sampling_steps": running.steps if running else 0,
            },
            "current_image": encode_png(preview) if preview is not None else None,
            "textinfo": None,
        }

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> None:
        if worker.current is not None:
            worker.interrupt.set()

    @app.post("/sdapi/v1/skip")
    def skip() -> None:
        if worker.current is not None:
            worker.interrupt.set()

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfo) -> dict[str, Any]:
        image = decode_image(body.image, "image")
        text = image.info.get("parameters", "")
        return {
            "info": text,
            "items": {"parameters": text} if text else {},
            "parameters": parse_parameters(text) if text else {},
        }

    # --- the queue ------------------------------------------------------------------------------------

    @app.post("/jobs", status_code=202)
    async def add_job(http: Request) -> dict[str, Any]:
        try:
            body = await http.json()
        except ValueError:
            return _unprocessable("body", "the body is not valid JSON")
        if not isinstance(body, dict) or body.get("type") not in ("txt2img", "img2img"):
            return _unprocessable("type", "type must be 'txt2img' or 'img2img'")
        model = Img2ImgRequest if body["type"] == "img2img" else Txt2ImgRequest
        try:
            request = model.model_validate({k: v for k, v in body.items() if k != "type"})
        except ValidationError as e:
            first = e.errors()[0]
            return _unprocessable(".".join(str(p) for p in first["loc"]), first["msg"])
        check(request)
        job = store.add(body["type"], request.model_dump(), http.headers.get("x-client", ""))
        worker.wake.set()
        return {**job.public(), "position": store.ahead_of(job)}

    @app.get("/jobs")
    def list_jobs(state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        states = tuple(s for s in (state or "").split(",") if s) or None
        return [j.public() for j in store.jobs(states, min(max(limit, 1), 1000))]  # type: ignore[arg-type]

    def job_or_404(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return job_or_404(job_id).public()

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        store.cancel(job.id)
        return job_or_404(job_id).public()

    @app.get("/jobs/{job_id}/images/{index}")
    def job_image(job_id: str, index: int) -> Response:
        files = (job_or_404(job_id).result or {}).get("files", [])
        if not 0 <= index < len(files):
            raise HTTPException(status_code=404, detail=f"job {job_id} has no image {index}")
        return Response((store.images / files[index]).read_bytes(), media_type="image/png")

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        job_or_404(job_id)

        async def events() -> Any:
            last = None
            while True:
                job = store.get(job_id)
                if job is None:
                    return
                state = job.public()
                if worker.current is not None and worker.current.id == job_id and worker.preview is not None:
                    state["preview"] = encode_png(worker.preview)
                key = (job.state, job.step)
                if key != last:
                    last = key
                    name = "done" if job.state in FINISHED else "progress"
                    yield f"event: {name}\ndata: {json.dumps(state)}\n\n"
                if job.state in FINISHED:
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _title_of(wanted: str, settings: Settings) -> str:
    for title, path in settings.checkpoints.items():
        if wanted in (title, path.stem):
            return str(path)
    raise KeyError(wanted)


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    given = request.headers.get("x-api-key", "")
    if header.lower().startswith("bearer "):
        given = header[7:]
    elif header.lower().startswith("basic "):
        try:
            given = base64.b64decode(header[6:]).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    return hmac.compare_digest(given.encode(), key.encode())


__all__ = ["Settings", "create_app"]
