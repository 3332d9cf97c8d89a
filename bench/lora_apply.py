"""Applying a LoRA to full-size SD 1.5 (random weights): seconds and memory, openldm against diffusers.

The LoRA is a kohya / web UI file of rank ``--rank`` (default 128) in fp16 over every layer such files
change: the transformer blocks' linear layers and 1x1 projections of the UNet and the text encoder's
attention and MLP layers (alpha = rank / 2). Each tool runs in a fresh subprocess on the same random
weights: openldm's SD 1.5 preset, seeded, written as an original single file in fp16 (as SD 1.5 is
downloaded) and loaded in float32 (as both tools run on the CPU):

* openldm: ``load_lora`` (read the file, check every key, secure the way back of every weight it
  changes: the checkpoint file itself when the weight is still what the file holds, else a copy; add
  the changes into the weights), then ``unload_lora`` (checked to restore the weights bit for bit);
* diffusers: ``load_lora_weights``' parts (``lora_state_dict``, ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder``, with peft) then ``fuse_lora`` (so that sampling costs no more than
  without the LoRA, as openldm's), then ``unfuse_lora`` + ``unload_lora_weights``.

Reported: seconds to apply and to remove, the RSS added once applied, the peak RSS during the apply
(VmHWM reset first), and the bytes openldm copies to restore the weights, against the networks' bytes.

Run: ``python bench/lora_apply.py`` (about 2 minutes and 9 GB at full size; ``--tiny`` checks the
script on the tiny test configuration in seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peers  # bench/peers.py: puts this checkout on sys.path
import torch

from openldm.config import ModelSpec, preset

TOOLS = ("openldm", "diffusers")
UNET_LAYERS = (".proj_in", ".proj_out", ".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def spec_of(tiny: bool) -> ModelSpec:
    if tiny:
        from tests.tiny import TINY

        return TINY["sd1"]
    return preset("sd15")


def write_checkpoint(spec: ModelSpec, path: Path) -> None:
    """The original single file of ``spec`` with seeded random fp16 weights."""
    import safetensors.torch

    from openldm.nn.clip import CLIPTextEncoder
    from openldm.nn.unet import UNetModel
    from openldm.nn.vae import AutoencoderKL

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for prefix, cls, config in (
        ("model.diffusion_model.", UNetModel, spec.unet),
        ("first_stage_model.", AutoencoderKL, spec.vae),
        ("cond_stage_model.transformer.", CLIPTextEncoder, spec.text),
    ):
        with torch.device("meta"):
            net = cls(config)
        for key, value in net.state_dict().items():
            sd[prefix + key] = (torch.randn(value.shape, generator=gen) * 0.02).half()
    safetensors.torch.save_file(sd, str(path))


def load(path: Path) -> Any:
    import openldm

    return openldm.load(path, dtype=torch.float32)


def write_lora(spec: ModelSpec, unet: torch.nn.Module, text: torch.nn.Module, rank: int, path: Path) -> int:
    """The kohya LoRA file (fp16); returns how many layers it changes."""
    import safetensors.torch

    from openldm.checkpoints.formats.unet import unet_key_to_diffusers

    gen = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        theirs = unet_key_to_diffusers(name + ".weight", spec.unet)[:-7]
        if theirs.endswith(UNET_LAYERS):
            layers.append(("lora_unet_" + theirs.replace(".", "_"), module.weight.shape))
    for name, module in text.named_modules():
        if name.endswith(TEXT_LAYERS):
            layers.append(("lora_te_" + name.replace(".", "_"), module.weight.shape))
    for name, shape in layers:
        r = min(rank, shape[0], shape[1])
        kernel = (1,) * (len(shape) - 2)
        sd[f"{name}.lora_down.weight"] = (torch.randn(r, shape[1], *kernel, generator=gen) * 0.05).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(shape[0], r, *kernel, generator=gen) * 0.05).half()
        sd[f"{name}.alpha"] = torch.tensor(r / 2, dtype=torch.float16)
    safetensors.torch.save_file(sd, str(path))
    return len(layers)


def _bytes(*nets: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for net in nets for p in net.parameters())


def run_openldm(checkpoint: Path, path: Path, check: bool) -> dict[str, Any]:
    model = load(checkpoint)
    unet, text = model.unet, model.text_encoder
    before = {k: v.clone() for k, v in unet.state_dict().items()} if check else None
    rss = peers.rss_mb()
    peers.reset_peak()
    start = time.perf_counter()
    model.load_lora(path, 1.0)
    applied = time.perf_counter() - start
    result = {"apply_s": applied, "added_mb": peers.rss_mb() - rss, "peak_added_mb": peers.peak_mb() - rss}
    result["kept_mb"] = model.adapters.patches.kept_bytes() / 2**20
    result["networks_mb"] = _bytes(unet, text) / 2**20
    start = time.perf_counter()
    model.unload_lora()
    result["remove_s"] = time.perf_counter() - start
    if before is not None:
        result["exact"] = all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    return result


def run_diffusers(checkpoint: Path, path: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    model = load(checkpoint)
    theirs_unet = peers.diffusers_unet(model.spec, model.unet.state_dict())
    theirs_text = peers.transformers_text_encoder(model.spec, model.text_encoder.state_dict())
    del model
    rss = peers.rss_mb()
    peers.reset_peak()
    start = time.perf_counter()
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs_unet, adapter_name="x")
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, alphas, text_encoder=theirs_text, adapter_name="x"
    )
    theirs_unet.fuse_lora() if hasattr(theirs_unet, "fuse_lora") else None
    applied = time.perf_counter() - start
    result = {"apply_s": applied, "added_mb": peers.rss_mb() - rss, "peak_added_mb": peers.peak_mb() - rss}
    result["networks_mb"] = _bytes(theirs_unet, theirs_text) / 2**20
    start = time.perf_counter()
    if hasattr(theirs_unet, "unfuse_lora"):
        theirs_unet.unfuse_lora()
    theirs_unet.unload_lora() if hasattr(theirs_unet, "unload_lora") else None
    result["remove_s"] = time.perf_counter() - start
    return result


def worker(tool: str, checkpoint: str, path: str, tiny: bool) -> None:
    peers.set_threads(None)
    if tool == "openldm":
        result = run_openldm(Path(checkpoint), Path(path), check=tiny)
    else:
        result = run_diffusers(Path(checkpoint), Path(path))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration (checks the script)")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "CKPT", "LORA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.tiny)
        return 0
    spec = spec_of(args.tiny)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, path = Path(folder) / "sd15.safetensors", Path(folder) / "lora.safetensors"
        write_checkpoint(spec, checkpoint)
        model = load(checkpoint)
        count = write_lora(spec, model.unet, model.text_encoder, args.rank, path)
        del model
        print(
            f"{spec.name}: a rank-{args.rank} LoRA over {count} layers, {path.stat().st_size / 2**20:.0f} MB"
        )
        results = {}
        for tool in TOOLS:
            cmd = [sys.executable, __file__, "--worker", tool, str(checkpoint), str(path)]
            cmd += ["--tiny"] if args.tiny else []
            done = subprocess.run(cmd, capture_output=True, text=True, env=peers.quiet_environment())
            if done.returncode != 0:
                print(f"{tool} failed:\n{done.stderr[-2000:]}")
                return 1
            results[tool] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["openldm"], results["diffusers"]
    print(f"{'':22}{'openldm':>10}{'diffusers':>11}{'ratio':>8}")
    for key, label in (
        ("apply_s", "apply (s)"),
        ("remove_s", "remove (s)"),
        ("added_mb", "RSS added (MB)"),
        ("peak_added_mb", "peak RSS added (MB)"),
    ):
        ratio = ours[key] / theirs[key] if theirs[key] > 0 else float("nan")
        print(f"{label:22}{ours[key]:>10.2f}{theirs[key]:>11.2f}{ratio:>8.2f}")
    print(
        f"openldm copied {ours['kept_mb']:.0f} MB of weights to restore them (the rest comes back from the "
        f"checkpoint file); the UNet and text encoder hold {ours['networks_mb']:.0f} MB"
    )
    if "exact" in ours:
        print(f"unload restores the weights bit for bit: {ours['exact']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
