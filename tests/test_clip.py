"""CLIP text encoders and tokenizer against transformers (a test-only oracle).

Parity: transformers' ``CLIPTextModel`` (eager attention) with random weights, converted from the
transformers 4.x / 5.x and OpenCLIP layouts, fp32, relative error <= 1e-4.
Tokenizer: ids equal to transformers' ``CLIPTokenizer`` built from the same vocabulary, for both pad
conventions; where the reference cleaning (ftfy, HTML unescaping) changes the text, our ids equal the
oracle's ids for the cleaned text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from openldm.checkpoints.formats.clip import (
    infer_text_config,
    text_config_from_transformers,
    text_config_to_transformers,
    text_from_open_clip,
    text_from_transformers,
    text_to_open_clip,
    text_to_transformers,
)
from openldm.config import CLIP_L, OPENCLIP_H, TextConfig
from openldm.nn.clip import CLIPTextEncoder
from openldm.tokenizer import END_TOKEN, START_TOKEN, CLIPTokenizer, packaged_vocab
from tests.helpers import assert_close_rel
from tests.tiny import TINY_CLIP_L, TINY_OPENCLIP_H

CONFIGS = {"clip-l": TINY_CLIP_L, "openclip-h": TINY_OPENCLIP_H}


# --- text encoder ------------------------------------------------------------------------------


def _oracle(config: TextConfig, layers: int | None = None, seed: int = 0) -> transformers.CLIPTextModel:
    """transformers' CLIPTextModel matching ``config``, every parameter random under ``seed``."""
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers if layers is None else layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )
    model = transformers.CLIPTextModel(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model


# Shared by the tests that only read the oracle (building one takes a noticeable fraction of a second).
_shared_oracle = functools.cache(_oracle)


def _ours(config: TextConfig, sd: dict[str, torch.Tensor]) -> CLIPTextEncoder:
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def _token_batch(config: TextConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    random_ids = torch.randint(0, config.vocab_size, (2, config.max_length), generator=gen)
    prompts = CLIPTokenizer.for_config(config)(["a photo of an astronaut riding a horse on mars", ""])
    return torch.cat([random_ids, prompts])


@torch.no_grad()
def _reference_output(oracle: transformers.CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    return oracle(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_transformers_5x_layout(name: str) -> None:
    config = CONFIGS[name]
    oracle = _shared_oracle(config)
    sd = oracle.state_dict()
    assert not any(k.startswith("text_model.") for k in sd), "transformers 5.x saves keys without text_model."
    ids = _token_batch(config)
    with torch.no_grad():
        out = _ours(config, text_from_transformers(sd))(ids)
    err = assert_close_rel(out, _reference_output(oracle, ids), 1e-4)
    print(f"\n{name} 5.x layout: relative error {err:.2e}")


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_transformers_4x_layout_ignores_corrupted_position_ids(name: str) -> None:
    config = CONFIGS[name]
    oracle = _shared_oracle(config)
    sd = {f"text_model.{k}": v for k, v in oracle.state_dict().items()}
    # Some SD 1 files store position_ids as floats like 75.99999: it must never be read.
    sd["text_model.embeddings.position_ids"] = torch.arange(77.0)[None].flip(-1) - 0.4
    converted = text_from_transformers(sd)
    assert "text_model.embeddings.position_ids" not in converted
    ids = _token_batch(config)
    with torch.no_grad():
        out = _ours(config, converted)(ids)
    err = assert_close_rel(out, _reference_output(oracle, ids), 1e-4)
    print(f"\n{name} 4.x layout: relative error {err:.2e}")
    assert text_to_transformers(converted).keys() == converted.keys()


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_open_clip_layout_penultimate(name: str) -> None:
    """An OpenCLIP file has one block more than runs; the output is the penultimate layer + final LN."""
    config = CONFIGS[name]
    full = _oracle(config, layers=config.layers + 1, seed=3)
    full_sd = full.state_dict()
    ours_sd = text_from_transformers(
        {k: v for k, v in full_sd.items() if f"layers.{config.layers}." not in k}
    )
    last = f"encoder.layers.{config.layers}."
    extra_layer = {k[len(last) :]: v for k, v in full_sd.items() if k.startswith(last)}
    gen = torch.Generator().manual_seed(4)
    open_clip_sd = text_to_open_clip(
        ours_sd,
        extra_layers=[extra_layer],
        text_projection=torch.randn(config.width, config.width, generator=gen),
        logit_scale=torch.tensor(4.6052),
    )
    open_clip_sd["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    assert f"transformer.resblocks.{config.layers}.attn.in_proj_weight" in open_clip_sd

    back = text_from_open_clip(open_clip_sd, config)
    assert back.keys() == ours_sd.keys()
    assert all(torch.equal(back[k], ours_sd[k]) for k in back)

    ids = _token_batch(config)
    with torch.no_grad():
        out = _ours(config, back)(ids)
        hidden = full(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        penultimate = full.final_layer_norm(hidden)
    err_full = assert_close_rel(out, penultimate, 1e-4)

    truncated = _oracle(config, seed=5)
    truncated.load_state_dict({k[len("text_model.") :]: v for k, v in ours_sd.items()}, strict=True)
    err = assert_close_rel(out, _reference_output(truncated, ids), 1e-4)
    print(f"\n{name} open_clip layout: relative error {err:.2e}, {err_full:.2e} vs the penultimate layer")


def test_in_proj_split_order_is_q_k_v() -> None:
    """in_proj_weight stacks q, k, v in that order along dim 0."""
    sd = text_from_transformers(_shared_oracle(TINY_OPENCLIP_H).state_dict())
    packed = text_to_open_clip(sd)["transformer.resblocks.1.attn.in_proj_weight"]
    width = TINY_OPENCLIP_H.width
    for i, n in enumerate("qkv"):
        assert torch.equal(
            packed[i * width : (i + 1) * width], sd[f"text_model.encoder.layers.1.self_attn.{n}_proj.weight"]
        )


def test_state_dict_keys_and_meta_build() -> None:
    with torch.device("meta"):
        model = CLIPTextEncoder(CLIP_L)
    keys = set(model.state_dict())
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.11.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.bias" in keys
    assert not any("position_ids" in k for k in keys)
    assert not list(model.buffers())
    assert len(keys) == 2 + 12 * 16 + 2


def test_bad_input_ids_raise() -> None:
    model = _ours(TINY_CLIP_L, text_from_transformers(_shared_oracle(TINY_CLIP_L).state_dict()))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        model(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        model(torch.full((1, 77), -1))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 77))


# --- key maps: errors --------------------------------------------------------------------------


def test_transformers_layout_rejects_foreign_keys() -> None:
    sd = _shared_oracle(TINY_CLIP_L).state_dict()
    with pytest.raises(ValueError, match="text_projection"):
        text_from_transformers({**sd, "text_projection.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="mixes keys"):
        text_from_transformers({**sd, "text_model.final_layer_norm.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="token_embedding"):
        text_from_transformers({"final_layer_norm.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="unexpected keys"):
        text_to_transformers({"encoder.layers.0.mlp.fc1.weight": torch.zeros(4)})


def test_open_clip_layout_rejects_foreign_keys() -> None:
    sd = text_to_open_clip(text_from_transformers(_shared_oracle(TINY_OPENCLIP_H).state_dict()))
    with pytest.raises(ValueError, match="visual.proj"):
        text_from_open_clip({**sd, "visual.proj": torch.zeros(4)}, TINY_OPENCLIP_H)
    with pytest.raises(ValueError, match="resblocks.0.attn.qkv"):
        text_from_open_clip(
            {**sd, "transformer.resblocks.0.attn.qkv.weight": torch.zeros(4)}, TINY_OPENCLIP_H
        )
    with pytest.raises(ValueError, match="has 2 resblocks but the config runs 3"):
        text_from_open_clip(sd, dataclasses.replace(TINY_OPENCLIP_H, layers=3))


# --- configs ---------------------------------------------------------------------------------------


def test_config_inference_full_size() -> None:
    with torch.device("meta"):
        sd_l = CLIPTextEncoder(CLIP_L).state_dict()
        sd_h = CLIPTextEncoder(OPENCLIP_H).state_dict()
        extra = CLIPTextEncoder(OPENCLIP_H).text_model.encoder.layers[0].state_dict()
        open_clip_h = text_to_open_clip(sd_h, extra_layers=[extra])
    assert infer_text_config(sd_l, "transformers") == CLIP_L
    assert infer_text_config({k[len("text_model.") :]: v for k, v in sd_l.items()}, "transformers") == CLIP_L
    assert infer_text_config(open_clip_h, "open_clip") == OPENCLIP_H
    assert "transformer.resblocks.23.ln_1.weight" in open_clip_h
    assert len(text_from_open_clip(open_clip_h, OPENCLIP_H)) == len(sd_h)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_inference_tiny(name: str) -> None:
    config = CONFIGS[name]
    sd = text_from_transformers(_shared_oracle(config).state_dict())
    layout = "open_clip" if config.activation == "gelu" else "transformers"
    if layout == "open_clip":
        extra = {
            k.split(".", 4)[-1]: v for k, v in sd.items() if k.startswith("text_model.encoder.layers.0.")
        }
        sd = text_to_open_clip(sd, extra_layers=[extra])
    assert infer_text_config(sd, layout) == config


def test_config_inference_errors() -> None:
    with pytest.raises(ValueError, match="token_embedding"):
        infer_text_config({}, "transformers")
    with pytest.raises(ValueError, match="layout"):
        infer_text_config({}, "clip")  # type: ignore[arg-type]


def test_config_from_published_config_json() -> None:
    # The values in the text_encoder/config.json of the SD 1.5 and SD 2.x diffusers repositories.
    sd1 = {
        "architectures": ["CLIPTextModel"],
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    }
    sd2 = {**sd1, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096}
    sd2 |= {"num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
    assert text_config_from_transformers(sd1, pad_token_id=49407) == CLIP_L
    assert text_config_from_transformers(sd2, pad_token_id=0) == OPENCLIP_H
    with pytest.raises(ValueError, match="activation"):
        text_config_from_transformers({**sd1, "hidden_act": "relu"}, pad_token_id=0)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        text_config_from_transformers({**sd1, "layer_norm_eps": 1e-6}, pad_token_id=0)
    with pytest.raises(ValueError, match="hidden_size"):
        text_config_from_transformers({"model_type": "clip_text_model"}, pad_token_id=0)


@pytest.mark.parametrize("config", [CLIP_L, OPENCLIP_H, TINY_CLIP_L, TINY_OPENCLIP_H])
def test_config_round_trip_through_transformers(config: TextConfig) -> None:
    as_json = text_config_to_transformers(config)
    assert text_config_from_transformers(as_json, config.pad_token_id) == config
    hf = transformers.CLIPTextConfig(**as_json)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (
        config.width,
        config.layers,
        config.heads,
    )
    assert (hf.intermediate_size, hf.hidden_act, hf.layer_norm_eps) == (
        config.mlp_width,
        config.activation,
        1e-5,
    )


# --- tokenizer ---------------------------------------------------------------------------------

_PLAIN = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An Astronaut Riding A Horse",
    "A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE",
    "portrait of a woman, oil painting, by greg rutkowski, trending on artstation",
    "a cute corgi wearing sunglasses, digital art, 4k, highly detailed",
    "cyberpunk city at night, neon lights, rain, cinematic lighting, 35mm",
    "an armchair in the shape of an avocado",
    "the quick brown fox jumps over the lazy dog",
    "Mount Everest at sunrise, ultra-wide angle, 8K UHD",
    "a bowl of ramen, studio ghibli style",
    "",
    " ",
    "a",
    "A",
    "I",
    "x",
    "photo",
    "antidisestablishmentarianism",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "unbelievably unrecognizable reconstructions",
    "hello world",
    "HeLLo WoRLD",
    "camelCaseWordsAndPascalCase",
    "snake_case_words_here",
    "kebab-case-words-here",
    "email@example.com and https://example.com/path?q=1&r=2",
    "#hashtag @mention $dollar %percent ^caret *star",
]
_PUNCTUATION = [
    "Hello, World!!!",
    "wow!!!???...",
    "...",
    "!!!",
    "?!?!",
    "--- *** ---",
    "(((masterpiece))), [[best quality]], {{detailed}}",
    "(masterpiece:1.2), (best quality:1.1)",
    "<lora:foo:0.8> <hypernet:bar>",
    "a | b || c ||| d",
    "semi;colon:colon",
    "quotes \"double\" and 'single'",
    "back`tick` ~tilde~ under_score",
    "slash/back\\slash",
    "1+1=2, 3*4=12, 10/2=5",
    "-_-'  ^_^  >_<  :)  :(  ;-)",
    "......,,,,,,;;;;;",
    "a.b.c.d.e",
    "end.",
    ".start",
]
_NUMBERS = [
    "1234567890",
    "3.14159",
    "2023-01-01",
    "12:30pm",
    "50% off",
    "$19.99",
    "1st 2nd 3rd 4th 101st",
    "model v1.5 and v2.1",
    "1920x1080 resolution",
    "0",
    "007",
    "a1b2c3d4",
    "4k 8k 16k 32k",
    "1,000,000 people",
]
_APOSTROPHES = [
    "it's a dog's life",
    "don't stop, won't stop, can't stop",
    "we're here, they've gone, I'm home, you'll see, he'd know",
    "IT'S A DOG'S LIFE",
    "It'S DoN'T We'Re",
    "'s 't 're 've 'm 'll 'd",
    "''",
    "'",
    "rock 'n' roll",
    "the '80s and the 90's",
    "o'clock o'neill",
    "students' books",
]
_WHITESPACE = [
    "  leading spaces",
    "trailing spaces   ",
    "   both   ",
    "multiple    spaces    between",
    "tab\tseparated\twords",
    "new\nline\nseparated",
    "carriage\r\nreturn",
    "\t\n mixed \t\n whitespace \t\n",
    "non\u00a0breaking\u00a0space",
    "em\u2003space and thin\u2009space",
    "line\u2028separator",
    "zero\u200bwidth",
]
_UNICODE = [
    "café crème brûlée",
    "naïve façade jalapeño",
    "Ångström Øresund Æsir",
    "straße Größe",
    "İstanbul and ışık",
    "東京の夜景",
    "一只可爱的猫",
    "한국어 텍스트",
    "日本語とEnglishの混在",
    "🐱🐶🦊",
    "a cat 🐱 and a dog 🐶",
    "👨‍👩‍👧‍👦 family emoji",
    "🏳️‍🌈 flag",
    "Привет, мир!",
    "МОСКВА ночью",
    "Ωμέγα και Άλφα",
    "ΑΘΗΝΑ",
    "عربى نص",
    "עברית",
    "हिन्दी पाठ",
    "ไทย",
    "math: ∑ ∫ √ ∞ ≠ ≤",
    "arrows → ← ↑ ↓",
    "®©™ symbols",
    "½ ¼ ¾ fractions",
    "°C and °F",
    "Ⅻ roman numeral",
    "superscript x² and subscript H₂O",
]
_SPECIAL = [
    "<|startoftext|>",
    "<|endoftext|>",
    "before <|endoftext|> after",
    "AT&T and R&D",
    "a & b",
]
_LONG = [
    "a " * 100,
    "photo " * 80,
    ", ".join(f"word{i}" for i in range(60)),
    "masterpiece, best quality, " * 20,
    "x" * 400,
    "!" * 200,
    "東京" * 60,
    "🐱" * 90,
    " ".join(str(i) for i in range(100)),
]


def _generated_prompts(count: int, seed: int = 0) -> list[str]:
    """Random mixtures of the pieces above, under a fixed seed."""
    rng = random.Random(seed)
    pieces = [w for group in (_PLAIN, _PUNCTUATION, _NUMBERS, _APOSTROPHES, _UNICODE) for w in group]
    separators = [" ", "  ", ", ", "\t", "\n", "", "!", "'s ", " - "]
    return [
        "".join(rng.choice(pieces) + rng.choice(separators) for _ in range(rng.randint(2, 12)))
        for _ in range(count)
    ]


EQUAL_PROMPTS = _PLAIN + _PUNCTUATION + _NUMBERS + _APOSTROPHES + _WHITESPACE + _UNICODE + _SPECIAL + _LONG
EQUAL_PROMPTS += _generated_prompts(40)

# The reference cleaning (ftfy.fix_text, html.unescape twice) changes these; transformers' fast
# tokenizer only applies NFC, whitespace collapse and lower case. Each maps to the text the reference
# tokenizes: our ids for the left equal the oracle's ids for the right.
REFERENCE_CLEANING = {
    "&amp; &lt;b&gt; &quot;quoted&quot;": '& <b> "quoted"',
    "fish &amp;amp; chips": "fish & chips",  # unescaped twice
    "caf&eacute; &#233; &#x27;s": "café é 's",
    "non&nbsp;breaking": "non breaking",
    "“curly double” and ‘curly single’": "\"curly double\" and 'curly single'",
    "it’s": "it's",
    "ﬁne ﬂowers": "fine flowers",
    "Ĳssel": "IJssel",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３": "FULLWIDTH text 123",
    "mojibake cafÃ©": "mojibake café",
    "control\x1cchar\x7f": "controlchar",
}


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """vocab.json and merges.txt written from the packaged vocabulary."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    vocab = packaged_vocab()
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    assert len(merges) == 48894 and len(vocab.encoder) == 49408
    assert vocab.encoder[START_TOKEN] == 49406 and vocab.encoder[END_TOKEN] == 49407
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    vocab_json.write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_json, merges_txt


PAD_CONVENTIONS = {"sd1": ("<|endoftext|>", 49407), "sd2": ("!", 0)}


@pytest.fixture(scope="module")
def oracles(vocab_files: tuple[Path, Path]) -> dict[str, transformers.CLIPTokenizer]:
    """transformers' tokenizer per pad convention (SD 2's diffusers folder names "!", id 0)."""
    built = {}
    for name, (pad_token, pad_id) in PAD_CONVENTIONS.items():
        built[name] = transformers.CLIPTokenizer(
            str(vocab_files[0]), str(vocab_files[1]), pad_token=pad_token
        )
        assert built[name].pad_token_id == pad_id
    return built


def _oracle_ids(oracle: transformers.CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    encoded = oracle(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return encoded["input_ids"]


def _equality_set(convention: str) -> list[str]:
    # transformers makes the pad token "!" a special token and splits text at every "!"; the
    # reference (open_clip) does not: see test_tokenizer_sd2_exclamation_mark.
    return [p for p in EQUAL_PROMPTS if convention == "sd1" or "!" not in p]


@pytest.mark.parametrize("convention", list(PAD_CONVENTIONS))
def test_tokenizer_matches_transformers(convention: str, oracles) -> None:
    ours = CLIPTokenizer(pad_token_id=PAD_CONVENTIONS[convention][1])
    prompts = _equality_set(convention)
    assert len(prompts) >= 100
    actual = ours(prompts)
    expected = _oracle_ids(oracles[convention], prompts)
    assert actual.shape == (len(prompts), 77) and actual.dtype == torch.long
    mismatched = [p for p, a, e in zip(prompts, actual, expected, strict=True) if not torch.equal(a, e)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    # The set exercises truncation and padding.
    assert (actual[:, -1] == 49407).sum() >= len(_LONG)
    assert (actual[:, -1] == ours.pad_token_id).any()


def test_tokenizer_sd2_exclamation_mark(oracles) -> None:
    """SD 2 pads with 0 but tokenizes "!" like any text, as the SD 1 tokenizer does."""
    prompts = [p for p in EQUAL_PROMPTS if "!" in p]
    assert len(prompts) >= 5
    encoded = oracles["sd1"](
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    expected = encoded["input_ids"].where(encoded["attention_mask"].bool(), 0)
    actual = CLIPTokenizer(pad_token_id=0)(prompts)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, _oracle_ids(oracles["sd2"], prompts))


@pytest.mark.parametrize("convention", list(PAD_CONVENTIONS))
def test_tokenizer_reference_cleaning(convention: str, oracles) -> None:
    ours, oracle = CLIPTokenizer(pad_token_id=PAD_CONVENTIONS[convention][1]), oracles[convention]
    raw, cleaned = list(REFERENCE_CLEANING), list(REFERENCE_CLEANING.values())
    actual = ours(raw)
    assert torch.equal(actual, _oracle_ids(oracle, cleaned))
    # The oracle does not clean this way: it gives other ids for every raw text.
    raw_ids = _oracle_ids(oracle, raw)
    assert all(not torch.equal(a, r) for a, r in zip(actual, raw_ids, strict=True))


def test_tokenizer_window_and_encode() -> None:
    tok = CLIPTokenizer(pad_token_id=0)
    ids = tok.encode("a photograph of an astronaut riding a horse")
    assert ids == [320, 8853, 539, 550, 18376, 6765, 320, 4558]  # published CLIP ids of these words
    window = tok("a photograph of an astronaut riding a horse")[0].tolist()
    assert window == [49406, *ids, 49407] + [0] * (77 - len(ids) - 2)
    long = tok("a " * 100)[0].tolist()
    assert long == [49406] + [320] * 75 + [49407]
    assert tok.encode("") == [] and tok("")[0].tolist() == [49406, 49407] + [0] * 75


def test_tokenizer_from_files_equals_packaged(vocab_files: tuple[Path, Path]) -> None:
    packaged = CLIPTokenizer()
    loaded = CLIPTokenizer.from_files(*vocab_files)
    assert loaded.pad_token_id == 49407
    prompts = EQUAL_PROMPTS + list(REFERENCE_CLEANING)
    assert torch.equal(loaded(prompts), packaged(prompts))


def test_tokenizer_from_files_reads_pad_token(vocab_files: tuple[Path, Path], tmp_path: Path) -> None:
    vocab_json, merges_txt = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_json.write_bytes(vocab_files[0].read_bytes())
    merges_txt.write_bytes(vocab_files[1].read_bytes())
    # SD 2's diffusers tokenizer folder names "!" (id 0) as its pad token.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    tok = CLIPTokenizer.from_files(vocab_json, merges_txt, pad_token_id=49407)
    assert tok.pad_token_id == 0
    assert tok("hi")[0, -1].item() == 0
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|notatoken|>"}))
    with pytest.raises(ValueError, match="notatoken"):
        CLIPTokenizer.from_files(vocab_json, merges_txt)
    with pytest.raises(ValueError, match="two symbols"):
        merges_txt.write_text("#version: 0.2\ni n\nbad line here\n")
        CLIPTokenizer.from_files(vocab_json, merges_txt)
