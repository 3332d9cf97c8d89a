"""``openldm serve``: the HTTP API and the job queue, on uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Serve the web UI's HTTP API (/sdapi/v1: txt2img, img2img, samplers, sd-models, loras, embeddings,
options, progress, interrupt, png-info; the ControlNet extension's units and /controlnet routes) and a
job queue (/jobs: queue, follow, cancel) over one model, the embedded one by default. Jobs are kept in
SQLite in --data: a job accepted survives a restart."""
EPILOG = """\
examples:
  openldm serve                                   # the embedded model on http://127.0.0.1:7860
  openldm serve --ckpt v1-5-pruned-emaonly.safetensors --lora-dir loras --api-key s3cret
  curl -s localhost:7860/jobs -d '{"type": "txt2img", "prompt": "a red circle", "steps": 20}'"""
WORKER_DESCRIPTION = """\
Take jobs from the Redis queue of `openldm serve --redis URL` (rq) and run them; start as many as you
like, on any machine that reaches Redis. Checkpoints are looked up by file name in --ckpt-dir."""
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the web UI's API and a job queue",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    add("--port", type=int, default=7860, help="port (default: %(default)s, the web UI's)")
    add("--ckpt", help="the model to start with (default: the embedded model)")
    _model_flags(add, "a folder of checkpoints that /sdapi/v1/options can switch to")
    add("--api-key", help="ask every request but the page for this key (Bearer, X-API-Key or Basic)")
    add(
        "--data",
        default="openldm-server",
        help="where the queue and the images are kept (default: %(default)s)",
    )
    add(
        "--redis",
        metavar="URL",
        help="run no model here: hand the jobs to `openldm worker`s through this Redis",
    )
    parser.set_defaults(run=run)
    add_worker_parser(subparsers)
    return parser


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "worker",
        help="run the jobs of an `openldm serve --redis` queue",
        description=WORKER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--redis", metavar="URL", required=True, help="the Redis of the server, e.g. redis://host:6379/0")
    _model_flags(add, "where the checkpoints the server switches to are (by file name)")
    add("--burst", action="store_true", help="stop when the queue is empty")
    parser.set_defaults(run=run_worker)
    return parser


def _model_flags(add: Any, ckpt_dir: str) -> None:
    """The flags of the model a server or a worker runs: --ckpt-dir (``ckpt_dir``: its help), LoRAs,
    embeddings, device."""
    add("--ckpt-dir", help=ckpt_dir)
    add("--lora-dir", action="append", default=[], help="where <lora:NAME:W> finds its files (repeatable)")
    add("--embeddings-dir", help="a folder of textual inversion embeddings")
    add(
        "--controlnet-dir",
        action="append",
        default=[],
        help="where the ControlNet units of requests find their models, by name (repeatable)",
    )
    add("--device", help="cpu, cuda, mps... (default: cuda, else mps, else cpu)")
    add(
        "--winograd-memory",
        type=_gigabytes,
        metavar="GB",
        help="on a CPU, memory each loaded model's UNet may keep as Winograd filters (0: none; default: "
        "half the free memory with fp32 weights, 0 with fp16 weights kept)",
    )


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GB (0 for none)")
    return value


def _checkpoints(folder: str | None) -> dict[str, Path]:
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        from openldm.commands.common import UsageError

        raise UsageError(f"--ckpt-dir {folder!r} is not a folder")
    return {p.name: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES}


def make_loader(args: argparse.Namespace, by_name: bool = False) -> Any:
    """``load(checkpoint or None)``: a model with the server's adapters (LoRA folders, embeddings);
    ``by_name``: the checkpoint is a file name of --ckpt-dir (a worker, told by a server elsewhere)."""
    from openldm.adapters.embeddings import embedding_files
    from openldm.commands.common import device_name
    from openldm.model import load

    device = device_name(args.device)

    def load_model(checkpoint: str | None) -> Any:
        if checkpoint is not None and by_name:
            found = _checkpoints(args.ckpt_dir).get(Path(checkpoint).name)
            if found is None:
                raise FileNotFoundError(f"checkpoint {checkpoint!r} is not in this worker's --ckpt-dir")
            checkpoint = str(found)
        gigabytes = getattr(args, "winograd_memory", None)
        memory = None if gigabytes is None else int(gigabytes * 2**30)
        model = load(checkpoint, device=device, winograd_memory=memory)
        for folder in args.lora_dir:
            model.add_lora_dir(folder)
        for folder in args.controlnet_dir:
            model.add_controlnet_dir(folder)
        for path in embedding_files(args.embeddings_dir) if args.embeddings_dir else []:
            model.load_embedding(path)
        return model

    return load_model


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        from openldm.commands.common import UsageError

        raise UsageError("openldm serve needs FastAPI and uvicorn: pip install 'openldm[serve]'") from None

    from openldm.server.app import Settings, create_app
    from openldm.server.store import Store
    from openldm.server.worker import Worker

    settings = Settings(api_key=args.api_key, checkpoints=_checkpoints(args.ckpt_dir))
    store = Store(args.data)
    if args.redis:
        worker = _dispatcher(args, store)
    else:
        recovered = store.recover()
        if recovered:
            print(f"openldm: {recovered} job(s) left running by the last server will run again")
        worker = Worker(store, make_loader(args), args.ckpt)
    worker.start()
    try:
        uvicorn.run(create_app(store, worker, settings), host=args.host, port=args.port, log_level="warning")
    finally:
        worker.stop()
        store.close()
    return 0


def _dispatcher(args: argparse.Namespace, store: Any) -> Any:
    from openldm.adapters.embeddings import embedding_files, vectors_shape
    from openldm.server.remote import Dispatcher

    files = embedding_files(args.embeddings_dir) if args.embeddings_dir else []
    embeddings = {path.stem.lower(): vectors_shape(path) for path in files}
    lora_dirs, controlnet_dirs = [Path(p) for p in args.lora_dir], [Path(p) for p in args.controlnet_dir]
    return Dispatcher(store, args.redis, args.ckpt, lora_dirs, embeddings, controlnet_dirs)


def run_worker(args: argparse.Namespace) -> int:
    from openldm.commands.common import UsageError
    from openldm.server.remote import work

    try:
        import rq  # noqa: F401
    except ImportError:
        raise UsageError("openldm worker needs rq and redis: pip install 'openldm[serve]'") from None

    print(f"openldm worker: taking jobs from {args.redis}")
    work(args.redis, make_loader(args, by_name=True), burst=args.burst)
    return 0
