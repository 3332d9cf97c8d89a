"""LoRA training on full-size SD 1.5 (random weights): seconds per step and peak memory, with and without
gradient checkpointing, openldm against diffusers + peft.

Both train rank-16 LoRA layers on the UNet's attention, projection and feed-forward layers (openldm's
targets), batch 1 at 512x512, AdamW, fp32 on the CPU, from latents encoded beforehand (openldm encodes
its data once before training; the peer gets latents of the same shape), the text encoder frozen:

* openldm: the command, ``openldm finetune --method lora --ckpt sd15.safetensors --data DATA
  --resolution 512 --steps N [--gradient-checkpointing]`` (step times from its log);
* diffusers: ``UNet2DConditionModel`` with openldm's weights (``bench/peers.py``), peft's
  ``add_adapter(LoraConfig(...))`` on the same layers, ``enable_gradient_checkpointing()`` when asked,
  and the loop any diffusers training script runs (noise, timestep, forward, MSE, backward, AdamW).

Each run is a fresh process; the first step is a warm-up and not counted. Peak RSS is the process's
VmHWM over the whole run (load included). Run: ``python bench/finetune_full_size.py [--steps 4]``
(about 15 minutes on 2 cores); ``--tiny`` checks the script on the tiny test configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peers  # bench/peers.py: puts this checkout on sys.path
import torch
from lora_apply import spec_of, write_checkpoint

RANK = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def write_data(folder: Path, size: int) -> None:
    """Four captioned pictures (coloured discs on grey)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index, colour in enumerate(["red", "green", "blue", "yellow"]):
        image = Image.new("RGB", (size, size), (120, 120, 120))
        ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a {colour} disc")


def run_openldm(checkpoint: str, data: str, steps: int, checkpointing: bool, size: int) -> dict[str, float]:
    from openldm.cli import main

    with tempfile.TemporaryDirectory() as out:
        argv = ["finetune", "--method", "lora", "--ckpt", checkpoint, "--data", data, "--out", out]
        argv += ["--resolution", str(size), "--steps", str(steps), "--rank", str(RANK)]
        argv += ["--checkpoint-every", str(steps + 1)] + (
            ["--gradient-checkpointing"] if checkpointing else []
        )
        if main(argv) != 0:
            raise RuntimeError("openldm finetune failed")
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    times = [b["seconds"] - a["seconds"] for a, b in zip(log, log[1:], strict=False)]
    return {"step_s": sum(times) / len(times), "peak_mb": peers.peak_mb()}


def run_diffusers(
    checkpoint: str, steps: int, checkpointing: bool, size: int, tiny: bool
) -> dict[str, float]:
    from peft import LoraConfig

    import openldm

    model = openldm.load(checkpoint, dtype=torch.float32)
    spec = model.spec
    unet = peers.diffusers_unet(spec, model.unet.state_dict())
    text = peers.transformers_text_encoder(spec, model.text_encoder.state_dict())
    ids = torch.tensor([model.tokenizer.window(model.tokenizer.encode("a red disc"))])
    del model
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    alphas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000).pow(2)
    alphas_cumprod = torch.cumprod(1 - alphas, 0)
    latent = size // spec.vae.downsampling_factor
    gen = torch.Generator().manual_seed(0)
    marks = []
    for _ in range(steps):
        with torch.no_grad():
            context = text(ids)[0]
        x0 = torch.randn(1, 4, latent, latent, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (1,), generator=gen)
        a = alphas_cumprod[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        marks.append(time.perf_counter())
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"step_s": sum(times) / len(times), "peak_mb": peers.peak_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first not counted")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration (checks the script)")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "GC", "CKPT", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = 64 if args.tiny else 512
    if args.worker:
        tool, gc, checkpoint, data = args.worker
        if tool == "openldm":
            result = run_openldm(checkpoint, data, args.steps, gc == "1", size)
        else:
            result = run_diffusers(checkpoint, args.steps, gc == "1", size, args.tiny)
        print(json.dumps(result))
        return 0
    spec = spec_of(args.tiny)
    results: dict[tuple[str, bool], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, data = Path(folder) / "sd15.safetensors", Path(folder) / "data"
        write_checkpoint(spec, checkpoint)
        write_data(data, size)
        print(f"{spec.name}: rank-{RANK} LoRA, batch 1 at {size}x{size}, {args.steps} steps, fp32, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        for gc in (False, True):
            for tool in ("openldm", "diffusers"):
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--worker", tool, str(int(gc))]
                cmd += [str(checkpoint), str(data)] + (["--tiny"] if args.tiny else [])
                done = subprocess.run(cmd, capture_output=True, text=True, env=peers.quiet_environment())
                if done.returncode != 0:
                    print(f"{tool} failed:\n{done.stderr[-3000:]}")
                    return 1
                results[tool, gc] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'':34}{'openldm':>10}{'diffusers':>11}{'ratio':>8}")
    for gc in (False, True):
        label = "with" if gc else "without"
        for key, unit in (("step_s", "s/step"), ("peak_mb", "peak RSS MB")):
            ours, theirs = results["openldm", gc][key], results["diffusers", gc][key]
            name = f"{unit}, {label} grad. ckpt."
            print(f"{name:34}{ours:>10.2f}{theirs:>11.2f}{ours / theirs:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
