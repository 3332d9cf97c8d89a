"""Workers on other machines: the queue's jobs handed to rq over Redis.

With ``openldm serve --redis URL`` the server runs no model: a :class:`Dispatcher` thread moves the
SQLite queue's jobs, in order, onto the rq queue ``openldm`` (the rq job's id is the job's id, so a job
is enqueued once), follows them (progress and preview from the rq job's ``meta``), and stores what
they return (the images, written whole beside the database). ``openldm worker --redis URL`` runs rq's
``SimpleWorker`` (the model stays loaded between jobs) on any machine that reaches Redis: it takes jobs
from the queue, runs them through the same :func:`~openldm.server.worker.generate_images` as the
server's own worker, and stops a job at its next step when the server asks (``DELETE /jobs/{id}``,
``interrupt``) through a Redis key.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from openldm.server.requests import encode_png
from openldm.server.store import Job, Store

log = logging.getLogger(__name__)
QUEUE = "openldm"
CANCEL_KEY = "openldm:cancel:{}"
JOB_TIMEOUT = 6 * 3600
RESULT_TTL = 7 * 24 * 3600

# The worker process's model and how to load it (set by ``openldm worker``).
_loader: Any = None
_models: dict[str | None, Any] = {}


def _connection(url: str) -> Any:
    from redis import Redis

    return Redis.from_url(url)


# --- the worker side (runs in rq workers) -------------------------------------------------------------


def run_job(kind: str, request: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """An rq job: the images (base64 PNGs) and info of one request, progress written to the job's meta."""
    from rq import get_current_job

    from openldm.server.worker import Interrupted, generate_images

    job = get_current_job()
    if checkpoint not in _models:
        _models.clear()  # one model at a time in memory
        _models[checkpoint] = _loader(checkpoint)
    model = _models[checkpoint]

    def on_step(done: int, total: int, preview: Image.Image) -> None:
        if job is None:
            return
        job.meta.update(step=done, steps=total, preview=encode_png(preview))
        job.save_meta()
        if job.connection.exists(CANCEL_KEY.format(job.id)):
            raise Interrupted

    images, info = generate_images(model, kind, request, on_step)
    info["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return {"images": [encode_png(image) for image in images], "info": info}


def work(url: str, loader: Any, burst: bool = False) -> None:
    """Run an rq worker on the ``openldm`` queue (``burst``: until the queue is empty)."""
    global _loader
    from rq import Queue, SimpleWorker

    _loader = loader
    connection = _connection(url)
    SimpleWorker([Queue(QUEUE, connection=connection)], connection=connection).work(burst=burst)


# --- the server side ------------------------------------------------------------------------------------


class Dispatcher:
    """In the server: the SQLite queue's jobs onto rq, and their results back."""

    def __init__(
        self,
        store: Store,
        url: str,
        checkpoint: str | None,
        lora_dirs: list[Path],
        embeddings: dict[str, tuple[int, int]],
        controlnet_dirs: list[Path],
    ) -> None:
        from rq import Queue

        self.store = store
        self.connection = _connection(url)
        self.connection.ping()  # an unreachable Redis is an error now, not at the first job
        self.queue = Queue(QUEUE, connection=self.connection)
        self.checkpoint = checkpoint
        self._lora_dirs, self._embeddings, self._controlnet_dirs = lora_dirs, embeddings, controlnet_dirs
        self.current: Job | None = None
        self.preview: Image.Image | None = None
        self._cancels_seen = time.time() - 3600  # cancellations already passed on, by time
        self.interrupt = threading.Event()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="openldm-dispatcher", daemon=True)

    def factor(self) -> int:
        return 8  # every SD 1/2 VAE

    def lora_dirs(self) -> list[Path]:
        return self._lora_dirs

    def embedding_shapes(self) -> dict[str, tuple[int, int]]:
        return self._embeddings

    def controlnet_files(self) -> list[Path]:
        from openldm.adapters.controlnet_files import files_in

        return files_in(self._controlnet_dirs, embedded=self.checkpoint in (None, "embedded"))

    def start(self) -> None:
        self._resume()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=30)

    def _resume(self) -> None:
        """Jobs left running by a stopped server: followed again if rq has them, else queued again."""
        from rq.job import Job as RqJob

        for job in self.store.jobs(("running",), limit=100_000):
            if not RqJob.exists(job.id, connection=self.connection):
                self.store.requeue(job.id)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self._dispatch() | self._follow()
            except Exception:  # Redis gone for a moment: try again
                log.exception("dispatcher")
                busy = False
            if not busy:
                self.wake.wait(0.1)
                self.wake.clear()

    def _dispatch(self) -> bool:
        job = self.store.claim()
        if job is None:
            return False
        if job.kind == "load":
            self.checkpoint = job.request["checkpoint"]
            self.store.finish(job.id, {"files": [], "info": {"sd_model_checkpoint": self.checkpoint}})
            return True
        checkpoint = Path(self.checkpoint).name if self.checkpoint else None
        self.queue.enqueue_call(
            run_job,
            args=(job.kind, job.request, checkpoint),
            job_id=job.id,
            timeout=JOB_TIMEOUT,
            result_ttl=RESULT_TTL,
        )
        return True

    def _follow(self) -> bool:
        from rq.job import Job as RqJob
        from rq.job import JobStatus

        running = self.store.jobs(("running",), limit=1000)
        for job in self.store.cancelled_since(self._cancels_seen):  # tell its worker, or unqueue it
            self._cancels_seen = max(self._cancels_seen, job.finished or 0.0)
            self.connection.set(CANCEL_KEY.format(job.id), 1, ex=3600)
            if RqJob.exists(job.id, connection=self.connection):
                remote = RqJob.fetch(job.id, connection=self.connection)
                if remote.get_status() == JobStatus.QUEUED:
                    remote.cancel()
        current = None
        for job in running:
            remote = RqJob.fetch(job.id, connection=self.connection)
            status = remote.get_status()
            if status == JobStatus.FINISHED:
                self._collect(job, remote.return_value() or {})
            elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                self.store.fail(
                    job.id, _failure(remote), "cancelled" if status != JobStatus.FAILED else "failed"
                )
            elif status == JobStatus.STARTED:
                self._progress(job, remote, first=current is None)
                current = current or job
                if self.interrupt.is_set():
                    self.store.cancel(job.id)
        self.current = current
        self.interrupt.clear()
        return bool(running)

    def _progress(self, job: Job, remote: Any, first: bool) -> None:
        """A started job's progress into the store; the first one's preview is the one shown."""
        meta = remote.get_meta(refresh=True)
        if "step" in meta:
            self.store.progress(job.id, int(meta["step"]), int(meta["steps"]))
        if first and meta.get("preview"):
            self.preview = Image.open(io.BytesIO(base64.b64decode(meta["preview"])))

    def _collect(self, job: Job, result: dict[str, Any]) -> None:
        from openldm.files import write_atomically

        files = []
        for n, data in enumerate(result.get("images", [])):
            name = f"{job.id}-{n}.png"
            write_atomically(base64.b64decode(data), self.store.images / name)
            files.append(name)
        self.store.progress(job.id, 1, 1)
        self.store.finish(job.id, {"files": files, "info": result.get("info", {})})


def _failure(remote: Any) -> str:
    result = remote.latest_result()
    text = getattr(result, "exc_string", None) or "failed"
    return text.strip().splitlines()[-1][:500]
