"""The web UI ControlNet extension's request shape: ``alwayson_scripts: {"ControlNet": {"args": [unit,
...]}}``, each unit an image (base64), a preprocessor (``module``), a model named as its list shows it
(``name [hash8]``), a weight, the guided fraction of the steps and a control mode; and what its
``/controlnet/*`` routes answer.

Units are checked when the request comes (every image decoded, every model found, every preprocessor
known, the aspect of every image); the worker reads the networks (kept for the next job) and makes the
control images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openldm.adapters.controlnet_files import controlnet_files, controlnet_network, find_controlnet
from openldm.control_images import NEEDS_A_MODEL, PREPROCESSORS, preprocess
from openldm.model import StableDiffusion
from openldm.pipelines.control import check_control_aspect
from openldm.pipelines.options import CONTROL_MODE_NAMES, Control, ControlMode
from openldm.server.requests import BadRequest, Txt2ImgRequest, decode_image

FIELD = "alwayson_scripts"
MAX_UNITS = 8
# The web UI's module names for the preprocessors openldm has.
MODULE_ALIASES = {"invert (from white bg & black line)": "invert"}
_MODES: dict[Any, ControlMode] = {
    **{name: mode for mode, name in CONTROL_MODE_NAMES.items()},
    **{number: mode for number, mode in enumerate(CONTROL_MODE_NAMES)},
    **{mode: mode for mode in CONTROL_MODE_NAMES},
}


class ControlNetUnit(BaseModel):
    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    image: str | None = None
    input_image: str | None = None  # the extension's older name of ``image``
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0, le=10)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: str | int = "Balanced"


def controlnet_units(request: Txt2ImgRequest) -> list[ControlNetUnit]:
    """The enabled units of a request (none without the script)."""
    scripts = {str(k).lower(): v for k, v in request.alwayson_scripts.items()}
    script = scripts.get("controlnet")
    if script is None:
        return []
    raw = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(raw, list) or len(raw) > MAX_UNITS:
        raise BadRequest(FIELD, f"ControlNet args must be a list of at most {MAX_UNITS} units")
    units = []
    for index, item in enumerate(raw):
        try:
            unit = ControlNetUnit.model_validate(item)
        except ValidationError as e:
            problem = e.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise BadRequest(FIELD, f"ControlNet unit {index + 1}: {where}: {problem['msg']}") from None
        if unit.enabled:
            units.append(unit)
    return units


def _module(unit: ControlNetUnit, index: int) -> str:
    module = MODULE_ALIASES.get(unit.module, unit.module)
    if module in PREPROCESSORS:
        return module
    if module in NEEDS_A_MODEL or module.startswith("depth"):
        need = NEEDS_A_MODEL.get(module, "a MiDaS depth model")
        raise BadRequest(FIELD, f"ControlNet unit {index + 1}: the {module} preprocessor needs {need}")
    raise BadRequest(
        FIELD,
        f"ControlNet unit {index + 1}: unknown module {unit.module!r}; use one of {', '.join(PREPROCESSORS)}",
    )


def _mode(unit: ControlNetUnit, index: int) -> ControlMode:
    if unit.control_mode not in _MODES:
        names = ", ".join(repr(n) for n in CONTROL_MODE_NAMES.values())
        raise BadRequest(
            FIELD, f"ControlNet unit {index + 1}: control_mode must be one of {names} (or 0, 1, 2)"
        )
    return _MODES[unit.control_mode]


def _image(unit: ControlNetUnit, index: int, request: Txt2ImgRequest) -> Image.Image:
    data = unit.image or unit.input_image
    if not data:
        raise BadRequest(FIELD, f"ControlNet unit {index + 1} has no image")
    image = decode_image(data, f"ControlNet unit {index + 1} image").convert("RGB")
    try:
        check_control_aspect(image.size, (request.width, request.height), index)
    except ValueError as e:
        raise BadRequest(FIELD, str(e)) from None
    return image


def _file(unit: ControlNetUnit, index: int, files: list[Path]) -> Path:
    if unit.model in ("", "None"):
        raise BadRequest(FIELD, f"ControlNet unit {index + 1} has no model")
    try:
        return find_controlnet(unit.model, files)
    except (ValueError, FileNotFoundError) as e:
        raise BadRequest(FIELD, f"ControlNet unit {index + 1}: {e}") from None


def check_units(request: Txt2ImgRequest, known_files: Callable[[], list[Path]]) -> None:
    """Every unit usable (see the module docstring), or a :class:`BadRequest` naming the first that
    is not; ``known_files()``: the ControlNet files the server knows (listed only for a request with
    units)."""
    units = controlnet_units(request)
    files = known_files() if units else []
    for index, unit in enumerate(units):
        _module(unit, index)
        _mode(unit, index)
        _file(unit, index, files)
        _image(unit, index, request)
        if unit.guidance_start >= unit.guidance_end:
            raise BadRequest(FIELD, f"ControlNet unit {index + 1}: guidance_start must be below guidance_end")


def controls_of(request: Txt2ImgRequest, model: StableDiffusion) -> tuple[Control, ...]:
    """The request's units as the generation's controls, their networks found among ``model``'s
    ControlNet files and read for it."""
    units = controlnet_units(request)
    files = controlnet_files(model) if units else []
    controls = []
    for index, unit in enumerate(units):
        module = _module(unit, index)
        controls.append(
            Control(
                controlnet_network(model, _file(unit, index, files)),
                preprocess(_image(unit, index, request), module),
                unit.weight,
                unit.guidance_start,
                unit.guidance_end,
                _mode(unit, index),
                module,
            )
        )
    return tuple(controls)


def detect(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /controlnet/detect``: the control images ``controlnet_module`` makes of
    ``controlnet_input_images``, base64 PNGs."""
    from openldm.server.requests import encode_png

    images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not isinstance(images, list) or len(images) > MAX_UNITS:
        raise BadRequest("controlnet_input_images", f"give a list of at most {MAX_UNITS} images")
    unit = ControlNetUnit(module=str(body.get("controlnet_module", "none")))
    module = _module(unit, 0)
    made = [
        encode_png(preprocess(decode_image(str(data), "controlnet_input_images").convert("RGB"), module))
        for data in images
    ]
    return {"images": made, "info": "Success"}
