"""CPU inference engines against PyTorch on openldm's own UNet and VAE decoder: OpenVINO and ONNX
Runtime (both from PyPI), the same weights, the same inputs, the same threads.

For each network (``unet``: one guided step, batch 2, SD 1 sizes on 64x64 latents; ``vae``: a decode
of one 64x64 latent to 512x512) and each engine: the conversion time, the seconds per call (median of
``--repeats`` after a warm-up), the ratio to PyTorch (below 1: the engine is faster) and the output's
max abs difference relative to PyTorch's largest value. An engine is worth offering as ``--backend``
only at 1.3x PyTorch's speed or more with outputs within 1e-3.

Run: ``pip install openvino onnxruntime onnx`` then ``python bench/engines.py [--nets unet vae]
[--engines openvino onnxruntime] [--repeats 3] [--threads 2]``. About 10-15 minutes on 2 cores; the
ONNX files (3.4 GB for the UNet) go to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import peers  # bench/peers.py: puts the checkout on sys.path before openldm's import
import torch
from pipelines_full_size import random_state_dict
from torch import nn

from openldm.config import preset
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL


class _Decoder(nn.Module):
    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def networks(names: list[str]) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    spec = preset("sd15")
    g = torch.Generator().manual_seed(1)
    out: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]] = {}
    if "unet" in names:
        with torch.device("meta"):
            meta = UNetModel(spec.unet)
        unet = UNetModel(spec.unet).eval()
        unet.load_state_dict(random_state_dict(meta, torch.Generator().manual_seed(0), torch.float32))
        inputs = (
            torch.randn(2, 4, 64, 64, generator=g),
            torch.tensor([500, 500]),
            torch.randn(2, 77, 768, generator=g),
        )
        out["unet"] = (unet, inputs)
    if "vae" in names:
        with torch.device("meta"):
            meta = AutoencoderKL(spec.vae)
        vae = AutoencoderKL(spec.vae).eval()
        vae.load_state_dict(random_state_dict(meta, torch.Generator().manual_seed(0), torch.float32))
        out["vae"] = (_Decoder(vae), (torch.randn(1, 4, 64, 64, generator=g),))
    return out


def _median(call: Callable[[], Any], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def openvino_runner(net: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, folder: Path) -> Callable:
    import openvino as ov

    model = ov.convert_model(net, example_input=inputs)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    arrays = [i.numpy() for i in inputs]
    return lambda: compiled(arrays)[0]


def onnxruntime_runner(
    net: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, folder: Path
) -> Callable:
    import onnxruntime as ort

    path = folder / "net.onnx"
    names = [f"input{i}" for i in range(len(inputs))]
    with torch.inference_mode():
        torch.onnx.export(net, inputs, str(path), input_names=names, opset_version=18, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: i.numpy() for name, i in zip(names, inputs, strict=True)}
    return lambda: session.run(None, feed)[0]


ENGINES = {"openvino": openvino_runner, "onnxruntime": onnxruntime_runner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    peers.set_threads(args.threads)
    print("| network | engine | conversion s | s per call | PyTorch s | ratio | max abs diff (rel) |")
    print("|---|---|---|---|---|---|---|")
    for name, (net, inputs) in networks(args.nets).items():
        with torch.inference_mode():
            reference = net(*inputs).numpy()
            torch_seconds = _median(lambda net=net, inputs=inputs: net(*inputs), args.repeats)
        for engine in args.engines:
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                try:
                    run = ENGINES[engine](net, inputs, args.threads, Path(folder))
                except Exception as e:  # an engine that cannot take the network is a result too
                    print(f"| {name} | {engine} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
                    continue
                converted = time.perf_counter() - start
                output = np.asarray(run())
                seconds = _median(run, args.repeats)
                diff = float(np.abs(output - reference).max() / np.abs(reference).max())
                print(
                    f"| {name} | {engine} | {converted:.0f} | {seconds:.2f} | {torch_seconds:.2f} | "
                    f"{seconds / torch_seconds:.2f} | {diff:.1e} |",
                    flush=True,
                )
                del run


if __name__ == "__main__":
    main()
