"""The CLIP byte-level BPE tokenizer, with the text cleaning of the reference CLIP tokenizer.

Text is cleaned (ftfy, HTML unescaping, whitespace collapse, lower case), split into words by a
regex, each word's UTF-8 bytes are mapped to printable characters and merged pair by pair in
merge-rank order; the last symbol of a word carries ``</w>``. A prompt becomes
``[start] + ids + [end]`` in a window of ``max_length`` (77) tokens, padded with the pad id
(SD 1: the end token 49407, SD 2: 0).
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch

from openldm.config import TextConfig

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The reference uses the first 49152 - 256 - 2 merges of the packaged file (vocabulary of 49408).
_NUM_MERGES = 49152 - 256 - 2
_PACKAGED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
_CACHE_LIMIT = 100_000

_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The reference collapses whitespace with the `regex` module, whose \s is Unicode White_Space.
_WHITESPACE = regex.compile(r"\s+")


def byte_alphabet() -> list[tuple[int, str]]:
    """(byte, character) for all 256 bytes, in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (controls,
    space, soft hyphen...) get the characters from U+0100 upwards, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(others)]


@dataclass(frozen=True)
class BPEVocab:
    """A token -> id table and the merge ranks (pair -> rank, lower merges first)."""

    encoder: dict[str, int]
    ranks: dict[tuple[str, str], int]

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]]) -> BPEVocab:
        """The CLIP vocabulary built from merges: bytes, bytes + ``</w>``, merges, specials."""
        chars = [c for _, c in byte_alphabet()]
        tokens = (
            chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        )
        return cls({t: i for i, t in enumerate(tokens)}, {tuple(m): i for i, m in enumerate(merges)})


def _parse_merges(lines: Sequence[str]) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merges line {n + 1} is {line!r}; expected two symbols separated by a space")
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def packaged_vocab() -> BPEVocab:
    """The vocabulary shipped with openldm, read once."""
    from importlib.resources import files

    raw = (files("openldm") / "data" / _PACKAGED_VOCAB).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # The first line is a header ("#version: 0.2").
    return BPEVocab.from_merges(_parse_merges(lines[1 : _NUM_MERGES + 1]))


def clean_text(text: str) -> str:
    """The reference cleaning: ftfy fix, HTML unescape twice, collapse whitespace, lower case."""
    import ftfy  # imported here: ftfy is slow to import and only tokenization needs it

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _merge_pair(word: list[str], first: str, second: str) -> list[str]:
    """Replace every (first, second) pair in ``word``, scanning left to right."""
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


class CLIPTokenizer:
    """CLIP's BPE tokenizer: ``tokenizer(texts) -> LongTensor[B, max_length]``.

    ``CLIPTokenizer()`` uses the packaged vocabulary (read on first use);
    :meth:`from_files` reads the ``vocab.json`` + ``merges.txt`` of a diffusers ``tokenizer/`` folder.
    """

    def __init__(
        self, pad_token_id: int = 49407, max_length: int = 77, vocab: BPEVocab | None = None
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._vocab = vocab
        self._cache: dict[str, list[str]] = {}
        self._byte_chars = dict(byte_alphabet())
        self.added_words: dict[str, list[int]] = {}
        self._added_pattern: regex.Pattern[str] | None = None

    @classmethod
    def for_config(cls, config: TextConfig) -> CLIPTokenizer:
        """The packaged tokenizer with the pad id and window of a ``TextConfig``."""
        return cls(pad_token_id=config.pad_token_id, max_length=config.max_length)

    @classmethod
    def from_files(
        cls, vocab_json: str | Path, merges_txt: str | Path, pad_token_id: int = 49407, max_length: int = 77
    ) -> CLIPTokenizer:
        """A tokenizer from a ``vocab.json`` and ``merges.txt`` (a diffusers ``tokenizer/`` folder).

        The pad token comes from ``special_tokens_map.json`` or ``tokenizer_config.json`` next to
        ``vocab.json`` when one names it; otherwise ``pad_token_id`` is used.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        encoder = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = [ln for ln in merges_txt.read_text(encoding="utf-8").split("\n") if ln.strip()]
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = _parse_merges(lines)
        chars = [c for _, c in byte_alphabet()]
        needed = [
            START_TOKEN,
            END_TOKEN,
            *chars,
            *(c + END_OF_WORD for c in chars),
            *("".join(m) for m in merges),
        ]
        missing = [t for t in needed if t not in encoder][:5]
        if missing:
            raise ValueError(
                f"{vocab_json} lacks tokens {missing}; is it a CLIP vocab.json matching {merges_txt}?"
            )
        pad = _pad_token_from_folder(vocab_json.parent)
        if pad is not None:
            if pad not in encoder:
                raise ValueError(f"pad token {pad!r} named in {vocab_json.parent} is not in {vocab_json}")
            pad_token_id = encoder[pad]
        vocab = BPEVocab(encoder, {m: i for i, m in enumerate(merges)})
        return cls(pad_token_id=pad_token_id, max_length=max_length, vocab=vocab)

    @property
    def vocab(self) -> BPEVocab:
        if self._vocab is None:
            self._vocab = packaged_vocab()
        return self._vocab

    @property
    def start_token_id(self) -> int:
        return self.vocab.encoder[START_TOKEN]

    @property
    def end_token_id(self) -> int:
        return self.vocab.encoder[END_TOKEN]

    def bpe(self, word: str) -> list[str]:
        """The BPE symbols of one word (already mapped to byte characters)."""
        if word in (START_TOKEN, END_TOKEN):
            return [word]
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ranks = self.vocab.ranks
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break
            symbols = _merge_pair(symbols, *best)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens and without truncation.

        Added words (textual inversion embeddings, :meth:`set_added_words`) become their own ids."""
        cleaned = clean_text(text)
        if self._added_pattern is None:
            return self._encode_clean(cleaned)
        ids: list[int] = []
        position = 0
        for match in self._added_pattern.finditer(cleaned):
            ids += self._encode_clean(cleaned[position : match.start()]) + self.added_words[match[0]]
            position = match.end()
        return ids + self._encode_clean(cleaned[position:])

    def _encode_clean(self, cleaned: str) -> list[int]:
        encoder = self.vocab.encoder
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(cleaned):
            mapped = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(encoder[s] for s in self.bpe(mapped))
        return ids

    def set_added_words(self, words: dict[str, list[int]]) -> None:
        """Words (lower case) that encode to the given ids instead of their BPE tokens, matched as
        whole words: ``{"my-style": [49408, 49409]}``. An empty dict removes them."""
        self.added_words = dict(words)
        if not words:
            self._added_pattern = None
            return
        names = "|".join(regex.escape(w) for w in sorted(words, key=len, reverse=True))
        self._added_pattern = regex.compile(rf"(?<![\p{{L}}\p{{N}}_-])(?:{names})(?![\p{{L}}\p{{N}}_-])")

    def window(self, ids: Sequence[int]) -> list[int]:
        """``[start] + ids + [end]`` truncated to ``max_length`` (the end token kept last), then padded."""
        body = list(ids)[: self.max_length - 2]
        tokens = [self.start_token_id, *body, self.end_token_id]
        return tokens + [self.pad_token_id] * (self.max_length - len(tokens))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor[B, max_length] of token ids for one prompt or a list of prompts."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.window(self.encode(t)) for t in texts], dtype=torch.long)


def _pad_token_from_folder(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None
