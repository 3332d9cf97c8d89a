"""Prompt weighting syntax, long prompts in several windows, and conditioning length matching.

The weighting cases are the web UI's rules written out by hand; encodings are checked against the
text encoder run directly on the tokenizer's windows (exact equality where nothing is weighted).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from openldm.nn.clip import CLIPTextEncoder
from openldm.prompts import (
    encode_prompts,
    match_lengths,
    parse_weights,
    split_windows,
    tokenize_weighted,
)
from openldm.tokenizer import CLIPTokenizer
from tests.helpers import assert_close_rel
from tests.tiny import TINY_CLIP_L, TINY_OPENCLIP_H

UP = 1.1
DOWN = 1 / 1.1
LONG = "a photo of an astronaut riding a horse on mars " * 12  # 120 one-token words, no comma


# --- parse_weights -----------------------------------------------------------------------------

PARSE_CASES = [
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("a cat: sitting", [("a cat: sitting", 1.0)]),
    ("(cat)", [("cat", UP)]),
    ("[cat]", [("cat", DOWN)]),
    ("((cat))", [("cat", UP * UP)]),
    ("[[cat]]", [("cat", DOWN * DOWN)]),
    ("(((cat)))", [("cat", UP**3)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2)", [("a", 2.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:1.3) b", [("a", 1.3), (" b", 1.0)]),
    ("a (cat:1.3) [dog]", [("a ", 1.0), ("cat", 1.3), (" ", 1.0), ("dog", DOWN)]),
    ("((a:1.5))", [("a", 1.5 * UP)]),
    ("[(a:1.5)]", [("a", 1.5 * DOWN)]),
    ("(a (b) c)", [("a ", UP), ("b", UP * UP), (" c", UP)]),
    ("(a [b] c)", [("a ", UP), ("b", UP * DOWN), (" c", UP)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("[a] (b)", [("a", DOWN), (" ", 1.0), ("b", UP)]),
    # Escapes: literal brackets and backslashes, kept at the surrounding weight.
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"(a \(b\))", [("a (b)", UP)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a\b", [("a\\b", 1.0)]),
    (r"(\\)", [("\\", UP)]),
    # Unbalanced: an open bracket applies to the rest, a stray closing bracket is text.
    ("a (b c", [("a ", 1.0), ("b c", UP)]),
    ("a [b", [("a ", 1.0), ("b", DOWN)]),
    ("((a", [("a", UP * UP)]),
    ("(a:1.5", [("a:1.5", UP)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    ("(a) b)", [("a", UP), (" b)", 1.0)]),
    ("[a:1.5]", [("a:1.5", DOWN)]),
    ("(a:1.2.3)", [("a:1.2.3", UP)]),
    # Merging of neighbours with equal weights; empty brackets vanish.
    ("(a)(b)", [("ab", UP)]),
    ("(a) (b)", [("a", UP), (" ", 1.0), ("b", UP)]),
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("a (b:1) c", [("a b c", 1.0)]),
    ("()", [("", 1.0)]),
    ("a () b", [("a  b", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_CASES, ids=[repr(c[0]) for c in PARSE_CASES])
def test_parse_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=0)


def test_parse_weights_plain_prompt_is_returned_whole() -> None:
    prompt = "a photo of a cat, 4k: trending on artstation; 50% off!"
    assert parse_weights(prompt) == [(prompt, 1.0)]


# --- window cutting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "commas_at", "word_ends", "expected"),
    [
        (0, [], None, [0]),
        (75, [], None, [75]),
        (76, [], None, [75, 1]),
        (150, [], None, [75, 75]),
        (151, [], None, [75, 75, 1]),
        (100, [60], None, [61, 39]),  # the cut goes after the comma
        (100, [10, 60, 70], None, [71, 29]),  # the last comma in reach
        (100, [40], None, [75, 25]),  # a comma further back than 20 ids is not used
        (100, [55], None, [56, 44]),  # 20 ids move to the next window: still in reach
        (100, [54], None, [75, 25]),  # 21 would: out of reach
        (100, [], {73}, [74, 26]),  # no comma: the last word end
        (100, [], {54, 55}, [56, 44]),  # word ends have the same reach
        (100, [60], {73}, [61, 39]),  # a comma wins over a word end
        (100, [], {30}, [75, 25]),  # no break point in reach: a hard cut
    ],
)
def test_split_windows(n: int, commas_at: list[int], word_ends: set[int] | None, expected: list[int]) -> None:
    comma_id, other = 1000, 7
    ids = [comma_id if i in commas_at else other + i for i in range(n)]
    ends = frozenset(other + i for i in word_ends) if word_ends is not None else frozenset(ids)
    lengths = split_windows(ids, 75, frozenset({comma_id}), ends)
    assert lengths == expected
    assert sum(lengths) == n


# --- encoding ----------------------------------------------------------------------------------


@functools.cache
def _models(name: str) -> tuple[CLIPTokenizer, CLIPTextEncoder]:
    config = {"clip-l": TINY_CLIP_L, "openclip-h": TINY_OPENCLIP_H}[name]
    torch.manual_seed(0)
    return CLIPTokenizer.for_config(config), CLIPTextEncoder(config).eval()


@pytest.fixture
def models() -> tuple[CLIPTokenizer, CLIPTextEncoder]:
    return _models("clip-l")


def _encode_window(tok: CLIPTokenizer, enc: CLIPTextEncoder, ids: list[int]) -> torch.Tensor:
    """The text encoder on one framed window ``[1, 77, width]``."""
    assert len(ids) <= tok.max_length - 2
    return enc(torch.tensor([tok.window(ids)]))


@pytest.mark.parametrize("name", ["clip-l", "openclip-h"])
@torch.no_grad()
def test_plain_prompts_equal_the_text_encoder_exactly(name: str) -> None:
    tok, enc = _models(name)
    for prompt in ["a photo of an astronaut riding a horse on mars", "", "a cat: 4k, high quality"]:
        assert torch.equal(encode_prompts(tok, enc, [prompt]), enc(tok([prompt])))
    batch = ["a red car", "a blue house by the lake"]
    assert torch.equal(encode_prompts(tok, enc, batch), enc(tok(batch)))


@torch.no_grad()
def test_repeated_prompts_are_copies_of_one_encoding(models) -> None:
    tok, enc = models
    out = encode_prompts(tok, enc, ["a dog", "a cat", "a dog"])
    assert out.shape == (3, 77, 128)
    assert torch.equal(out[0:1], enc(tok(["a dog"])))
    assert torch.equal(out[2], out[0])
    assert torch.equal(out[1:2], enc(tok(["a cat"])))


@torch.no_grad()
def test_long_prompt_is_two_windows_each_encoded_alone(models) -> None:
    tok, enc = models
    ids = tok.encode(LONG)
    assert len(ids) == 120
    out = encode_prompts(tok, enc, [LONG])
    assert out.shape == (1, 154, 128)
    assert torch.equal(out[:, :77], _encode_window(tok, enc, ids[:75]))
    assert torch.equal(out[:, 77:], _encode_window(tok, enc, ids[75:]))
    # The first window is what the truncating tokenizer gives for the whole prompt.
    assert torch.equal(out[:, :77], enc(tok([LONG])))


@torch.no_grad()
def test_long_prompt_is_cut_after_a_comma_near_the_window_end(models) -> None:
    tok, enc = models
    prompt = "a " * 60 + ", " + "b " * 30
    ids = tok.encode(prompt)
    assert len(ids) == 91 and ids[60] == tok.encode(",")[0]
    out = encode_prompts(tok, enc, [prompt])
    assert out.shape == (1, 154, 128)
    assert torch.equal(out[:, :77], _encode_window(tok, enc, ids[:61]))
    assert torch.equal(out[:, 77:], _encode_window(tok, enc, ids[61:]))


@torch.no_grad()
def test_long_prompt_is_not_cut_inside_a_word(models) -> None:
    tok, enc = models
    word = tok.encode("photorealistic")
    assert len(word) == 2  # two BPE tokens: a hard cut at 75 would split it
    prompt = "a " * 74 + "photorealistic"
    ids = tok.encode(prompt)
    out = encode_prompts(tok, enc, [prompt])
    assert torch.equal(out[:, :77], _encode_window(tok, enc, ids[:74]))
    assert torch.equal(out[:, 77:], _encode_window(tok, enc, word))


@torch.no_grad()
def test_four_windows(models) -> None:
    tok, enc = models
    prompt = LONG * 2
    ids = tok.encode(prompt)
    out = encode_prompts(tok, enc, [prompt])
    assert len(ids) == 240 and out.shape == (1, 308, 128)
    for n, (a, b) in enumerate([(0, 75), (75, 150), (150, 225), (225, 240)]):
        assert torch.equal(out[:, 77 * n : 77 * (n + 1)], _encode_window(tok, enc, ids[a:b]))


@torch.no_grad()
def test_batch_is_padded_with_empty_windows(models) -> None:
    tok, enc = models
    out = encode_prompts(tok, enc, ["a red car", LONG])
    assert out.shape == (2, 154, 128)
    assert torch.equal(out[0:1, :77], enc(tok(["a red car"])))
    empty = enc(tok([""]))
    assert torch.equal(out[0:1, 77:], empty)
    assert torch.equal(out[1:2], encode_prompts(tok, enc, [LONG]))
    # The empty window is [start, end, pad...]: what the tokenizer gives for "".
    assert tok([""])[0, :2].tolist() == [tok.start_token_id, tok.end_token_id]


@torch.no_grad()
def test_weighting_scales_the_weighted_rows_and_keeps_the_mean(models) -> None:
    tok, enc = models
    out = encode_prompts(tok, enc, ["a (cat:1.5) [sitting] on a mat"])
    base = enc(tok(["a cat sitting on a mat"]))  # same ids: "a", "cat", "sitting", "on", "a", "mat"
    weights = torch.ones(77)
    weights[2] = 1.5  # row 0 is the start token, row 1 "a", row 2 "cat"
    weights[3] = 1 / 1.1
    expected = base * weights[None, :, None]
    expected = expected * (base.mean() / expected.mean())
    assert_close_rel(out, expected, 1e-6)
    assert float(out.mean()) == pytest.approx(float(base.mean()), rel=1e-5)
    # Unweighted rows all carry the same rescaling factor; the weighted ones 1.5x and 1/1.1x that.
    factor = out[0, 1] / base[0, 1]
    assert_close_rel(out[0, 4:] / base[0, 4:], factor.expand(73, -1), 1e-5)
    assert_close_rel(out[0, 2] / base[0, 2], 1.5 * factor, 1e-5)
    assert_close_rel(out[0, 3] / base[0, 3], factor / 1.1, 1e-5)
    assert not torch.allclose(factor, torch.ones_like(factor))


@torch.no_grad()
def test_weighting_in_one_window_leaves_the_other_untouched(models) -> None:
    tok, enc = models
    out = encode_prompts(tok, enc, [LONG + " (cat:1.4)"])
    plain = encode_prompts(tok, enc, [LONG + " cat"])
    assert out.shape == plain.shape == (1, 154, 128)
    assert torch.equal(out[:, :77], plain[:, :77])
    assert not torch.allclose(out[:, 77:], plain[:, 77:])
    assert float(out[:, 77:].mean()) == pytest.approx(float(plain[:, 77:].mean()), rel=1e-5)


@torch.no_grad()
def test_weights_of_one_prompt_do_not_touch_another(models) -> None:
    tok, enc = models
    out = encode_prompts(tok, enc, ["a red car", "a (blue:1.3) house"])
    assert torch.equal(out[0:1], enc(tok(["a red car"])))
    assert torch.equal(out[1:2], encode_prompts(tok, enc, ["a (blue:1.3) house"]))


@torch.no_grad()
def test_weighting_off_takes_brackets_literally(models) -> None:
    tok, enc = models
    prompt = "a (cat:1.5) [sitting] \\(on\\) a mat"
    literal = encode_prompts(tok, enc, [prompt], weighting=False)
    assert torch.equal(literal, enc(tok([prompt])))
    assert tokenize_weighted(tok, prompt, weighting=False) == (
        tok.encode(prompt),
        [1.0] * len(tok.encode(prompt)),
    )
    assert "(" in prompt and tok.encode("(")[0] in tok.encode(prompt)
    assert not torch.allclose(encode_prompts(tok, enc, [prompt]), literal)


def test_tokenize_weighted_gives_each_token_its_weight(models) -> None:
    tok, _ = models
    ids, weights = tokenize_weighted(tok, r"a (photorealistic:1.2) [cat] \(x\)")
    assert ids == tok.encode("a photorealistic cat (x)")
    assert weights == pytest.approx([1.0, 1.2, 1.2, 1 / 1.1, 1.0, 1.0, 1.0])


def test_encode_prompts_rejects_bad_input(models) -> None:
    tok, enc = models
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(tok, enc, [])
    with pytest.raises(TypeError, match="list of strings"):
        encode_prompts(tok, enc, "a cat")


# --- match_lengths -----------------------------------------------------------------------------


@torch.no_grad()
def test_match_lengths_with_empty_equals_encoding_together(models) -> None:
    tok, enc = models
    negative, positive = "blurry", LONG
    together = encode_prompts(tok, enc, [negative, positive])
    empty = encode_prompts(tok, enc, [""])
    cond, uncond = match_lengths(
        encode_prompts(tok, enc, [positive]), encode_prompts(tok, enc, [negative]), empty
    )
    assert torch.equal(uncond, together[0:1]) and torch.equal(cond, together[1:2])
    # Either side may be the shorter one; a batch of two is padded row by row.
    short = encode_prompts(tok, enc, ["a", "b"])
    long2 = encode_prompts(tok, enc, [LONG, LONG])
    padded, same = match_lengths(short, long2, empty[0])
    assert same is long2 and padded.shape == (2, 154, 128)
    assert torch.equal(padded[:, :77], short) and torch.equal(padded[:, 77:], empty.expand(2, -1, -1))


def test_match_lengths_equal_lengths_are_returned_as_they_are() -> None:
    a, b = torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    out_a, out_b = match_lengths(a, b)
    assert out_a is a and out_b is b


def test_match_lengths_without_empty_tiles_and_keeps_cross_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    short, long = torch.randn(1, 77, 16, generator=gen), torch.randn(1, 231, 16, generator=gen)
    padded, same = match_lengths(short, long)
    assert same is long and padded.shape == (1, 231, 16)
    assert torch.equal(padded, short.repeat(1, 3, 1))
    # Cross-attention over the tiled context equals attention over the original one.
    q = torch.randn(1, 10, 16, generator=gen)
    assert_close_rel(
        F.scaled_dot_product_attention(q, padded, padded),
        F.scaled_dot_product_attention(q, short, short),
        1e-5,
    )
    # Uneven multiples tile window by window: 2 windows padded to 3 take the first one again.
    two = torch.randn(1, 154, 16, generator=gen)
    _, uneven = match_lengths(long, two)
    assert torch.equal(uneven, torch.cat([two, two[:, :77]], dim=1))


def test_match_lengths_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="same width"):
        match_lengths(torch.zeros(1, 77, 8), torch.zeros(1, 77, 16))
    with pytest.raises(ValueError, match="whole number"):
        match_lengths(torch.zeros(1, 77, 8), torch.zeros(1, 100, 8), torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match="one window"):
        match_lengths(torch.zeros(1, 77, 8), torch.zeros(1, 154, 8), torch.zeros(2, 77, 8))
