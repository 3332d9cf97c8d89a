"""Checkpoint merging, as the web UI's Checkpoint Merger does it, over original single files.

``weighted-sum``: ``(1 - alpha) * A + alpha * B``; ``add-difference``: ``A + alpha * (B - C)`` (C is
usually the base that B was fine-tuned from). Tensors are read memory-mapped and merged one by one in
float32, then stored in the output dtype. Every float tensor of A must be in B (and C) with its shape:
otherwise the files are different kinds of model and the merge is refused, naming the first key that
differs. EMA copies (``model_ema.``) are not part of the result; integer buffers are A's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import torch

from openldm.checkpoints.errors import CheckpointError, excerpt
from openldm.checkpoints.read import read_state_dict

MergeMode = Literal["weighted-sum", "add-difference"]
MERGE_MODES: tuple[MergeMode, ...] = ("weighted-sum", "add-difference")
StateDict = dict[str, torch.Tensor]


class MergeError(ValueError):
    """Checkpoints that cannot be merged with each other."""


def read_inputs(paths: list[str | os.PathLike[str]]) -> list[StateDict]:
    """The state dicts of ``paths`` (single files), without their EMA copies."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            raise MergeError(
                f"{os.fspath(path)!r} is a folder: merge takes single-file checkpoints (.safetensors, .ckpt)"
            )
        sd = read_state_dict(path)
        out.append({k: v for k, v in sd.items() if not k.startswith("model_ema.")})
    return out


def _check_same_kind(names: list[str], sds: list[StateDict]) -> None:
    first = sds[0]
    for name, sd in zip(names[1:], sds[1:], strict=True):
        for key, value in first.items():
            if not value.is_floating_point():
                continue
            other = sd.get(key)
            if other is None:
                raise MergeError(
                    f"{names[0]} has {excerpt(key)} and {name} has not: they are different kinds of model"
                )
            if other.shape != value.shape:
                raise MergeError(
                    f"{excerpt(key)} is {list(value.shape)} in {names[0]} and {list(other.shape)} in {name}: "
                    "they are different kinds (or sizes) of model"
                )


def merge_state_dicts(
    sds: list[StateDict], mode: MergeMode, alpha: float, dtype: torch.dtype | None = None
) -> StateDict:
    """The merge of 2 (weighted sum) or 3 (add difference) state dicts; ``dtype`` None keeps A's."""
    names = ["A", "B", "C"][: len(sds)]
    expected = 2 if mode == "weighted-sum" else 3
    if len(sds) != expected:
        raise MergeError(f"{mode} merges {expected} checkpoints, got {len(sds)}")
    _check_same_kind(names, sds)
    out: StateDict = {}
    for key, a in sds[0].items():
        if not a.is_floating_point():
            out[key] = a.clone()
            continue
        b = sds[1][key].float()
        if mode == "weighted-sum":
            merged = torch.lerp(a.float(), b, alpha)
        else:
            merged = a.float() + alpha * (b - sds[2][key].float())
        out[key] = merged.to(dtype or a.dtype).contiguous()
    return out


def check_readable(paths: Mapping[str, str | os.PathLike[str]]) -> None:
    """Each input exists and is a file (for the command line's checks before any work)."""
    for name, path in paths.items():
        if not os.path.isfile(path):
            kind = "a folder" if os.path.isdir(path) else "no such file"
            raise CheckpointError(
                path, f"{name} is {kind}", "Pass single-file checkpoints (.safetensors, .ckpt)"
            )
