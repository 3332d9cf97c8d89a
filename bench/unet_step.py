"""One guided UNet step at full size: where the time goes, how far from the machine's floor, and
diffusers' UNet on the same weights in the same run.

A step is one UNet call on a batch of 2 (classifier-free guidance: the prompt's row and the empty
prompt's): SD 1 sizes (``--preset sd15``, 320 channels, 768-wide text) on 64x64 latents (512x512
pixels) by default, fp32, seeded random weights (``pipelines_full_size.random_state_dict``).

Printed:

1. **the floor**: the step's FLOPs (``torch.utils.flop_counter``: convolutions, linear layers and the
   attention matmuls, these counted here for the CPU's fused attention) over the machine's measured
   sgemm rate (a 2048^3 fp32 matmul, best of 5): the time no implementation built on these kernels
   can beat;
2. **seconds per step**, medians of ``--repeats`` after a warm-up, for openldm and diffusers,
   interleaved (one of each in turn), and their ratios to each other and to the floor;
3. **the breakdown by operator** (``torch.profiler``, one step each): convolutions, matmuls (linear
   layers), attention (scaled dot product), GroupNorm, LayerNorm, elementwise (add, mul, SiLU, GELU,
   ...), copies (copy, cat, contiguous, layout changes), other; seconds and percent of the step.

``--variant`` applies one of the measured speed-ups to openldm's UNet (``winograd``: what ``openldm.load``
does on a CPU with fp32 weights, :mod:`openldm.nn.winograd`; ``channels_last``, ``compile``:
``torch.compile``, ``none``: direct convolutions) so that each can be kept or left out by its numbers.
The floor counts the direct convolutions' FLOPs, so Winograd's fewer multiplications can pass it.

Run: ``python bench/unet_step.py [--preset sd15] [--size 512] [--repeats 5] [--threads 2]
[--variant none|winograd|channels_last|compile] [--no-diffusers] [--token-merging 0.5]``. About 3-5
minutes on 2 cores (``--token-merging`` adds openldm with token merging and diffusers patched by tomesd).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import peers  # bench/peers.py: puts the checkout on sys.path before openldm's import
import torch
from pipelines_full_size import random_state_dict
from torch.utils.flop_counter import FlopCounterMode

from openldm.config import preset
from openldm.devices import reusing_freed_host_memory
from openldm.nn.token_merging import merging_tokens
from openldm.nn.unet import UNetModel
from openldm.nn.winograd import WINOGRAD_RECORD, winograd_for

CATEGORIES = (
    (
        "attention",
        ("scaled_dot_product", "flash_attention", "_efficient_attention", "bmm", "baddbmm", "softmax"),
    ),
    ("convolution", ("conv", "mkldnn_convolution", "convolution")),
    ("matmul", ("addmm", "mm", "linear", "matmul")),
    ("group_norm", ("group_norm",)),
    ("layer_norm", ("layer_norm",)),
    ("copies", ("copy_", "cat", "contiguous", "clone", "to_dense", "reorder", "_to_copy", "as_strided")),
    ("elementwise", ("add", "mul", "silu", "gelu", "div", "sub", "exp", "sin", "cos", "neg", "chunk")),
)


def category(name: str) -> str:
    name = name.removeprefix("aten::")
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


def sgemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a fp32 ``size``^3 matmul, best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def _attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """QK^T and the weighted sum of V (shapes (B, H, N, D)); the flop counter has no formula for the
    CPU's fused attention."""
    b, h, n, d = query
    return 2 * b * h * n * key[-2] * (d + value[-1])


def step_flops(fn: Callable[[], Any]) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds per category of one call (self CPU time of the profiler's aten ops; those inside a
    Winograd convolution, whose products are ``bmm``, count as convolution)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        fn()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        label = "convolution" if _inside(event, WINOGRAD_RECORD) else category(event.name)
        totals[label] += event.self_cpu_time_total / 1e6
    return dict(totals)


def _inside(event: Any, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="none", choices=["none", "winograd", "channels_last", "compile"])
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument(
        "--token-merging",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="also time openldm with token merging at RATIO (and diffusers patched by tomesd, same weights)",
    )
    args = parser.parse_args()
    peers.set_threads(args.threads)
    # What openldm's pipelines do while sampling; process-wide, so diffusers' UNet here gains it too.
    # (A `with`: a context entered on a discarded ExitStack is closed when the stack is collected.)
    with reusing_freed_host_memory(torch.device("cpu")) as kept:
        print(f"freed memory kept for reuse: {kept} (OPENLDM_KEEP_FREED_MEMORY=0: not)")
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Times and breaks down the guided steps ``args`` asks for, and prints the tables."""
    spec = preset(args.preset)
    with torch.device("meta"):
        meta = UNetModel(spec.unet)
    sd = random_state_dict(meta, torch.Generator().manual_seed(0), torch.float32)
    ours = UNetModel(spec.unet).eval()
    ours.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    side = args.size // 8
    # a guided step: the latents twice (openldm's UNet then runs the blocks before the prompt once)
    x = torch.randn(1, spec.unet.in_channels, side, side, generator=g).repeat(2, 1, 1, 1)
    context = torch.randn(2, 77, spec.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])

    # the floor counts the whole direct computation: on distinct halves, before any variant
    distinct = torch.randn(2, spec.unet.in_channels, side, side, generator=g)
    flops = step_flops(lambda: ours(distinct, t, context))
    if args.variant == "winograd":
        winograd_for(ours, torch.device("cpu"))
    if args.variant == "channels_last":
        ours = ours.to(memory_format=torch.channels_last)
    runner: Any = torch.compile(ours) if args.variant == "compile" else ours
    calls: dict[str, Callable[[], Any]] = {"openldm": lambda: runner(x, t, context)}
    if not args.no_diffusers:
        theirs = peers.diffusers_unet(spec, sd).eval()
        calls["diffusers"] = lambda: theirs(x, t, encoder_hidden_states=context).sample
    if args.token_merging:
        ratio = args.token_merging

        def merged() -> Any:
            with merging_tokens(ratio, (side, side), torch.Generator().manual_seed(0)):
                return runner(x, t, context)

        calls["openldm+tome"] = merged
        if not args.no_diffusers:
            import tomesd

            patched = peers.diffusers_unet(spec, sd).eval()  # the same weight tensors, not a copy
            tomesd.apply_patch(patched, ratio=ratio)
            calls["diffusers+tomesd"] = lambda: patched(x, t, encoder_hidden_states=context).sample
        with torch.no_grad():
            whole, near = runner(x, t, context), merged()
        distance = ((near - whole).norm() / whole.norm()).item()
        print(f"token merging {ratio:g}: output's relative L2 distance to the whole one {distance:.4f}")

    rate = sgemm_rate()
    floor = flops / rate
    print(f"floor: {flops / 1e12:.3f} TFLOP per guided step / {rate / 1e9:.0f} GFLOP/s = {floor:.2f} s")

    start = time.perf_counter()
    for call in calls.values():
        _timed(call)  # warm-up (and compilation)
    print(f"warm-up: {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            times[name].append(_timed(call))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:10s} {seconds:6.2f} s per guided step ({seconds / floor:.2f}x the floor)")
    if "diffusers" in medians:
        print(f"openldm / diffusers: {medians['openldm'] / medians['diffusers']:.2f}")
    if "openldm+tome" in medians:
        print(f"token merging speed-up: {medians['openldm'] / medians['openldm+tome']:.2f}x")
    if "diffusers+tomesd" in medians:
        print(f"openldm+tome / diffusers+tomesd: {medians['openldm+tome'] / medians['diffusers+tomesd']:.2f}")

    print("\n| category | " + " | ".join(f"{n} s | {n} %" for n in calls) + " |")
    print("|---|" + "---|---|" * len(calls))
    parts = {name: breakdown(call) for name, call in calls.items()}
    labels = [label for label, _ in CATEGORIES] + ["other"]
    for label in labels:
        cells = []
        for name in calls:
            total = sum(parts[name].values())
            seconds = parts[name].get(label, 0.0)
            cells.append(f"{seconds:.2f} | {100 * seconds / total:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
