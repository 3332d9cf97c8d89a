"""Sampling speed of the embedded default model at 64x64: openldm against diffusers, same weights, same run.

The embedded model (``openldm/data/embedded.safetensors``, sizes from the ``embedded`` preset) is loaded
once by ``openldm.load(path, preset="embedded", dtype=torch.float32)``; diffusers'
``StableDiffusionPipeline`` gets the very same fp32 tensors through openldm's key maps (see
``bench/peers.py``) and the scheduler matching each sampler (ddim: DDIMScheduler, euler:
EulerDiscreteScheduler, euler_a: EulerAncestralDiscreteScheduler, dpmpp_2m: DPMSolverMultistepScheduler,
with openldm's timestep spacing for each). First a sanity check: both tools make the same DDIM image
(max abs pixel difference at most 1e-3 in [0, 1]).

Measured, in this process: the seconds per image of a whole call (prompt encoding, sampling, VAE
decoding, PIL images) at 64x64, guidance 7.5, fp32 on the CPU, for each sampler, step count and batch
size. Every configuration runs once untimed per tool, then ``--repeats`` times alternating between the
tools; the median is reported. Then the end-to-end time of the command
``openldm txt2img --prompt "a red circle on a blue background"`` with its defaults, each run a fresh
process, from its start to its last PNG written (the page cache warm: one untimed run first).

Run: ``python bench/sample_embedded.py`` (``--help`` for the options); about 5 to 10 minutes on 2 CPU
cores with the defaults. ``--steps 2 --samplers ddim --batch 1 --repeats 1 --no-cli`` checks the script
in seconds.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import peers  # bench/peers.py, next to this file; it puts the checkout on sys.path before openldm's import
import torch

import openldm

DEFAULT_PATH = peers.REPO / "openldm" / "data" / "embedded.safetensors"
PROMPT = "a red circle on a blue background"
NEGATIVE = ""
GUIDANCE = 7.5
SEED = 0
CHECK_TOL = 1e-3
TOOLS = ("openldm", "diffusers")


def load_pair(path: Path, workdir: Path) -> tuple[Any, Any]:
    """(openldm model, diffusers pipeline) on the same fp32 weights."""
    import diffusers

    model = openldm.load(path, preset="embedded", dtype=torch.float32)
    spec = model.spec
    parts = peers.sd_components(
        spec,
        model.unet.state_dict(),
        model.vae.state_dict(),
        model.text_encoder.state_dict(),
        folder=workdir / "tokenizer",
    )
    pipe = diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def runners(model: Any, pipe: Any, sampler: str) -> dict[str, Callable[..., Any]]:
    """``run(steps, batch, output_type)`` for each tool, with ``sampler`` and its diffusers peer."""
    size = model.spec.image_size
    pipe.scheduler = peers.diffusers_scheduler(sampler, model.spec)

    def ours(steps: int, batch: int, output_type: str = "pil") -> Any:
        return model.txt2img(
            PROMPT,
            NEGATIVE,
            steps=steps,
            guidance_scale=GUIDANCE,
            width=size,
            height=size,
            sampler=sampler,
            seed=SEED,
            n_samples=batch,
            output_type=output_type,
            progress=False,
        ).images

    def theirs(steps: int, batch: int, output_type: str = "pil") -> Any:
        return pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=size,
            width=size,
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type=output_type,
        ).images

    return {"openldm": ours, "diffusers": theirs}


def sanity_check(model: Any, pipe: Any, steps: int) -> str:
    """Both tools' DDIM image, compared in [0, 1] pixels."""
    run = runners(model, pipe, "ddim")
    with torch.inference_mode():
        ours = np.asarray(run["openldm"](steps, 1, "np"), dtype=np.float64)
        theirs = np.asarray(run["diffusers"](steps, 1, "np"), dtype=np.float64)
    err = float(np.abs(ours - theirs).max())
    verdict = "OK" if err <= CHECK_TOL else f"MISMATCH (> {CHECK_TOL:g}): the timings compare different work"
    return (
        f"sanity check, DDIM {steps} steps, batch 1: max abs pixel difference {err:.2e} "
        f"(image std {theirs.std():.3f}) -> {verdict}"
    )


def time_call(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(*args)
    return time.perf_counter() - start


def measure(
    model: Any, pipe: Any, samplers: list[str], steps: list[int], batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for sampler in samplers:
        run = runners(model, pipe, sampler)
        for n in steps:
            for batch in batches:
                for tool in TOOLS:  # untimed: first-call costs
                    time_call(run[tool], n, batch)
                times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
                for _ in range(repeats):  # alternating, so a busy moment hits both tools alike
                    for tool in TOOLS:
                        times[tool].append(time_call(run[tool], n, batch))
                row = {"sampler": sampler, "steps": n, "batch": batch}
                row |= {tool: statistics.median(t) / batch for tool, t in times.items()}
                rows.append(row)
                print(
                    f"{sampler} {n} steps batch {batch}: openldm {row['openldm']:.3f} s/image, "
                    f"diffusers {row['diffusers']:.3f} s/image",
                    flush=True,
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| sampler | steps | batch | openldm s/image | diffusers s/image | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["openldm"], r["diffusers"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['batch']} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    return "\n".join(lines)


# --- the command line, end to end ---------------------------------------------------------------


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "openldm"
    if script.is_file():
        return [str(script)]
    found = shutil.which("openldm")
    return [found] if found else [sys.executable, "-m", "openldm.cli"]


def cli_run(args: list[str], cwd: Path, threads: int | None) -> tuple[float, float, int, str]:
    """(seconds to the last PNG, seconds to exit, PNGs written, stderr) of one run in ``cwd``."""
    env = peers.quiet_environment()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start_wall, start = time.time(), time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    exit_s = time.perf_counter() - start
    if done.returncode != 0:
        return float("nan"), exit_s, 0, done.stderr
    pngs = list(cwd.rglob("*.png"))
    last = max((p.stat().st_mtime for p in pngs), default=float("nan"))
    return last - start_wall, exit_s, len(pngs), done.stderr


def cli_benchmark(path: Path, repeats: int, threads: int | None, workdir: Path, extra: list[str]) -> str:
    base = [*cli_command(), "txt2img", "--prompt", PROMPT, *extra]
    shown = shlex.join(["openldm", "txt2img", "--prompt", PROMPT, *extra])
    note = ""
    runs = []
    for i in range(repeats + 1):  # the first run is untimed: it warms the page cache
        cwd = workdir / f"cli-{i}"
        cwd.mkdir()
        png_s, exit_s, count, stderr = cli_run(base, cwd, threads)
        if count == 0 and i == 0 and "--ckpt" in stderr:
            base += ["--ckpt", str(path)]
            shown += f" --ckpt {shlex.quote(str(path))}"
            note = "(the embedded default is not wired into the command yet: --ckpt passed)\n"
            shutil.rmtree(cwd)
            cwd.mkdir()
            png_s, exit_s, count, stderr = cli_run(base, cwd, threads)
        if count == 0:
            raise RuntimeError(f"{shown} failed:\n{stderr[-3000:]}")
        if i > 0:
            runs.append((png_s, exit_s, count))
    png = statistics.median(r[0] for r in runs)
    exit_ = statistics.median(r[1] for r in runs)
    return (
        f"{note}`{shown}` ({runs[0][2]} PNG files: the samples and the grid): "
        f"{png:.2f} s from process start to the last PNG written, {exit_:.2f} s to exit "
        f"(median of {repeats}; every run: {[round(r[0], 2) for r in runs]} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the embedded model file")
    parser.add_argument(
        "--samplers",
        nargs="+",
        choices=list(peers.SCHEDULERS),
        default=list(peers.SCHEDULERS),
        help="samplers to time (default: all)",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 25], help="step counts (default: 20 25)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--check-steps", type=int, default=20, help="DDIM steps of the sanity check")
    parser.add_argument("--cli-repeats", type=int, default=3, help="timed runs of the command (median)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line timing")
    parser.add_argument(
        "--cli-args", default="", help="more flags for the command, e.g. '--ddim_steps 25' (default: none)"
    )
    args = parser.parse_args(argv)

    if not args.path.is_file():
        parser.error(
            f"--path {args.path}: no such file (the embedded model is openldm/data/embedded.safetensors)"
        )
    if min([*args.steps, *args.batch, args.repeats, args.check_steps, args.cli_repeats]) < 1:
        parser.error("--steps, --batch, --repeats, --check-steps and --cli-repeats must be >= 1")
    try:
        peers.set_threads(args.threads)
    except ValueError as e:
        parser.error(str(e))

    workdir = Path(tempfile.mkdtemp(prefix="openldm-bench-embedded-"))
    try:
        model, pipe = load_pair(args.path, workdir)
        print(
            f"embedded model {args.path.name}: {model.spec.image_size}x{model.spec.image_size}, fp32, CPU, "
            f"{torch.get_num_threads()} threads, guidance {GUIDANCE}"
        )
        print(sanity_check(model, pipe, args.check_steps), flush=True)
        rows = measure(model, pipe, args.samplers, args.steps, args.batch, args.repeats)
        print()
        print(
            f"whole calls (encode, sample, decode, PIL), median of {args.repeats}; ratio: openldm / diffusers"
        )
        print()
        print(table(rows))
        if not args.no_cli:
            print()
            print(
                cli_benchmark(args.path, args.cli_repeats, args.threads, workdir, shlex.split(args.cli_args))
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
