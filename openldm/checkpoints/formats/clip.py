"""How the CLIP text encoder is laid out on disk, and translation to and from our layout.

Our layout is transformers 4.x ``CLIPTextModel`` (``text_model.encoder.layers.0.self_attn.q_proj.weight``)
without the ``position_ids`` buffer. Layouts read here:

- transformers 4.x (``text_model.`` prefix; SD 1 single files below ``cond_stage_model.transformer.``,
  diffusers ``text_encoder/`` folders) and transformers 5.x (the same keys without ``text_model.``).
- OpenCLIP (SD 2 single files below ``cond_stage_model.model.``): fused q/k/v ``in_proj``, one more
  residual block than SD 2 runs, and a text projection and logit scale that SD never uses.

All functions are pure: dicts of tensors in, dicts of tensors out. Callers strip the file's prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from openldm.config import TextConfig

StateDict = dict[str, torch.Tensor]
TextLayout = Literal["transformers", "open_clip"]

PREFIX = "text_model."
HEAD_WIDTH = 64  # CLIP-L and OpenCLIP-H both use 64-wide heads; head count is not visible in weights
LAYER_NORM_EPS = 1e-5

# transformers stores a `position_ids` buffer (0..76) in many files, sometimes as corrupted floats.
# Positions are always 0..max_length-1 here, so it is dropped, never read.
_POSITION_IDS = "embeddings.position_ids"
_OUR_KEY = re.compile(
    r"embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)"
)
_LAYER_INDEX = re.compile(r"encoder\.layers\.(\d+)\.")

# OpenCLIP names -> ours, for everything but the fused q/k/v projection.
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Parts of an OpenCLIP text tower that SD never uses (the causal mask is rebuilt, not loaded).
_OPEN_CLIP_UNUSED = frozenset({"text_projection", "logit_scale", "attn_mask"})
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}


def _examples(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


# --- transformers -----------------------------------------------------------------------------


def text_from_transformers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A transformers ``CLIPTextModel`` state dict (4.x or 5.x layout) in our layout.

    ``embeddings.position_ids`` is dropped; any key that is not part of a CLIP text transformer
    (a text projection, a vision tower...) is an error.
    """
    has_prefix = [k.startswith(PREFIX) for k in sd]
    if any(has_prefix) and not all(has_prefix):
        stray = [k for k in sd if not k.startswith(PREFIX)]
        raise ValueError(
            f"text encoder state dict mixes keys with and without the {PREFIX!r} prefix: {_examples(stray)}; "
            "pass only the CLIPTextModel weights"
        )
    skip = len(PREFIX) if has_prefix and all(has_prefix) else 0
    out: StateDict = {}
    unexpected = []
    for key, value in sd.items():
        name = key[skip:]
        if name == _POSITION_IDS:
            continue
        if _OUR_KEY.fullmatch(name) is None:
            unexpected.append(key)
            continue
        out[PREFIX + name] = value
    if unexpected:
        raise ValueError(
            f"not a CLIPTextModel state dict: unexpected keys {_examples(unexpected)}; expected keys like "
            f"'{PREFIX}encoder.layers.0.self_attn.q_proj.weight' (transformers 4.x) or the same without "
            f"{PREFIX!r} (5.x)"
        )
    if PREFIX + "embeddings.token_embedding.weight" not in out:
        raise ValueError("not a CLIPTextModel state dict: 'embeddings.token_embedding.weight' is missing")
    return out


def text_to_transformers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict in the published transformers 4.x layout (the same keys; checked)."""
    wrong = [k for k in sd if not (k.startswith(PREFIX) and _OUR_KEY.fullmatch(k[len(PREFIX) :]))]
    if wrong:
        raise ValueError(f"not a CLIPTextEncoder state dict: unexpected keys {_examples(wrong)}")
    return dict(sd)


# --- OpenCLIP ---------------------------------------------------------------------------------


def _resblock_count(sd: Mapping[str, Any]) -> int:
    indices = {int(m[1]) for k in sd if (m := _RESBLOCK.fullmatch(k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"OpenCLIP resblocks are not numbered 0..n-1: found {sorted(indices)}")
    return len(indices)


def _block_from_open_clip(index: int, rest: str, value: torch.Tensor) -> StateDict | None:
    """Our keys for one parameter of OpenCLIP resblock ``index``; None if the name is unknown."""
    target = f"{PREFIX}encoder.layers.{index}."
    if rest in _IN_PROJ:
        q, k, v = value.chunk(3, dim=0)
        kind = _IN_PROJ[rest]
        return {f"{target}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
    module, _, param = rest.rpartition(".")
    if module not in _OPEN_CLIP_BLOCK or param not in ("weight", "bias"):
        return None
    return {f"{target}{_OPEN_CLIP_BLOCK[module]}.{param}": value}


def text_from_open_clip(sd: Mapping[str, torch.Tensor], config: TextConfig) -> StateDict:
    """An OpenCLIP text tower (keys below ``cond_stage_model.model.``) in our layout.

    Keeps the first ``config.layers`` resblocks. Dropped by name: the resblocks after those (SD 2's
    last block: it takes the penultimate layer), ``text_projection``, ``logit_scale`` and an
    ``attn_mask`` buffer. Any other key is an error.
    """
    blocks = _resblock_count(sd)
    if blocks < config.layers:
        raise ValueError(
            f"the OpenCLIP checkpoint has {blocks} resblocks but the config runs {config.layers}"
        )
    out: StateDict = {}
    unexpected = []
    for key, value in sd.items():
        if key in _OPEN_CLIP_UNUSED:
            continue
        if key in _OPEN_CLIP_TOP:
            out[PREFIX + _OPEN_CLIP_TOP[key]] = value
            continue
        m = _RESBLOCK.fullmatch(key)
        mapped = _block_from_open_clip(int(m[1]), m[2], value) if m else None
        if mapped is None:
            unexpected.append(key)
        elif int(m[1]) < config.layers:
            out.update(mapped)
    if unexpected:
        raise ValueError(
            f"not an OpenCLIP text tower: unexpected keys {_examples(unexpected)}; expected keys like "
            "'transformer.resblocks.0.attn.in_proj_weight' (the 'cond_stage_model.model.' prefix removed)"
        )
    return out


def _layer_to_open_clip(index: int, layer: Mapping[str, torch.Tensor]) -> StateDict:
    target = f"transformer.resblocks.{index}."
    out = {
        f"{target}attn.in_proj_{kind}": torch.cat([layer[f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
        for kind in ("weight", "bias")
    }
    for theirs, ours in _OPEN_CLIP_BLOCK.items():
        for param in ("weight", "bias"):
            out[f"{target}{theirs}.{param}"] = layer[f"{ours}.{param}"]
    return out


def _split_layers(sd: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LAYER_INDEX.match(key, len(PREFIX))
        if m:
            layers.setdefault(int(m[1]), {})[key[m.end() :]] = value
    return [layers[i] for i in sorted(layers)]


def text_to_open_clip(
    sd: Mapping[str, torch.Tensor],
    extra_layers: Sequence[Mapping[str, torch.Tensor]] = (),
    text_projection: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
) -> StateDict:
    """Our state dict in OpenCLIP's layout (without the ``cond_stage_model.model.`` prefix).

    ``extra_layers`` are appended as resblocks after ours, each given in the layout of one of our
    layers (``self_attn.q_proj.weight``, ``layer_norm1.bias``...): SD 2 files carry one block more
    than SD 2 runs. ``text_projection`` and ``logit_scale`` are written when given.
    """
    ours = text_to_transformers(sd)
    out = {theirs: ours[PREFIX + name] for theirs, name in _OPEN_CLIP_TOP.items()}
    for index, layer in enumerate([*_split_layers(ours), *extra_layers]):
        out.update(_layer_to_open_clip(index, layer))
    if text_projection is not None:
        out["text_projection"] = text_projection
    if logit_scale is not None:
        out["logit_scale"] = logit_scale
    return out


# --- configs ----------------------------------------------------------------------------------


def text_config_from_transformers(config_json: Mapping[str, Any], pad_token_id: int) -> TextConfig:
    """Our ``TextConfig`` from a transformers ``CLIPTextConfig`` dict (a ``text_encoder/config.json``).

    The pad id belongs to the tokenizer, not to this file, so the caller passes it.
    """
    cfg = (
        config_json.get("text_config", config_json)
        if config_json.get("model_type") == "clip"
        else config_json
    )
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(
            f"expected a CLIP text model config (model_type 'clip_text_model'), got {model_type!r}"
        )
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if k not in cfg
    ]
    if missing:
        raise ValueError(f"CLIP text config lacks {missing}")
    activation = cfg.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported CLIP text activation {activation!r}; supported: 'quick_gelu', 'gelu'")
    eps = cfg.get("layer_norm_eps", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"CLIP text config has layer_norm_eps {eps}; only {LAYER_NORM_EPS} is supported")
    return TextConfig(
        vocab_size=cfg.get("vocab_size", 49408),
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_width=cfg["intermediate_size"],
        max_length=cfg.get("max_position_embeddings", 77),
        activation=activation,
        pad_token_id=pad_token_id,
    )


def text_config_to_transformers(cfg: TextConfig) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict (``config.json``) for ``cfg``."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.activation,
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "projection_dim": cfg.width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": cfg.pad_token_id,
    }


def _shape(sd: Mapping[str, Any], key: str, layout: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"cannot infer the text encoder config: {layout} key {key!r} is missing")
    return tuple(sd[key].shape)


def _heads(width: int) -> int:
    if width % HEAD_WIDTH:
        raise ValueError(f"text width {width} is not a multiple of the {HEAD_WIDTH}-wide CLIP heads")
    return width // HEAD_WIDTH


def infer_text_config(sd: Mapping[str, Any], layout: TextLayout) -> TextConfig:
    """Our ``TextConfig`` from an original-layout state dict (file prefix stripped).

    ``layout="transformers"``: SD 1 (below ``cond_stage_model.transformer.``), CLIP ViT-L style:
    quick-GELU, every layer runs, pad 49407. ``layout="open_clip"``: SD 2 (below
    ``cond_stage_model.model.``): GELU, all but the last resblock run (penultimate layer), pad 0.
    Heads are not visible in weights: CLIP's heads are 64 wide.
    """
    if layout == "transformers":
        prefix = PREFIX if any(k.startswith(PREFIX) for k in sd) else ""
        vocab, width = _shape(sd, prefix + "embeddings.token_embedding.weight", layout)
        positions = _shape(sd, prefix + "embeddings.position_embedding.weight", layout)[0]
        indices = {int(m[1]) for k in sd if (m := _LAYER_INDEX.match(k, len(prefix)))}
        if indices != set(range(len(indices))) or not indices:
            raise ValueError(f"CLIP text layers are not numbered 0..n-1: found {sorted(indices)}")
        mlp = _shape(sd, prefix + "encoder.layers.0.mlp.fc1.weight", layout)[0]
        return TextConfig(vocab, width, len(indices), _heads(width), mlp, positions, "quick_gelu", 49407)
    if layout == "open_clip":
        vocab, width = _shape(sd, "token_embedding.weight", layout)
        positions = _shape(sd, "positional_embedding", layout)[0]
        blocks = _resblock_count(sd)
        if blocks < 2:
            raise ValueError(
                f"an OpenCLIP text tower needs at least 2 resblocks (SD 2 skips the last), got {blocks}"
            )
        mlp = _shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", layout)[0]
        return TextConfig(vocab, width, blocks - 1, _heads(width), mlp, positions, "gelu", 0)
    raise ValueError(f"unknown text encoder layout {layout!r}; expected 'transformers' or 'open_clip'")
