"""Load time and peak memory of a full-size SD 2.1 768-v single file: openldm against diffusers.

Writes an original single ``.safetensors`` file with random weights in the layout and dtype of the
published ``v2-1_768-ema-pruned.safetensors`` (fp16; UNet, VAE and the OpenCLIP-H text tower below
``cond_stage_model.model.`` with all 24 resblocks; about 2.6 GB), unless ``--path`` names one.
Then, each in a fresh subprocess so that its peak RSS is its own:

* openldm: ``openldm.load(path, prediction_type="v")``
* diffusers: ``StableDiffusionPipeline.from_single_file(path, config=<local folder with the real
  SD 2.1 configs>, local_files_only=True)``

Measured in the subprocess: wall time of the load call; RSS after imports (the baseline); peak RSS
(``ru_maxrss``, read before and after the load; VmHWM as a cross-check, since Linux carries
``ru_maxrss`` over from the parent through fork and exec, which is why the driver stays small);
then the time to read every weight once and the peak after that.
openldm leaves a safetensors file memory-mapped when no cast is needed, so its load reads little; the
"ready" columns (load + read every weight) compare the two once both hold all weights in memory.
Every configuration is run once untimed first, so the file is in the page cache for all timed runs.

Run: ``python bench/load_full_size.py`` (``--help`` for the options). Takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("openldm", "diffusers")
DTYPES = ("float16", "float32")

# --- the real SD 2.1 (768-v) diffusers configs -------------------------------------------------

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "!",
    "unk_token": "<|endoftext|>",
}
TOKENIZER_CONFIG = {
    **SPECIAL_TOKENS,
    "add_prefix_space": False,
    "do_lower_case": True,
    "errors": "replace",
    "model_max_length": 77,
    "tokenizer_class": "CLIPTokenizer",
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_diffusers_config(folder: Path) -> Path:
    """A diffusers SD 2.1 folder without weights: what ``from_single_file(config=...)`` reads."""
    sys.path.insert(0, str(REPO))
    from openldm.tokenizer import packaged_vocab

    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "unet" / "config.json", UNET_CONFIG)
    _write_json(folder / "vae" / "config.json", VAE_CONFIG)
    _write_json(folder / "text_encoder" / "config.json", TEXT_ENCODER_CONFIG)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(folder / "tokenizer" / "special_tokens_map.json", SPECIAL_TOKENS)
    _write_json(folder / "tokenizer" / "tokenizer_config.json", TOKENIZER_CONFIG)
    vocab = packaged_vocab()  # the CLIP BPE vocabulary SD 2.1's tokenizer files hold
    _write_json(folder / "tokenizer" / "vocab.json", vocab.encoder)
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return folder


# --- the random-weights single file ------------------------------------------------------------


def _schedule_buffers() -> dict[str, Any]:
    """The reference's noise-schedule buffers, stored in published files (fp32 there too)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
    variance = betas * (1 - prev) / (1 - alphas)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas).log(),
        "sqrt_recip_alphas_cumprod": alphas.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas - 1).sqrt(),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas),
    }
    return {k: v.float() for k, v in buffers.items()}


def _random_like(model: Any, gen: Any) -> dict[str, Any]:
    """Random fp16 tensors with the names and shapes of ``model``'s state dict (built on meta)."""
    import torch

    return {k: (torch.randn(v.shape, generator=gen) * 0.02).half() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path) -> None:
    """The SD 2.1 768-v original single file, random fp16 weights."""
    sys.path.insert(0, str(REPO))
    import safetensors.torch
    import torch

    from openldm.checkpoints.formats.clip import text_to_open_clip
    from openldm.config import PRESETS
    from openldm.nn.clip import CLIPTextEncoder
    from openldm.nn.unet import UNetModel
    from openldm.nn.vae import AutoencoderKL

    spec = PRESETS["sd2-v"]
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet, vae, text = UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextEncoder(spec.text)
    sd = {f"model.diffusion_model.{k}": v for k, v in _random_like(unet, gen).items()}
    sd |= {f"first_stage_model.{k}": v for k, v in _random_like(vae, gen).items()}
    ours = _random_like(text, gen)
    layer0 = "text_model.encoder.layers.0."
    last = {
        k[len(layer0) :]: (torch.randn(v.shape, generator=gen) * 0.02).half()
        for k, v in ours.items()
        if k.startswith(layer0)
    }
    width = spec.text.width
    projection = (torch.randn(width, width, generator=gen) * 0.03).half()
    oc = text_to_open_clip(ours, [last], projection, torch.tensor(4.6052, dtype=torch.float16))
    sd |= {f"cond_stage_model.model.{k}": v for k, v in oc.items()}
    sd |= _schedule_buffers()
    sd = {k: v.contiguous() for k, v in sd.items()}
    del ours, oc
    tmp = path.with_name(path.name + ".partial")
    safetensors.torch.save_file(sd, tmp)
    tmp.rename(path)
    del sd
    gc.collect()


# --- one measurement, in a subprocess ----------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """VmHWM: the peak RSS of this process's own memory map (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load_openldm(path: str, dtype: str) -> list[Any]:
    import torch

    import openldm

    torch_dtype = None if dtype == "float16" else getattr(torch, dtype)  # fp16 is the stored dtype
    model = openldm.load(path, prediction_type="v", dtype=torch_dtype)
    return [model.unet, model.vae, model.text_encoder]


def _load_diffusers(path: str, dtype: str, config: str) -> list[Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        path, config=config, local_files_only=True, torch_dtype=getattr(torch, dtype)
    )
    return [pipe.unet, pipe.vae, pipe.text_encoder]


def worker(tool: str, path: str, dtype: str, config: str) -> dict[str, float]:
    """Import, load, read every weight once; print the measurements as one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    if tool == "openldm":
        import openldm.checkpoints.load  # noqa: F401  (the imports are not part of the load)
    else:
        import diffusers.loaders.single_file_utils  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import StableDiffusionPipeline  # noqa: F401
    gc.collect()
    base_rss, base_peak = _rss_mb(), _peak_mb()
    start = time.perf_counter()
    nets = _load_openldm(path, dtype) if tool == "openldm" else _load_diffusers(path, dtype, config)
    load_s = time.perf_counter() - start
    load_peak, load_hwm = _peak_mb(), _hwm_mb()
    with torch.no_grad():
        total = sum(float(p.sum(dtype=torch.float32)) for net in nets for p in net.parameters())
    ready_s = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for net in nets for p in net.parameters()})
    params = sum(p.numel() for net in nets for p in net.parameters())
    return {
        "load_s": load_s,
        "ready_s": ready_s,
        "base_rss_mb": base_rss,
        "base_peak_mb": base_peak,
        "load_peak_mb": load_peak,
        "load_hwm_mb": load_hwm,
        "ready_peak_mb": _peak_mb(),
        "params": params,
        "dtypes": "/".join(dtypes),
        "checksum_finite": bool(torch.isfinite(torch.tensor(total))),
    }


def run_once(tool: str, path: Path, dtype: str, config: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, "--path", str(path), "--dtype", dtype]
    cmd += ["--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} ({dtype}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the driver ---------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[tuple[str, str], list[dict[str, Any]]], repeats: int) -> str:
    rows = [
        ("load time (s)", "load_s", "{:.2f}"),
        ("load + read all weights (s)", "ready_s", "{:.2f}"),
        ("RSS after imports (MB)", "base_rss_mb", "{:.0f}"),
        ("peak RSS after load (MB)", "load_peak_mb", "{:.0f}"),
        ("  above the baseline (MB)", "load_delta_mb", "{:.0f}"),
        ("  cross-check: VmHWM (MB)", "load_hwm_mb", "{:.0f}"),
        ("ru_maxrss before the load (MB)", "base_peak_mb", "{:.0f}"),
        ("peak RSS after reading all (MB)", "ready_peak_mb", "{:.0f}"),
        ("  above the baseline (MB)", "ready_delta_mb", "{:.0f}"),
    ]
    for runs in results.values():
        for r in runs:
            r["load_delta_mb"] = r["load_peak_mb"] - r["base_rss_mb"]
            r["ready_delta_mb"] = r["ready_peak_mb"] - r["base_rss_mb"]
    lines = [f"median of {repeats} timed runs each, page cache warm (one untimed run first)"]
    for dtype in sorted({d for _, d in results}):
        ours, theirs = results[("openldm", dtype)], results[("diffusers", dtype)]
        lines.append("")
        lines.append(
            f"weights in {dtype} (openldm: {ours[0]['dtypes']}, diffusers: {theirs[0]['dtypes']}; "
            f"{ours[0]['params'] / 1e6:.0f}M / {theirs[0]['params'] / 1e6:.0f}M parameters)"
        )
        lines.append(f"{'':34}{'openldm':>10}{'diffusers':>11}{'ratio':>8}")
        for label, key, fmt in rows:
            a, b = _median(ours, key), _median(theirs, key)
            ratio = f"{a / b:.2f}" if b > 0 else "-"
            lines.append(f"{label:34}{fmt.format(a):>10}{fmt.format(b):>11}{ratio:>8}")
        spread = {t: [round(r["load_s"], 2) for r in results[(t, dtype)]] for t in TOOLS}
        lines.append(f"load times of every run: {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="an existing SD 2.1 768-v single file to load instead")
    parser.add_argument("--workdir", type=Path, help="where to write the file and configs (default: /tmp)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        nargs="+",
        default=["float16"],
        help="load dtypes: float16 (as stored) and/or float32",
    )
    parser.add_argument("--keep", action="store_true", help="keep the written file and configs")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.prepare:
        write_diffusers_config(args.prepare / "sd21-config")
        if not args.path.is_file():
            write_checkpoint(args.path)
        return 0

    if args.worker:
        print(json.dumps(worker(args.worker, str(args.path), args.dtype[0], str(args.config))))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.path is not None and not args.path.is_file():
        parser.error(f"--path {args.path}: no such file")

    workdir = Path(tempfile.mkdtemp(prefix="openldm-bench-", dir=args.workdir or "/tmp"))
    try:
        config = workdir / "sd21-config"
        path = args.path or workdir / "sd21-768-v-random.safetensors"
        # In a subprocess: this driver stays small (its memory would show in the workers' ru_maxrss,
        # which Linux carries over from the parent through fork and exec).
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--prepare", str(workdir), "--path", str(path)]
        subprocess.run(cmd, check=True)
        if args.path is None:
            print(
                f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, random fp16 weights) "
                f"in {time.perf_counter() - start:.0f} s"
            )
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for dtype in args.dtype:
            for tool in TOOLS:
                start = time.perf_counter()
                run_once(tool, path, dtype, config)  # untimed: warms the page cache
                runs = [run_once(tool, path, dtype, config) for _ in range(args.repeats)]
                results[(tool, dtype)] = runs
                took = time.perf_counter() - start
                print(f"{tool} {dtype}: {[round(r['load_s'], 2) for r in runs]} s ({took:.0f} s)", flush=True)
        print()
        print(report(results, args.repeats))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
