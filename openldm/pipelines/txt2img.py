"""Text to image: encode the prompt, draw the noise, sample, decode (the base :class:`Task` of the run).

Seeds: with seed s the starting noise of the run is ``torch.Generator("cpu").manual_seed(s)`` then
``torch.randn([n, 4, H/8, W/8], generator=g)`` on the CPU, moved to the model's device and scaled to
the sampler's starting sigma: the convention of diffusers with a CPU generator, so the same seed gives
the same image on every device and in both tools. ``n_iter`` repeats continue the same generator (as
the reference script continues its global RNG); stochastic samplers draw from it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openldm.pipelines.common import Generation, Model
from openldm.pipelines.options import Prompt, build_options
from openldm.pipelines.run import Task, generate

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields


class Txt2Img(Task):
    """Text to image: every step of the run as the base class does it."""


def txt2img(
    model: Model, prompt: Prompt, negative_prompt: Prompt = "", **options: Unpack[OptionFields]
) -> Generation:
    """Generate ``n_iter`` batches of ``n_samples`` images per prompt; the options are
    :class:`~openldm.pipelines.options.GenerationOptions`' (width and height default to the model's
    image size)."""
    return generate(model, Txt2Img(), build_options(prompt, negative_prompt, options))
