"""Prompts to conditioning: the web UI's weighting syntax and prompts longer than one CLIP window.

Weighting syntax (as the popular web UI reads it): ``(text)`` multiplies the weight of ``text`` by
1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3 (which sets it at top
level); nesting multiplies. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters. Unbalanced
input never fails: a bracket left open applies to the rest of the prompt, a closing bracket with
nothing to close and a ``:number)`` outside round brackets are literal text.

Long prompts: the token ids are cut into windows of ``max_length - 2`` (75) ids, each framed as
``[start] + ids + [end]`` and padded exactly as the tokenizer pads one prompt, each window encoded
on its own, the results concatenated along the sequence axis (77 * k tokens). A window that fits is
never cut, so a one-window prompt is tokenized and encoded exactly as ``text_encoder(tokenizer(p))``.
Where a prompt must be cut, the cut goes after the last comma among the window's last 20 ids, so
that at most 20 ids move to the next window (the web UI's rule), else after the last id among them
that ends a word (so a word is not split between windows), else at 75 ids.

Weights: each token's embedding row is multiplied by its weight, then the window is rescaled so
the mean of its [77, width] embedding is what it was before weighting (the web UI's rule, which it
applies per 75-token chunk). We take the mean per prompt and per window: the result for a prompt
then does not depend on the other prompts of the batch, and windows with no weights stay exact.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
# The web UI's default reach for a comma: at most this many ids move to the next window.
COMMA_BACKTRACK = 20

_PROMPT_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[\\()\[\]])                                  # \( \) \[ \] \\ : a literal character
  | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)        # :1.3) closes a round bracket with a weight
  | (?P<bracket>[()\[\]])
  | (?P<text>[^\\()\[\]:]+|[\\:])                              # plain text, a lone backslash or colon
    """,
    re.VERBOSE,
)


class Tokenizer(Protocol):
    """What :func:`encode_prompts` needs of a tokenizer (``openldm.tokenizer.CLIPTokenizer``)."""

    @property
    def start_token_id(self) -> int: ...
    @property
    def end_token_id(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...
    @property
    def max_length(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """Split ``prompt`` into ``(text, weight)`` pieces; adjacent pieces of equal weight are merged.

    ``parse_weights("a (cat:1.3) [dog]") == [("a ", 1.0), ("cat", 1.3), (" ", 1.0), ("dog", 1 / 1.1)]``;
    an empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index in ``pieces`` where each open bracket started
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PROMPT_TOKEN.finditer(prompt):
        escaped, weight, bracket = match.group("escaped", "weight", "bracket")
        if escaped is not None:
            pieces.append([escaped, 1.0])
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif bracket == "(":
            round_open.append(len(pieces))
        elif bracket == "[":
            square_open.append(len(pieces))
        elif bracket == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif bracket == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_FACTOR)
        else:  # text, or a bracket / weight with nothing to close
            pieces.append([match.group(0), 1.0])
    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for text, w in pieces:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        else:
            merged.append((text, w))
    return merged or [("", 1.0)]


def tokenize_weighted(
    tokenizer: Tokenizer, prompt: str, weighting: bool = True
) -> tuple[list[int], list[float]]:
    """Token ids of ``prompt`` (no start/end) and the weight of each; literal text if not ``weighting``."""
    if not weighting:
        ids = tokenizer.encode(prompt)
        return ids, [1.0] * len(ids)
    ids, weights = [], []
    for text, w in parse_weights(prompt):
        piece = tokenizer.encode(text)
        ids += piece
        weights += [w] * len(piece)
    return ids, weights


def _break_ids(tokenizer: Tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """Ids after which a window may be cut: the comma, and tokens that end a word (``...</w>``).

    Word ends are known only if the tokenizer exposes its vocabulary (``tokenizer.vocab.encoder``).
    """
    comma = tokenizer.encode(",")
    commas = frozenset(comma) if len(comma) == 1 else frozenset()
    encoder = getattr(getattr(tokenizer, "vocab", None), "encoder", None)
    if not isinstance(encoder, dict):
        return commas, frozenset()
    return commas, frozenset(i for token, i in encoder.items() if token.endswith("</w>"))


def split_windows(
    ids: Sequence[int], size: int, commas: frozenset[int], word_ends: frozenset[int]
) -> list[int]:
    """Lengths of the windows ``ids`` is cut into (see the module docstring for the rule)."""
    lengths = []
    start = 0
    while len(ids) - start > size:
        window = ids[start : start + size]
        lowest = max(1, size - COMMA_BACKTRACK + 1)  # a cut after id n keeps window[:n]
        cut = size
        for allowed in (commas, word_ends):
            found = [n for n in range(size, lowest - 1, -1) if window[n - 1] in allowed]
            if found:
                cut = found[0]
                break
        lengths.append(cut)
        start += cut
    lengths.append(len(ids) - start)
    return lengths


def _frame(
    tokenizer: Tokenizer, ids: Sequence[int], weights: Sequence[float]
) -> tuple[list[int], list[float]]:
    """``[start] + ids + [end]`` padded to ``max_length``, with weight 1 on every added token."""
    pad = tokenizer.max_length - len(ids) - 2
    framed = [tokenizer.start_token_id, *ids, tokenizer.end_token_id] + [tokenizer.pad_token_id] * pad
    return framed, [1.0, *weights, 1.0] + [1.0] * pad


def _apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply rows of ``z[N, T, C]`` by ``weights[N, T]``, keeping each window's mean.

    Windows whose weights are all 1 are returned untouched (bit for bit).
    """
    weighted_rows = (weights != 1).any(dim=1)
    if not bool(weighted_rows.any()):
        return z
    weighted = z * weights[..., None].to(z.dtype)
    before = z.float().mean(dim=(1, 2))
    after = weighted.float().mean(dim=(1, 2))
    scale = torch.where(after != 0, before / after, torch.ones_like(after))
    weighted = weighted * scale[:, None, None].to(z.dtype)
    return torch.where(weighted_rows[:, None, None], weighted, z)


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def encode_prompts(
    tokenizer: Tokenizer,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    *,
    weighting: bool = True,
    skip_layers: int = 0,
) -> torch.Tensor:
    """Conditioning ``[B, max_length * k, width]`` for ``prompts``, k the most windows any prompt needs.

    Shorter prompts are padded with empty windows (``[start, end, pad...]``), so a batch of a
    negative and a positive prompt encoded together is ready for classifier-free guidance.
    With ``weighting=False`` brackets are ordinary characters. Repeated prompts are encoded once.
    ``skip_layers`` leaves out the text encoder's last layers (clip skip N is ``N - 1``).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt in a list: [prompt]")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (use '' for an empty prompt)")
    unique = list(dict.fromkeys(prompts))
    tokenized = [tokenize_weighted(tokenizer, p, weighting) for p in unique]
    size = tokenizer.max_length - 2
    needs_cut = any(len(ids) > size for ids, _ in tokenized)
    commas, word_ends = _break_ids(tokenizer) if needs_cut else (frozenset(), frozenset())
    windows = []
    for ids, weights in tokenized:
        starts = [0]
        for length in split_windows(ids, size, commas, word_ends):
            starts.append(starts[-1] + length)
        windows.append([_frame(tokenizer, ids[a:b], weights[a:b]) for a, b in itertools.pairwise(starts)])
    k = max(len(w) for w in windows)
    empty = _frame(tokenizer, [], [])
    windows = [w + [empty] * (k - len(w)) for w in windows]

    device = _device(text_encoder)
    ids = torch.tensor([ids for w in windows for ids, _ in w], dtype=torch.long, device=device)
    weights = torch.tensor([ws for w in windows for _, ws in w], dtype=torch.float32, device=device)
    z = text_encoder(ids, skip_layers=skip_layers) if skip_layers else text_encoder(ids)
    z = _apply_weights(z, weights)
    z = z.reshape(len(unique), k * tokenizer.max_length, z.shape[-1])
    index = {p: n for n, p in enumerate(unique)}
    return z[[index[p] for p in prompts]] if len(unique) != len(prompts) else z


def match_lengths(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of two conditionings ``[B, L, width]`` along L so both have the same length.

    With ``empty`` (the conditioning of the empty prompt, ``encode_prompts(tok, enc, [""])``), the
    shorter one gets copies of that window: the result equals encoding both prompts in one batch.
    Without it, the shorter sequence is repeated (tiled) up to the longer length; when the longer
    length is a multiple of the shorter, cross-attention gives exactly what it gives on the
    unpadded sequence, since duplicated keys and values leave a softmax average unchanged.
    """
    if cond.ndim != 3 or uncond.ndim != 3 or cond.shape[-1] != uncond.shape[-1]:
        raise ValueError(
            f"cond and uncond must be [batch, tokens, width] with the same width, "
            f"got {list(cond.shape)} and {list(uncond.shape)}"
        )
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    if cond.shape[1] < uncond.shape[1]:
        return _pad_to(cond, uncond.shape[1], empty), uncond
    return cond, _pad_to(uncond, cond.shape[1], empty)


def _pad_to(short: torch.Tensor, length: int, empty: torch.Tensor | None) -> torch.Tensor:
    missing = length - short.shape[1]
    if empty is None:
        index = torch.arange(missing, device=short.device) % short.shape[1]
        return torch.cat([short, short[:, index]], dim=1)
    if empty.ndim == 2:
        empty = empty[None]
    if empty.ndim != 3 or empty.shape[0] != 1 or empty.shape[-1] != short.shape[-1]:
        raise ValueError(
            f"empty must be one window [1, tokens, {short.shape[-1]}], got {list(empty.shape)}; "
            "make it with encode_prompts(tokenizer, text_encoder, [''])"
        )
    if missing % empty.shape[1]:
        raise ValueError(
            f"the lengths differ by {missing} tokens, not a whole number of {empty.shape[1]}-token windows"
        )
    pad = empty.to(short).expand(short.shape[0], -1, -1).repeat(1, missing // empty.shape[1], 1)
    return torch.cat([short, pad], dim=1)


# The web UI's extra networks in prompts: <lora:name>, <lora:name:weight>, <lora:name:text:unet>
# (LyCORIS files were once written <lyco:...>).
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*){0,2})>")


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """``prompt`` without its ``<lora:...>`` tags, and each tag's (name, text weight, UNet weight).

    ``<lora:name>`` is weight 1, ``<lora:name:w>`` weight w for both networks, ``<lora:name:t:u>`` t for
    the text encoder and u for the UNet. A weight that is not a number is a ``ValueError``.
    """
    tags: list[tuple[str, float, float]] = []

    def take(match: re.Match[str]) -> str:
        numbers = [n.strip() for n in match[2].split(":")[1:]]
        try:
            weights = [float(n) for n in numbers]
        except ValueError:
            raise ValueError(
                f"{match[0]!r}: a LoRA's weight must be a number, as in <lora:name:0.8>"
            ) from None
        text = weights[0] if weights else 1.0
        tags.append((match[1].strip(), text, weights[1] if len(weights) > 1 else text))
        return ""

    return _LORA_TAG.sub(take, prompt), tags
