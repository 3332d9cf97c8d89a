"""The change each kind of LoRA / LyCORIS layer makes to its layer's weight (and bias).

Every kind stores factors of the change; the change is rebuilt here, scaled once by ``alpha / rank``
(as the web UI and ComfyUI apply it), and the caller multiplies it by the user's weight:

* LoRA / LoCon: ``up @ down`` (conv kernels flattened), or with a Tucker core ``lora_mid``
  ``einsum(mid, up, down)``; rank = ``down``'s first dimension;
* LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (the Hadamard product), each half Tucker-chained through
  ``hada_t1`` / ``hada_t2`` when present; rank = ``hada_w1_b``'s first dimension;
* LoKr: ``kron(w1, w2)``, each side either whole (``lokr_w1``) or a product (``lokr_w1_a @ lokr_w1_b``,
  ``lokr_w2`` through ``lokr_t2``); rank = the factored side's inner size, no scaling if neither is;
* full: ``diff`` (and ``diff_b``) is the change itself; norm: ``w_norm`` / ``b_norm`` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["lora", "loha", "lokr", "full", "norm"]


@dataclass(frozen=True)
class LayerChange:
    """One layer's part of a file: its kind, its tensors by part name, and its ``alpha`` (None: rank)."""

    kind: Kind
    parts: dict[str, torch.Tensor]
    alpha: float | None

    def rank(self) -> int | None:
        p = self.parts
        if self.kind == "lora":
            return p["down"].shape[0]
        if self.kind == "loha":
            return p["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            factored = p.get("lokr_w1_b", p.get("lokr_w2_b"))
            return factored.shape[0] if factored is not None else None
        return None

    def scale(self) -> float:
        rank = self.rank()
        if rank is None or self.alpha is None:
            return 1.0
        return self.alpha / rank


def _lora(p: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = p["up"].float(), p["down"].float()
    if "mid" in p:
        return torch.einsum("n m k l, i n, m j -> i j k l", p["mid"].float(), up.flatten(1), down.flatten(1))
    product = up.flatten(1) @ down.flatten(1)
    return product.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else product


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j ..., j r, i p -> p r ...", core.float(), b.float(), a.float())


def _hada_half(p: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    a, b = p[f"hada_w{n}_a"], p[f"hada_w{n}_b"]
    if f"hada_t{n}" in p:
        return _tucker(p[f"hada_t{n}"], a, b)
    return a.float().flatten(1) @ b.float().flatten(1)


def _kron_side(p: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    if f"lokr_w{n}" in p:
        return p[f"lokr_w{n}"].float()
    a, b = p[f"lokr_w{n}_a"].float(), p[f"lokr_w{n}_b"].float()
    if n == 2 and "lokr_t2" in p:
        return torch.einsum("i j ..., i p, j r -> p r ...", p["lokr_t2"].float(), a, b)
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:]) if b.ndim > 2 else a @ b


def _lokr(p: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = _kron_side(p, 1), _kron_side(p, 2)
    while w1.ndim < w2.ndim:
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def low_rank(change: LayerChange) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A plain LoRA's change as two float32 matrices ``(up * alpha / rank, down)`` whose product is the
    weight's change flattened to ``[out, in * kernel]`` (None for every other kind): it can then be
    added into the weight by one ``addmm``, without a change-sized temporary."""
    if change.kind != "lora" or "mid" in change.parts:
        return None
    up, down = change.parts["up"].float().flatten(1), change.parts["down"].float().flatten(1)
    return up * change.scale(), down


def weight_change(change: LayerChange, shape: torch.Size) -> torch.Tensor:
    """The change to a weight of ``shape``, float32, scaled by ``alpha / rank`` (not by the user's weight).

    Changes stored flat (LoHa's ``[out, in * k * k]``) or for a linear layer where the model has a 1x1
    convolution (SD 1 and SD 2 differ there), or the reverse, take the weight's shape; any other
    mismatch is a ``ValueError`` the caller words.
    """
    p = change.parts
    if change.kind == "lora":
        delta = _lora(p)
    elif change.kind == "loha":
        delta = _hada_half(p, 1) * _hada_half(p, 2)
    elif change.kind == "lokr":
        delta = _lokr(p)
    elif change.kind == "full":
        delta = p["diff"].float()
    else:
        delta = p["w_norm"].float()
    if delta.numel() != shape.numel() or delta.shape[0] != shape[0]:
        raise ValueError(f"the change has shape {list(delta.shape)}, the layer's weight {list(shape)}")
    delta = delta.reshape(shape)
    scale = change.scale()
    return delta * scale if scale != 1.0 else delta


def bias_change(change: LayerChange) -> torch.Tensor | None:
    """The change to the layer's bias (full and norm kinds only), float32."""
    bias = change.parts.get("diff_b", change.parts.get("b_norm"))
    return None if bias is None else bias.float()
