"""An exponential moving average of a model's floating-point parameters and buffers."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step.

    With ``warmup`` the decay used at update ``n`` (counted from 1) is ``min(decay, (1 + n) / (10 + n))``,
    so early, random weights are forgotten quickly (the reference LitEma does the same).
    The shadow is kept in float32 whatever the model's dtype.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in _tracked(model).items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        tracked = _tracked(model)
        shadows = [self.shadow[key] for key in tracked]
        values = [value.detach().float() for value in tracked.values()]
        torch._foreach_lerp_(shadows, values, 1.0 - decay)  # one call for all tensors: half the time

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same architecture)."""
        for key, value in _tracked(model).items():
            value.copy_(self.shadow[key].to(value.dtype))

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        if shadow.keys() != self.shadow.keys():
            raise ValueError("the EMA state belongs to a different model (its tensor names differ)")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.warmup = bool(state["warmup"])
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        self.shadow = {k: v.float().clone() for k, v in shadow.items()}


def _tracked(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point entries of the state dict (parameters and float buffers), by name."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
