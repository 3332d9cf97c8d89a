"""Building a network from a checkpoint's tensors: on the meta device (nothing initialised, nothing
copied), every key and shape checked and named before ``load_state_dict(strict=True, assign=True)``.
The three networks and the extras (the depth estimator, the CLIP image encoder) are built the same way."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from openldm.checkpoints.errors import CorruptCheckpointError
from openldm.nn.upcast import compute_dtype, upcast_layers
from openldm.nn.winograd import use_winograd, winograd_budget_of

StateDict = dict[str, torch.Tensor]
# The tensor methods the modules' default initialisation calls: pointless on meta tensors, and slow
# there (an embedding's normal_ goes through Python decompositions whose first use imports
# torch._dynamo, about 1.5 s of every command's start).
_INIT_METHODS = frozenset({"uniform_", "normal_", "zero_", "fill_", "exponential_", "trunc_normal_"})


class _SkipInit(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_METHODS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                return tensor
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Build networks on the meta device with no initialisation (their tensors come from a file)."""
    with torch.device("meta"), _SkipInit():
        yield


def build_network(
    cls: type[nn.Module],
    config: Any,
    sd: StateDict,
    what: str,
    source: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> Any:
    with on_meta():
        model = cls(config)
    check_keys(model, sd, what, source)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    # Loaded networks are for inference: no gradients until a training loop asks for them.
    return model.requires_grad_(False).eval().to(device)


def computed_like(network: nn.Module, reference: nn.Module) -> Any:
    """``network`` (built in ``reference``'s weight dtype) computing in ``reference``'s compute dtype:
    an add-on network (a ControlNet, a swapped VAE) follows the model it serves, and shares the budget
    of its Winograd convolutions (:mod:`openldm.nn.winograd`) when it has one."""
    upcast_layers(network, compute_dtype(reference))
    budget = winograd_budget_of(reference)
    return network if budget is None else use_winograd(network, budget)


def check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Missing, unexpected and misshapen tensors, named, before ``load_state_dict`` sees them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {examples(missing)}")
    if unexpected:
        problems.append(f"unexpected {examples(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes {examples(shapes)}")
    if problems:
        raise CorruptCheckpointError(
            source,
            f"the {what} weights do not fit the {what} they describe (key names without the file's prefix): "
            + "; ".join(problems),
            "The file is incomplete or modified; use the original file, or pass config=/preset= if the "
            "sizes were read wrongly",
        )


def examples(items: list[str], limit: int = 5, width: int = 120) -> str:
    """The first ``limit`` items, each cut to ``width`` characters (names come from the file)."""
    shown = ", ".join(repr(k if len(k) <= width else k[:width] + "...") for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
