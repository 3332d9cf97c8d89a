"""The text encoder's pre-training (caption parsing) and its frozen use in the diffusion stage."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from openldm.config import TextConfig, UNetConfig, VAEConfig
from openldm.nn.vae import AutoencoderKL
from openldm.shapes.captions import caption, caption_spans, explicit_spans
from openldm.shapes.dataset import HELD_OUT, evaluation_scenes, sample_scene
from openldm.shapes.render import Scene, ShapeObject
from openldm.tokenizer import CLIPTokenizer
from openldm.train.diffusion import DiffusionRecipe, frozen_contexts, train_diffusion
from openldm.train.loop import LoopConfig
from openldm.train.text_encoder import (
    OBJECT_WEIGHT,
    UNSTATED,
    CaptionParser,
    TextRecipe,
    caption_pool,
    load_text_encoder,
    object_accuracy,
    parse_accuracy,
    parse_loss,
    partial_captions,
    reading_positions,
    scene_targets,
    span_ends,
    token_targets,
    train_text_encoder,
)

TEXT = TextConfig(width=32, layers=1, heads=1, mlp_width=64)
TEXT64 = TextConfig(width=64, layers=1, heads=1, mlp_width=64)  # loadable: CLIP heads are 64 wide
EOS = 49407


def test_scene_targets_place_each_object_in_its_cell():
    scene = Scene(
        background="white",
        objects=(
            ShapeObject(kind="triangle", colour="green", size="large", position="top right"),
            ShapeObject(kind="circle", colour="red", size="small", position="bottom left"),
        ),
    )
    targets = scene_targets(scene).tolist()
    # background white is BACKGROUNDS[8]; cells top right = 2, bottom left = 6; classes shifted by empty=0
    assert targets[0] == 8
    assert targets[1:10] == [0, 0, 4, 0, 0, 0, 1, 0, 0]  # green = COLOURS[3], red = COLOURS[0]
    assert targets[10:19] == [0, 0, 3, 0, 0, 0, 1, 0, 0]  # triangle = KINDS[2], circle = KINDS[0]
    assert targets[19:28] == [0, 0, 3, 0, 0, 0, 1, 0, 0]  # large = 3, small = 1


def test_reading_positions_start_at_the_first_end_token():
    ids = torch.tensor([[EOS - 1, 5, EOS, EOS], [EOS - 1, 5, 6, EOS]])
    expected = [[False, False, True, True], [False, False, False, True]]
    assert reading_positions(ids, EOS).tolist() == expected


def test_parse_loss_of_a_blank_head_is_the_uniform_cross_entropy():
    torch.manual_seed(0)
    parser = CaptionParser(TEXT)
    nn.init.zeros_(parser.head.weight)
    nn.init.zeros_(parser.head.bias)
    nn.init.zeros_(parser.object_head.weight)
    nn.init.zeros_(parser.object_head.bias)
    ids, targets, objects = caption_pool(0, 6, CLIPTokenizer.for_config(TEXT))
    loss, parts = parse_loss(parser, ids, targets, EOS)
    expected = math.log(10) + math.log(9) + math.log(5) + 0.5 * math.log(4)
    assert abs(loss.item() - expected) < 1e-5
    assert abs(parts["size"] - 0.5 * math.log(4)) < 1e-5
    # The object head adds uniform colour (8) and kind (4) cross-entropies and 9 cells at log 2 each.
    loss, parts = parse_loss(parser, ids, targets, EOS, objects)
    uniform_objects = math.log(8) + math.log(4) + 9 * math.log(2)
    assert abs(loss.item() - expected - OBJECT_WEIGHT * uniform_objects) < 1e-5
    assert abs(parts["object_cells"] - 9 * math.log(2)) < 1e-5


def test_token_targets_mark_each_phrase_with_its_objects():
    def obj(colour, kind, position):
        return ShapeObject(kind=kind, colour=colour, size="medium", position=position)

    scene = Scene(
        background="white",
        objects=(
            obj("red", "circle", "top left"),
            obj("blue", "square", "centre"),
            obj("red", "circle", "bottom"),
        ),
    )
    spans = explicit_spans(scene)
    tokenizer = CLIPTokenizer.for_config(TEXT)
    assert "".join(text for text, _ in spans) == (
        "two red circles in the top left corner and at the bottom and a blue square in the centre "
        "on a white background"
    )
    targets = token_targets(spans, scene, tokenizer)
    # "two red circles in the top left corner and at the bottom" = 12 tokens after the start token
    red = [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0]  # red = COLOURS[0], circle = KINDS[0]; cells top left, bottom
    assert targets[1:13].tolist() == [red] * 12
    assert targets[13].tolist() == [-1] * 11  # "and"
    blue = [5, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # blue = COLOURS[5], square = KINDS[1]; the centre
    assert targets[14:20].tolist() == [blue] * 6  # "a blue square in the centre"
    assert (targets[20:] == -1).all()  # the background, the end token and the padding
    assert span_ends(spans, tokenizer) == [12, 19]


def test_stated_only_targets_start_at_the_words_that_state_them():
    scene = Scene(
        background="white",
        objects=(ShapeObject(kind="triangle", colour="yellow", size="small", position="top right"),),
    )
    spans = [("a picture of ", ()), ("a small golden triangle at the top right", (0,))]
    tokenizer = CLIPTokenizer.for_config(TEXT)
    full = token_targets(spans, scene, tokenizer)
    stated = token_targets(spans, scene, tokenizer, stated_only=True)
    phrase = slice(4, 4 + len(tokenizer.encode(spans[1][0])))  # start token + "a picture of"
    colour, kind = full[phrase, 0].tolist(), full[phrase, 1].tolist()
    # "a small golden triangle ...": the colour from "golden" (the third token) on, the kind from the
    # last token of "triangle" on; the cells everywhere in the phrase, as without stated_only.
    colour_at = 2
    kind_at = len(tokenizer.encode("a small golden triangle")) - 1
    assert stated[phrase, 0].tolist() == [UNSTATED] * colour_at + colour[colour_at:]
    assert stated[phrase, 1].tolist() == [UNSTATED] * kind_at + kind[kind_at:]
    assert torch.equal(stated[:, 2:], full[:, 2:]) and torch.equal(stated[:4], full[:4])
    # The unstated tokens add no colour or kind term: the loss is that of the stated ones.
    torch.manual_seed(0)
    parser = CaptionParser(TEXT)
    ids = tokenizer([spans[0][0] + spans[1][0]])
    targets = scene_targets(scene)[None]
    _, parts = parse_loss(parser, ids, targets, EOS, stated[None])
    logits = parser.read_objects(parser.text(ids)[0, phrase])
    wanted = stated[phrase, 1]
    known = wanted != UNSTATED
    expected = nn.functional.cross_entropy(logits["kind"][known], wanted[known], reduction="sum").detach()
    assert abs(parts["object_kind"] - expected.item() / len(wanted)) < 1e-5


def test_partial_captions_leave_attributes_unsaid_without_targets():
    tokenizer = CLIPTokenizer.for_config(TEXT)
    ids, targets, objects = caption_pool(0, 300, tokenizer, stated_only=True, partial_rate=0.5)
    plain_ids, plain_targets, _ = caption_pool(0, 300, tokenizer, stated_only=True)
    # The same scenes; only the unsaid attributes' scene targets are dropped, nothing else changes.
    dropped = targets == UNSTATED
    assert dropped.any() and torch.equal(targets[~dropped], plain_targets[~dropped])
    assert not dropped[:, 0].any() and not dropped[:, 19:].any()  # background and sizes stay
    kinds = {tokenizer.encode(word)[0] for word in ("shape", "shapes")}
    for row in range(300):
        generic = [i + 1 for i, t in enumerate(ids[row].tolist()[1:]) if t in kinds]
        # A phrase with "shape(s)" has no kind target on any of its tokens.
        for position in generic:
            assert objects[row, position, 1] == UNSTATED and objects[row, position, 0] >= 0
    assert (objects[..., 1] == UNSTATED).sum() > (objects[..., 0] == UNSTATED).sum() > 0
    rng = np.random.default_rng(0)
    spans = [("a picture of ", ()), ("a red circle", (0,))]
    assert partial_captions(spans, rng, 0.0) == (spans, [])
    # Without stated_only the partial phrases still have no target for what they leave unsaid (at
    # "shape" too), and the others keep theirs on every token.
    ids2, _, objects2 = caption_pool(0, 300, tokenizer, partial_rate=0.5)
    unstated, unstated2 = objects[..., 1] == UNSTATED, objects2[..., 1] == UNSTATED
    assert torch.equal(ids2, ids) and unstated2[torch.isin(ids, torch.tensor(sorted(kinds)))].all()
    assert (unstated2 <= unstated).all() and 0 < int(unstated2.sum()) < int(unstated.sum())


def test_caption_spans_join_to_the_training_caption():
    tokenizer = CLIPTokenizer.for_config(TEXT)
    for i in range(200):
        rng = np.random.default_rng([0, i])
        scene = sample_scene(rng, HELD_OUT)
        spans = caption_spans(scene, np.random.default_rng(i))
        assert "".join(text for text, _ in spans) == caption(scene, np.random.default_rng(i))
        described = sorted(index for _, objects in spans for index in objects)
        assert described == list(range(len(scene.objects)))  # each object in exactly one span
        counted = sum(len(tokenizer.encode(text)) for text, _ in spans)
        assert counted == len(tokenizer.encode(caption(scene, np.random.default_rng(i))))


def test_the_parser_learns_to_read_the_background(tmp_path):
    loop = LoopConfig(steps=120, lr=3e-3, warmup_steps=5, log_every=10, checkpoint_every=1000)
    recipe = TextRecipe(text=TEXT, loop=loop, batch_size=32, pool_size=400)
    parser, result = train_text_encoder(recipe, tmp_path, progress=False)
    captions = [
        f"a red circle in the centre on a {c} background" for c in ("blue", "white", "green", "black")
    ]
    scenes = [
        Scene(
            background=c,
            objects=(ShapeObject(kind="circle", colour="red", size="medium", position="centre"),),
        )
        for c in ("blue", "white", "green", "black")
    ]
    assert result.finished
    assert parse_accuracy(parser, captions, scenes)["background"] == 100.0
    # the object head learns too: the explicit captions' object colours are read above chance (12.5%)
    scenes = [scene for _, scene in evaluation_scenes(0, 50, held_out_only=False)]
    assert object_accuracy(parser, scenes)["object_colour"] > 30


def test_a_frozen_text_encoder_stays_as_given(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).eval().requires_grad_(False)
    unet = UNetConfig(
        model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,), context_dim=32
    )
    loop = LoopConfig(steps=3, lr=1e-2, warmup_steps=1, checkpoint_every=1000)
    recipe = DiffusionRecipe(
        unet=unet, text=TEXT, loop=loop, image_size=24, batch_size=2, cache_size=2, frozen_text=True
    )
    text = CaptionParser(TEXT).text
    model, _, _ = train_diffusion(recipe, vae, tmp_path, text=text, progress=False)
    for (name, given), trained in zip(
        text.state_dict().items(), model.text.state_dict().values(), strict=True
    ):
        assert torch.equal(given, trained), name
    assert not any(p.requires_grad for p in model.text.parameters())


def test_frozen_contexts_are_the_encoders_outputs_then_the_empty_caption():
    torch.manual_seed(0)
    text = CaptionParser(TEXT).text.eval()
    tokenizer = CLIPTokenizer.for_config(TEXT)
    ids = tokenizer(["a red circle", "two blue squares on the left and at the top", "a green bar"])
    contexts = frozen_contexts(text, ids, tokenizer("")[0], "cpu", batch_size=2)
    with torch.no_grad():
        assert torch.allclose(contexts[:3], text(ids), atol=1e-6)
        assert torch.allclose(contexts[3], text(tokenizer(""))[0], atol=1e-6)


def test_three_stages_train_and_export_a_loadable_file(tmp_path):
    """``train_embedded`` on a tiny recipe: autoencoder, text encoder, diffusion, export, load."""
    import openldm
    from openldm.config import ModelSpec
    from openldm.train.autoencoder import AutoencoderRecipe
    from openldm.train.embedded import Recipe, train_embedded

    vae = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    unet = UNetConfig(
        model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,), context_dim=64
    )
    spec = ModelSpec("tiny", "sd1", unet, vae, TEXT64, image_size=24)
    loop = LoopConfig(steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=1000)
    recipe = Recipe(
        spec,
        AutoencoderRecipe(vae=vae, loop=loop, image_size=24, batch_size=2, dataset_length=4),
        TextRecipe(text=TEXT64, loop=loop, batch_size=4, pool_size=8),
        DiffusionRecipe(
            unet=unet, text=TEXT64, loop=loop, image_size=24, batch_size=2, cache_size=4, frozen_text=True
        ),
    )
    path = tmp_path / "model.safetensors"
    report = train_embedded(recipe, tmp_path / "run", export_path=path, progress=False)
    assert report["text"]["steps"] == 2
    assert set(report["text"]["seen"]) == {
        "background",
        "colour",
        "kind",
        "object_colour",
        "object_kind",
        "object_cells",
    }
    assert report["diffusion"]["steps"] == 2 and report["export"]["bytes"] == path.stat().st_size
    text = load_text_encoder(TEXT64, tmp_path / "run" / "text")
    loaded = openldm.load(path)
    expected = text.state_dict()["text_model.embeddings.token_embedding.weight"].half()
    assert torch.equal(
        loaded.text_encoder.state_dict()["text_model.embeddings.token_embedding.weight"].half(), expected
    )
    assert loaded.spec.unet == unet and loaded.spec.text == TEXT64
