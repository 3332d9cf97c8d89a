"""Everything the CPU speed-and-memory work is judged by, in one run: each part is one of the benchmarks
of this folder, run in turn in its own process, its output printed as it comes.

1. ``unet_step.py --variant winograd``: the floor, one guided SD 1.5 UNet step at 512 for openldm (as
   ``openldm.load`` sets it up) and diffusers, interleaved, their ratios, the per-operator breakdown;
2. ``unet_step.py --variant none --no-diffusers``: the same step with direct convolutions (the
   breakdown before Winograd);
3. ``pipelines_full_size.py``: seconds per step of every pipeline against diffusers, and peak RSS;
4. ``sample_embedded.py``: the embedded model's seconds per image against diffusers, and the time
   from ``openldm txt2img`` to its PNG (start-up);
5. ``step_reduction.py``: the step-reduction options' speed-ups and fidelity on the embedded model's
   evaluator; ``step_reduction_full_size.py``: their speed-ups and distances to the full computation
   at full size;
6. ``vae_bands.py``: large images through the VAE by bands against the whole-image VAE and diffusers'
   tiling (seconds, peak memory, difference).

Run: ``python bench/cpu_report.py [--threads 2] [--only unet pipelines embedded steps vae]``. About 2
hours on 2 cores with 24 GB; ``--quick`` runs each part at its smallest useful size (minutes, a check
of the scripts, not numbers to quote).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PARTS: dict[str, list[list[str]]] = {
    "unet": [
        ["unet_step.py", "--variant", "winograd"],
        ["unet_step.py", "--variant", "none", "--no-diffusers"],
    ],
    "pipelines": [["pipelines_full_size.py"]],
    "embedded": [["sample_embedded.py", "--samplers", "ddim", "--steps", "25", "--batch", "1"]],
    "steps": [["step_reduction.py"], ["step_reduction_full_size.py", "--steps", "10"]],
    "vae": [["vae_bands.py"]],
}
QUICK: dict[str, list[list[str]]] = {
    "unet": [["unet_step.py", "--variant", "winograd", "--size", "256", "--repeats", "1"]],
    "pipelines": [["pipelines_full_size.py", "--tiny", "--steps", "1"]],
    "embedded": [
        ["sample_embedded.py", "--samplers", "ddim", "--steps", "2", "--batch", "1", "--repeats", "1"]
        + ["--check-steps", "2", "--cli-repeats", "1"]
    ],
    "steps": [
        ["step_reduction.py", "--n", "16", "--step-list", "15", "--cfg-ends", "1.0", "0.6"],
        ["step_reduction_full_size.py", "--steps", "2", "--size", "128"],
    ],
    "vae": [["vae_bands.py", "--quick"]],
}
THREADED = {
    "unet_step.py",
    "pipelines_full_size.py",
    "sample_embedded.py",
    "step_reduction.py",
    "step_reduction_full_size.py",
    "vae_bands.py",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every part (default: 2)")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes: checks the scripts")
    args = parser.parse_args()
    failed = []
    for part in args.only:
        for command in (QUICK if args.quick else PARTS)[part]:
            script, *rest = command
            if script in THREADED:
                rest += ["--threads", str(args.threads)]
            line = " ".join(["python", f"bench/{script}", *rest])
            print(f"\n## {line}\n", flush=True)
            start = time.perf_counter()
            code = subprocess.call([sys.executable, str(HERE / script), *rest])
            print(f"\n({line}: {time.perf_counter() - start:.0f} s, exit {code})", flush=True)
            if code != 0:
                failed.append(line)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
