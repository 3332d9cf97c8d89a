"""A generic training loop: AdamW, linear warm-up, gradient clipping, EMA, checkpoints and resume.

The loop knows nothing about what it trains: it gets a module (the trainable networks, e.g. an
``nn.ModuleDict``) and ``loss_fn(step, part) -> (loss, parts)``, which must draw everything random from
generators fixed by the step (see :func:`openldm.train.data.step_generator`). Then a run resumed from
a checkpoint continues exactly as the uninterrupted run would have.

``part`` says which rows of the step's batch to compute (:class:`Part`): the whole batch, or with
``LoopConfig.workers`` > 1 one of that many blocks of rows, each worker thread computing the forward and
backward of its block with its share of the intra-op threads; the loss and parts it returns are its
block's shares (summed over the blocks they give the batch's). Why: on a few CPU cores the small
tensors of a small model keep a second intra-op thread mostly idle (one step of the embedded UNet takes
0.36 s on 2 threads and 0.41 s on 1), while two workers of one thread each run side by side.

Files in ``out_dir``: ``checkpoint.pt`` (weights, EMA, optimiser, step, RNG state, config; written
atomically every ``checkpoint_every`` steps, at the end and when the time limit stops the run) and
``log.jsonl`` (one line per ``log_every`` steps: step, mean loss since the last line, its parts, learning
rate, gradient norm, seconds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from openldm.files import replaced_when_done
from openldm.train.distributed import ALONE, Ranks
from openldm.train.ema import EMA

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass(frozen=True)
class Part:
    """The rows of a step's batch one worker computes: block ``index`` of ``count`` contiguous blocks."""

    index: int = 0
    count: int = 1

    def rows(self, batch_size: int) -> slice:
        return slice(self.index * batch_size // self.count, (self.index + 1) * batch_size // self.count)

    def share(self, batch_size: int) -> float:
        """The block's fraction of the batch: what a mean over the batch weighs the block's mean by."""
        rows = self.rows(batch_size)
        return (rows.stop - rows.start) / batch_size


WHOLE = Part()
LossFn = Callable[[int, Part], tuple[Tensor, dict[str, float]]]
MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup_steps: int = 100
    # "cosine" decays to ``min_lr_fraction * lr`` at ``steps``; "constant" keeps ``lr`` after warm-up.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999  # None: no EMA
    checkpoint_every: int = 500
    log_every: int = 10
    # Stop (with a checkpoint) once this invocation has run this long; None: no limit.
    minutes: float | None = None
    # Threads that each compute a block of the batch (module docstring); the intra-op threads are shared
    # out among them. Changes the floating-point summation order only, not what is trained.
    workers: int = 1
    # Gradient accumulation: the batch is computed in this many blocks one after the other (less memory,
    # the same step up to summation order).
    accumulate: int = 1
    # Forward passes under autocast in this dtype (the weights and the optimiser stay float32);
    # "fp16" scales the loss against underflow (a GradScaler).
    mixed_precision: MixedPrecision = "no"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use 'constant' or 'cosine'")
        if self.workers < 1 or self.accumulate < 1:
            raise ValueError(f"workers and accumulate must be >= 1, got {self.workers} and {self.accumulate}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"unknown mixed precision {self.mixed_precision!r}; use no, bf16 or fp16")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then constant or cosine."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        low = self.min_lr_fraction
        return self.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))

    def blocks(self, ranks: Ranks) -> int:
        """Blocks each step's batch is cut into: per rank, per accumulation round, per worker."""
        return ranks.world * self.accumulate * self.workers


@dataclass
class LoopResult:
    step: int  # steps done so far (over all runs of this stage)
    finished: bool  # step == config.steps
    seconds: float  # wall time of this invocation
    loss: float  # mean loss of the last logged interval (nan if none)


class _StepLoss(nn.Module):
    """The step's loss as a module's forward (what DistributedDataParallel wraps); ``trained`` holds the
    parameters, ``loss_fn`` uses them."""

    def __init__(self, trained: nn.Module, loss_fn: LossFn, precision: MixedPrecision) -> None:
        super().__init__()
        self.trained = trained
        self.loss_fn = loss_fn
        self.precision = precision

    def forward(self, step: int, part: Part) -> tuple[Tensor, dict[str, float]]:
        if self.precision == "no":
            return self.loss_fn(step, part)
        device = next(p for p in self.trained.parameters() if p.requires_grad).device
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=dtype):
            return self.loss_fn(step, part)


def train_loop(
    model: nn.Module,
    loss_fn: LossFn,
    config: LoopConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    ema: EMA | None = None,
    desc: str = "train",
    progress: bool = True,
    ranks: Ranks = ALONE,
    after_step: Callable[[int], None] | None = None,
    meta: dict[str, object] | None = None,
) -> LoopResult:
    """Train ``model``'s parameters that require grad for ``config.steps`` steps (or until the time limit).

    ``ema`` (made here with ``config.ema_decay`` when None; none when that is None too) tracks ``model``.
    With ``resume`` the run continues from ``out_dir/checkpoint.pt`` when it exists; without it an
    existing checkpoint is an error, so a finished run is never overwritten by accident. ``meta`` is
    kept in the checkpoint, and a resumed run must bring the same. Under torchrun (``ranks``) each rank
    computes its blocks of every batch, ``DistributedDataParallel`` sums the gradients, and rank 0
    alone writes. ``after_step(step)`` runs on every rank after each step.
    """
    out = Path(out_dir)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if ranks.distributed and config.workers > 1:
        raise ValueError("worker threads and several processes do not mix: use workers=1 under torchrun")
    # The fused kernel: on the CPU a step of the embedded UNet's AdamW takes 8 ms instead of 30.
    fused = True if all(p.device.type in ("cpu", "cuda") for p in params) else None
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused
    )
    if ema is None and config.ema_decay is not None:
        ema = EMA(model, config.ema_decay)
    scaler = torch.amp.GradScaler(params[0].device.type) if config.mixed_precision == "fp16" else None
    step = _start(out, model, optimizer, ema, scaler, resume, meta)
    if ranks.is_main:
        _truncate_log(out / LOG, step)
    runner: nn.Module = _StepLoss(model, loss_fn, config.mixed_precision)
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device = params[0].device
        runner = DistributedDataParallel(runner, device_ids=[device] if device.type == "cuda" else None)
    start_time = time.perf_counter()
    deadline = None if config.minutes is None else start_time + 60.0 * config.minutes
    show = progress and ranks.is_main
    bar = tqdm(total=config.steps, initial=step, desc=desc, disable=not show, dynamic_ncols=True)
    window: list[float] = []
    parts_sum: dict[str, float] = {}
    last_loss = float("nan")
    model.train()
    with _workers(config.workers) as pool:
        while step < config.steps:
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss, parts = _forward_backward(runner, step, config, ranks, pool, scaler)
            if not torch.isfinite(loss):
                if ranks.is_main:
                    _save(out, model, optimizer, ema, scaler, step, config, meta)
                raise FloatingPointError(
                    f"{desc}: the loss is {loss.item()} at step {step}; lower the learning rate "
                    f"(the last good state is in {out / CHECKPOINT})"
                )
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            window.append(loss.item())
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                last_loss = sum(window) / len(window)
                entry = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm}
                entry.update({k: v / len(window) for k, v in parts_sum.items()})
                entry["seconds"] = round(time.perf_counter() - start_time, 2)
                if ranks.is_main:
                    with open(out / LOG, "a", encoding="utf-8") as log:
                        log.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{last_loss:.4f}")
                window, parts_sum = [], {}
            if after_step is not None:
                after_step(step)
            timed_out = ranks.any(deadline is not None and time.perf_counter() > deadline)
            if step % config.checkpoint_every == 0 or step == config.steps or timed_out:
                if ranks.is_main:
                    _save(out, model, optimizer, ema, scaler, step, config, meta)
                ranks.barrier()
            if timed_out:
                break
    bar.close()
    model.eval()
    return LoopResult(step, step >= config.steps, time.perf_counter() - start_time, last_loss)


@contextmanager
def _workers(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of ``workers`` threads (None for one), the intra-op threads shared out among them."""
    if workers == 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="train-worker") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _forward_backward(
    runner: nn.Module,
    step: int,
    config: LoopConfig,
    ranks: Ranks,
    pool: ThreadPoolExecutor | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, dict[str, float]]:
    """The step's loss and parts over the whole (global) batch, this rank's gradients accumulated in
    the parameters (under DistributedDataParallel: the sum over all ranks, after the last round)."""
    count = config.blocks(ranks)

    def run(part: Part) -> tuple[Tensor, dict[str, float]]:
        loss, parts = runner(step, part)
        # DistributedDataParallel averages the ranks' gradients; each loss is a share of the batch's.
        scaled = loss * ranks.world
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach(), parts

    results: list[tuple[Tensor, dict[str, float]]] = []
    for round_ in range(config.accumulate):
        first = (ranks.rank * config.accumulate + round_) * config.workers
        round_parts = [Part(first + w, count) for w in range(config.workers)]
        last = round_ == config.accumulate - 1
        sync = nullcontext() if last or not ranks.distributed else runner.no_sync()  # type: ignore[operator]
        with sync:
            results.extend(map(run, round_parts) if pool is None else pool.map(run, round_parts))
    loss = ranks.total(torch.stack([r[0] for r in results]).sum().float())
    parts: dict[str, float] = {}
    for _, block_parts in results:
        for key, value in block_parts.items():
            parts[key] = parts.get(key, 0.0) + value
    if ranks.distributed and parts:
        keys = sorted(parts)
        parts = dict(zip(keys, ranks.total(torch.tensor([parts[k] for k in keys])).tolist(), strict=True))
    return loss, parts


def load_ema_weights(out_dir: str | Path, model: nn.Module) -> int:
    """Write the EMA weights of ``out_dir``'s checkpoint into ``model``; return the checkpoint's step."""
    state = _read(Path(out_dir) / CHECKPOINT)
    ema = EMA(model)
    ema.load_state_dict(state["ema"])
    ema.copy_to(model)
    return int(state["step"])


def checkpoint_step(out_dir: str | Path) -> int | None:
    """The step of ``out_dir``'s checkpoint, None when there is none."""
    path = Path(out_dir) / CHECKPOINT
    return int(_read(path)["step"]) if path.is_file() else None


def _start(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler | None,
    resume: bool,
    meta: dict[str, object] | None,
) -> int:
    path = out / CHECKPOINT
    if not path.is_file():
        return 0
    if not resume:
        raise FileExistsError(f"{path} exists; pass --resume to continue that run, or choose another --out")
    state = _read(path)
    _check_meta(path, state.get("meta"), meta)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if state.get("ema") is None:
            raise ValueError(f"{path} was written without EMA; resume it without EMA")
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _check_meta(path: Path, saved: object, given: dict[str, object] | None) -> None:
    if given is None or saved == given:
        return
    saved = saved if isinstance(saved, dict) else {}
    changed = [
        f"{k}: {saved.get(k)!r} then, {given.get(k)!r} now"
        for k in sorted({*saved, *given})
        if saved.get(k) != given.get(k)
    ]
    raise ValueError(f"{path} belongs to a different run ({'; '.join(changed)}); resume it as it was started")


def _save(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler | None,
    step: int,
    config: LoopConfig,
    meta: dict[str, object] | None = None,
) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": torch.get_rng_state(),
        "config": dataclasses.asdict(config),
        "meta": meta,
    }
    with replaced_when_done(out / CHECKPOINT) as temporary:
        torch.save(state, temporary)


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}; train that stage first") from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (left by a run that went on after its last checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
